//! What TLS costs per byte on an established HBONE connection, for each cipher suite
//! ztunnel offers (`cargo bench -p ztunnel --bench tls`), and for the same suites with
//! aws-lc-rs' record layer (what Istio's ztunnel's default build seals with) beside them.
//! A client and a server session (ztunnel's own configs, both ends with the one suite
//! measured) hand 16 KiB writes to each other
//! in memory: the client encrypts, the server decrypts — what the two ztunnels on a
//! tunnel's path do to each byte. No sockets, so the figures are the crypto and rustls'
//! record layer alone, free of the bench topology's noise.
//!
//! The client (ztunnel's `tls::client_config_with`) offers a single suite, so the handshake
//! settles on it. Time is the bench thread's CPU time
//! (`CLOCK_THREAD_CPUTIME_ID`), not the wall clock: on a shared machine, time spent
//! waiting for a core is not charged to the suite.
use std::{
    io::{Read as _, Write as _},
    sync::Arc,
    time::Duration,
};

use criterion::{
    Criterion, Throughput,
    measurement::{Measurement, ValueFormatter, WallTime},
};
use rustls::{
    ClientConnection, ConnectionCommon, ServerConnection, crypto::CryptoProvider,
    pki_types::ServerName,
};
use ztunnel::{
    identity::{BuiltinCa, Identity},
    tls,
};

const TD: &str = "cluster.local";
/// One write: a full TLS record's worth of plaintext, as a busy tunnel sends.
const CHUNK: usize = 16 * 1024;
/// Plaintext moved per iteration.
const PER_ITER: usize = 64 * CHUNK;

/// The calling thread's CPU time (user and system), in the wall clock's units and format.
struct ThreadCpu;

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the call's duration.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

impl Measurement for ThreadCpu {
    type Intermediate = Duration;
    type Value = Duration;

    fn start(&self) -> Duration {
        thread_cpu()
    }

    fn end(&self, start: Duration) -> Duration {
        thread_cpu().saturating_sub(start)
    }

    fn add(&self, a: &Duration, b: &Duration) -> Duration {
        *a + *b
    }

    fn zero(&self) -> Duration {
        Duration::ZERO
    }

    fn to_f64(&self, d: &Duration) -> f64 {
        d.as_nanos() as f64
    }

    fn formatter(&self) -> &dyn ValueFormatter {
        static WALL: WallTime = WallTime;
        WALL.formatter()
    }
}

/// Moves every record `from` has queued to `to`, which decrypts them.
fn pump<A, B>(from: &mut ConnectionCommon<A>, to: &mut ConnectionCommon<B>, wire: &mut Vec<u8>) {
    wire.clear();
    while from.wants_write() {
        from.write_tls(wire).expect("records written");
    }
    let mut rd = &wire[..];
    while !rd.is_empty() {
        to.read_tls(&mut rd).expect("records taken");
        to.process_new_packets().expect("records decrypted");
    }
}

fn session(suite: rustls::SupportedCipherSuite) -> (ClientConnection, ServerConnection) {
    let (root_pem, key_pem) = BuiltinCa::generate_root_pem(TD).expect("root");
    let ca = BuiltinCa::from_pem(
        "bench",
        root_pem.as_bytes(),
        key_pem.as_bytes(),
        TD,
        Duration::from_secs(3600),
    )
    .expect("ca");
    let server_cert = ca
        .issue(&Identity::new(TD, "bench", "server"))
        .expect("server cert");
    let client_cert = ca
        .issue(&Identity::new(TD, "bench", "client"))
        .expect("client cert");
    // Both ends with the one suite, so both seal and open with the backend measured.
    let provider = Arc::new(CryptoProvider {
        cipher_suites: vec![suite],
        ..(*tls::provider()).clone()
    });
    let server_config =
        tls::server_config_with(&server_cert, provider.clone()).expect("server config");
    let client_config =
        tls::client_config_with(&client_cert, vec![server_cert.identity.clone()], provider)
            .expect("client config");

    let mut client = ClientConnection::new(
        client_config,
        ServerName::try_from("bench.invalid").expect("name"),
    )
    .expect("client session");
    let mut server = ServerConnection::new(server_config).expect("server session");
    let mut wire = Vec::new();
    while client.is_handshaking() || server.is_handshaking() {
        pump(&mut *client, &mut *server, &mut wire);
        pump(&mut *server, &mut *client, &mut wire);
    }
    assert_eq!(
        client.negotiated_cipher_suite().map(|s| s.suite()),
        Some(suite.suite()),
        "the handshake settled on the suite the client offered"
    );
    (client, server)
}

fn suites(c: &mut Criterion<ThreadCpu>) {
    let mut group = c.benchmark_group("tls/record");
    group.throughput(Throughput::Bytes(PER_ITER as u64));
    // Both record layers ztunnel picks between (`tls::record_layer`), suite for suite.
    let mut measured = Vec::new();
    for layer in [tls::RecordLayer::Ring, tls::RecordLayer::AwsLc] {
        for suite in tls::provider_with(layer).cipher_suites {
            measured.push((layer, suite));
        }
    }
    for (layer, suite) in measured {
        let backend = format!("{} ", layer.name());
        let (mut client, mut server) = session(suite);
        let chunk = vec![0x5au8; CHUNK];
        let mut wire = Vec::with_capacity(2 * CHUNK);
        let mut out = vec![0u8; CHUNK];
        let name = format!("{backend}{:?}", suite.suite());
        group.bench_function(name, |b| {
            b.iter(|| {
                // Record by record: rustls buffers a limited amount of plaintext each way.
                for _ in 0..PER_ITER / CHUNK {
                    client.writer().write_all(&chunk).expect("client plaintext");
                    pump(&mut *client, &mut *server, &mut wire);
                    let mut got = 0;
                    while got < CHUNK {
                        let n = server.reader().read(&mut out).expect("server plaintext");
                        assert!(n > 0, "the server got all the client sent");
                        got += n;
                    }
                }
            })
        });
    }
    group.finish();
}

fn main() {
    let mut c = Criterion::default()
        .with_measurement(ThreadCpu)
        .configure_from_args();
    suites(&mut c);
    c.final_summary();
}
