//! HBONE mTLS: the rustls configs a workload uses to accept and open tunnels, matching Istio's
//! ztunnel on the wire (`src/tls/lib.rs`, `src/tls/certificate.rs`, `src/tls/workload.rs`):
//! TLS 1.3 only, AES-GCM suites, x25519 first, ALPN `h2`, mandatory client certificates, no
//! SNI, no resumption, and SPIFFE identities checked in place of host names.
//!
//! Configs are built per certificate: when the [`crate::identity::CertificateManager`] renews
//! one, callers build new configs for new connections and existing connections keep theirs.
//! Client configs are kept per certificate and expected peer identities ([`ClientConfigs`]).

mod verifier;

use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::crypto::aws_lc_rs::{self, kx_group};
use rustls::crypto::ring;
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{ClientConfig, CommonState, RootCertStore, ServerConfig};
use rustls_pki_types::ServerName;

use crate::identity::{Identity, WorkloadCertificate};
use verifier::{IdentityVerifier, TrustDomainVerifier};

/// The only ALPN protocol HBONE speaks.
pub const ALPN_H2: &[u8] = b"h2";

static TLS13_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// Errors building TLS configs, and the reasons the verifiers reject a peer (carried inside
/// `rustls::Error::InvalidCertificate(CertificateError::Other(_))`).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("workload certificate for {identity} has no root certificates to verify peers with")]
    NoRoots { identity: Box<Identity> },

    #[error("workload certificate for {identity} has an unusable root certificate")]
    Roots {
        identity: Box<Identity>,
        #[source]
        source: rustls::Error,
    },

    #[error("failed to build the client certificate verifier for {identity}")]
    ClientVerifier {
        identity: Box<Identity>,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },

    #[error("failed to build the tls {side} config for {identity}")]
    Config {
        side: &'static str,
        identity: Box<Identity>,
        #[source]
        source: rustls::Error,
    },

    #[error(
        "client config for {identity} has no expected server identities: it would reject every server"
    )]
    NoExpectedIdentities { identity: Box<Identity> },

    #[error(
        "server certificate identity {} is not one of [{}]",
        join(.presented),
        join(.expected)
    )]
    ServerIdentityMismatch {
        presented: Vec<Identity>,
        expected: Vec<Identity>,
    },

    #[error("client trust domain {} does not match {expected}", join(.client))]
    TrustDomainMismatch {
        client: Vec<String>,
        expected: String,
    },

    #[error("{peer} certificate has no spiffe identity")]
    NoPeerIdentity { peer: &'static str },
}

fn join<T: std::fmt::Display>(items: &[T]) -> String {
    let mut out = String::new();
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        let _ = write!(out, "{item}");
    }
    out
}

/// Whose AES-GCM seals and opens HBONE's TLS records (ARCHITECTURE.md "Record
/// encryption"). The same bytes on the wire either way; only the speed differs, by CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordLayer {
    /// aws-lc-rs' (what Istio's ztunnel uses).
    AwsLc,
    /// ring's, for its VAES-AVX2 AES-GCM.
    Ring,
}

impl RecordLayer {
    pub fn name(self) -> &'static str {
        match self {
            RecordLayer::AwsLc => "aws-lc-rs",
            RecordLayer::Ring => "ring",
        }
    }
}

/// The CPU features the choice of [`RecordLayer`] depends on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AesGcmCpu {
    /// VAES and VPCLMULQDQ: AES and GHASH on 256-bit (and 512-bit) vectors.
    pub vaes: bool,
    pub avx2: bool,
    /// AVX-512 F, DQ, IFMA, BW and VL, all five: what aws-lc's VAES AES-GCM requires
    /// besides VAES (its `crypto_gcm_avx512_enabled`).
    pub avx512: bool,
}

impl AesGcmCpu {
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            AesGcmCpu {
                vaes: has!("vaes") && has!("vpclmulqdq"),
                avx2: has!("avx2"),
                avx512: has!("avx512f")
                    && has!("avx512dq")
                    && has!("avx512ifma")
                    && has!("avx512bw")
                    && has!("avx512vl"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        AesGcmCpu::default()
    }

    /// ring's where it is the faster one, measured (a 16 KiB seal, one thread): VAES
    /// with AVX2 but not aws-lc's AVX-512 (ring 5.0–5.5 GB/s, aws-lc 2.4–2.6 on an AMD
    /// EPYC without AVX-512). aws-lc's where it has its VAES code (AVX-512: aws-lc 8.7–10.1,
    /// ring 6.8–8.7 GB/s for AES-256-GCM on an AMD EPYC with it), and where neither has
    /// VAES: both then run the same AES-NI code, and aws-lc is Istio's.
    pub fn record_layer(self) -> RecordLayer {
        if self.vaes && self.avx2 && !self.avx512 {
            RecordLayer::Ring
        } else {
            RecordLayer::AwsLc
        }
    }
}

/// This CPU's features (detected once).
pub fn aes_gcm_cpu() -> AesGcmCpu {
    static CPU: OnceLock<AesGcmCpu> = OnceLock::new();
    *CPU.get_or_init(AesGcmCpu::detect)
}

/// This CPU's record layer.
pub fn record_layer() -> RecordLayer {
    aes_gcm_cpu().record_layer()
}

/// What HBONE's TLS uses: Istio's ztunnel's suites and groups in its order (AES-256-GCM
/// first: AES-128-GCM was measured and not kept, ARCHITECTURE.md "Cipher suite"). The key
/// exchange, signatures and randomness are aws-lc-rs' (X25519MLKEM768 is there only); the
/// record layer's AES-GCM and the key schedule are [`record_layer`]'s. Built explicitly so
/// nothing depends on a process-wide default provider being installed.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(provider_with(record_layer())))
        .clone()
}

/// [`provider`] with the given record layer.
pub fn provider_with(layer: RecordLayer) -> CryptoProvider {
    let cipher_suites = match layer {
        RecordLayer::AwsLc => vec![
            aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
            aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
        ],
        RecordLayer::Ring => vec![
            ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
            ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
        ],
    };
    CryptoProvider {
        cipher_suites,
        // x25519 first: the client sends a key share for the first group only, and this
        // is the share Istio's ztunnel sends.
        kx_groups: vec![
            kx_group::X25519,
            kx_group::SECP256R1,
            kx_group::SECP384R1,
            kx_group::X25519MLKEM768,
        ],
        ..aws_lc_rs::default_provider()
    }
}

/// The crypto shown in `/config_dump`'s version: aws-lc-rs, and the record layer's
/// backend where it is another.
pub fn crypto_provider_name() -> String {
    match record_layer() {
        RecordLayer::AwsLc => "aws-lc-rs".to_owned(),
        other => format!("aws-lc-rs, records sealed by {}", other.name()),
    }
}

fn root_store(cert: &WorkloadCertificate) -> Result<Arc<RootCertStore>, Error> {
    if cert.roots.is_empty() {
        return Err(Error::NoRoots {
            identity: Box::new(cert.identity.clone()),
        });
    }
    let mut roots = RootCertStore::empty();
    for root in &cert.roots {
        roots.add(root.clone()).map_err(|source| Error::Roots {
            identity: Box::new(cert.identity.clone()),
            source,
        })?;
    }
    Ok(Arc::new(roots))
}

/// The config for accepting HBONE connections as `cert`'s workload: clients must present a
/// certificate chaining to `cert`'s roots with an identity in `cert`'s trust domain.
pub fn server_config(cert: &WorkloadCertificate) -> Result<Arc<ServerConfig>, Error> {
    server_config_with(cert, provider())
}

/// [`server_config`] with another provider than [`provider`]: a server with another
/// backend's record layer (`cargo bench -p ztunnel --bench tls`).
pub fn server_config_with(
    cert: &WorkloadCertificate,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<ServerConfig>, Error> {
    let config_error = |source| Error::Config {
        side: "server",
        identity: Box::new(cert.identity.clone()),
        source,
    };
    let webpki = WebPkiClientVerifier::builder_with_provider(root_store(cert)?, provider.clone())
        .build()
        .map_err(|source| Error::ClientVerifier {
            identity: Box::new(cert.identity.clone()),
            source,
        })?;
    let verifier = TrustDomainVerifier::new(webpki, cert.identity.trust_domain.clone());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(TLS13_ONLY)
        .map_err(config_error)?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(cert.chain.clone(), cert.key.clone_key())
        .map_err(config_error)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // HBONE clients never resume, so tickets and a session cache would be pure overhead.
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(NoServerSessionStorage {});
    Ok(Arc::new(config))
}

/// The config for opening HBONE connections as `cert`'s workload to a server that must hold
/// one of `expected`: the destination workload's identity, the service's SANs, or the
/// waypoint's identity. Pass any `ServerName` (see [`server_name`]): it is neither sent nor
/// checked.
pub fn client_config(
    cert: &WorkloadCertificate,
    expected: Vec<Identity>,
) -> Result<Arc<ClientConfig>, Error> {
    client_config_with(cert, expected, provider())
}

/// [`client_config`] with another provider than [`provider`]: a client offering other
/// suites, or in another order (`cargo bench -p ztunnel --bench tls`).
pub fn client_config_with(
    cert: &WorkloadCertificate,
    expected: Vec<Identity>,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<ClientConfig>, Error> {
    if expected.is_empty() {
        return Err(Error::NoExpectedIdentities {
            identity: Box::new(cert.identity.clone()),
        });
    }
    let config_error = |source| Error::Config {
        side: "client",
        identity: Box::new(cert.identity.clone()),
        source,
    };
    let verifier = IdentityVerifier::new(root_store(cert)?, expected, provider.clone());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(TLS13_ONLY)
        .map_err(config_error)?
        .dangerous()
        // Not actually dangerous: the verifier does full path validation, then checks the
        // SPIFFE identity where the default verifier would check a DNS name.
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(cert.chain.clone(), cert.key.clone_key())
        .map_err(config_error)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.enable_sni = false;
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// Client configs the dialling side keeps (see [`ClientConfigs`]): one per source identity
/// and expected server identities, so about one per pair of service accounts that talk.
pub const CLIENT_CONFIGS_LIMIT: usize = 1024;

/// The configs [`client_config`] builds, kept per source certificate and expected server
/// identities: building one parses the roots, builds the verifier and copies the key, which
/// a dial should not pay each time. An entry is used only while its source identity's
/// certificate is the one it was built from (chain, key and roots): a renewed certificate
/// gets a new config, which replaces the old one. At most `limit` entries; adding one at
/// the limit evicts the least recently used.
#[derive(Debug)]
pub struct ClientConfigs {
    /// (source identity, expected server identities) → config.
    inner: std::sync::Mutex<lru::LruCache<(Identity, Vec<Identity>), CachedConfig>>,
}

#[derive(Debug)]
struct CachedConfig {
    /// Held, so that the pointer compared in [`same_certificate`] cannot be reused.
    cert: Arc<WorkloadCertificate>,
    config: Arc<ClientConfig>,
}

fn same_certificate(a: &Arc<WorkloadCertificate>, b: &Arc<WorkloadCertificate>) -> bool {
    Arc::ptr_eq(a, b)
        || (a.chain == b.chain && a.roots == b.roots && a.key.secret_der() == b.key.secret_der())
}

impl ClientConfigs {
    /// A cache of at most `limit` configs (at least one).
    pub fn new(limit: usize) -> Self {
        let limit = std::num::NonZeroUsize::new(limit).unwrap_or(std::num::NonZeroUsize::MIN);
        ClientConfigs {
            inner: std::sync::Mutex::new(lru::LruCache::new(limit)),
        }
    }

    /// The config [`client_config`] gives for `cert` and `expected`, built once per
    /// certificate and expected identities.
    pub fn get(
        &self,
        cert: &Arc<WorkloadCertificate>,
        expected: &[Identity],
    ) -> Result<Arc<ClientConfig>, Error> {
        // A dial pays a TLS handshake: the key's copy is not worth avoiding.
        let key = (cert.identity.clone(), expected.to_vec());
        if let Some(e) = self
            .lock()
            .get(&key)
            .filter(|e| same_certificate(&e.cert, cert))
        {
            return Ok(e.config.clone());
        }
        // Built without the lock: it takes a while, and other dials go on meanwhile.
        let config = client_config(cert, expected.to_vec())?;
        // Replaces an entry for an older certificate; at the limit, evicts the least
        // recently used.
        self.lock().put(
            key,
            CachedConfig {
                cert: cert.clone(),
                config: config.clone(),
            },
        );
        Ok(config)
    }

    /// Configs held.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, lru::LruCache<(Identity, Vec<Identity>), CachedConfig>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Read buffer under TLS on an HBONE connection, once it is authenticated and busy. rustls
/// asks its transport for at most 4 KiB at a time, so a 16 KiB record would cost four
/// `recvfrom` calls; reading the socket into this buffer first turns a busy tunnel's
/// ciphertext into one syscall per several records (`cargo xtask bench`, "throughput", and
/// the note on issue 7). It is given only after the TLS handshake
/// ([`Transport::authenticated`]), so a client that never finishes its handshake costs
/// none, and only while reads keep finding more than rustls asked for: an idle or lightly
/// used connection holds none (see [`LIGHT_READ`]).
pub const READ_BUFFER: usize = 128 * 1024;

/// A fill of [`READ_BUFFER`] smaller than this (a record's worth) is a light one; after
/// [`LIGHT_FILLS`] light fills in a row the buffer is freed once read out, and reads go
/// straight to rustls again.
const LIGHT_READ: usize = 16 * 1024;
/// Consecutive light fills before the buffer is freed: a connection whose traffic comes
/// and goes keeps it instead of allocating it again at every burst.
const LIGHT_FILLS: u8 = 4;

/// The TCP connection an HBONE TLS session runs on: unbuffered during the handshake, with
/// [`READ_BUFFER`] under it while busy once [`Transport::authenticated`] is called.
#[derive(Debug)]
pub struct Transport(Option<TransportInner>);

#[derive(Debug)]
enum TransportInner {
    Handshaking(tokio::net::TcpStream),
    Authenticated(Buffered),
}

/// An authenticated connection's read side: straight into the caller's buffer while a
/// read finds no more than was asked for, through [`READ_BUFFER`] from the moment one
/// fills what was asked (more is likely queued) until fills come back light.
#[derive(Debug)]
struct Buffered {
    tcp: tokio::net::TcpStream,
    /// Read from the socket and not yet handed out; `None` (no allocation) while traffic
    /// is light. Never zeroed: reads go into its spare capacity.
    buf: Option<bytes::BytesMut>,
    /// Light fills in a row (see [`LIGHT_FILLS`]).
    light_fills: u8,
}

impl Buffered {
    fn poll_read(
        &mut self,
        cx: &mut std::task::Context<'_>,
        dst: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use bytes::Buf as _;
        use std::task::{Poll, ready};
        use tokio::io::AsyncRead as _;
        if dst.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let Some(buf) = &mut self.buf else {
            ready!(std::pin::Pin::new(&mut self.tcp).poll_read(cx, dst))?;
            if dst.remaining() == 0 {
                // Filled all it was given: the socket likely holds more.
                self.buf = Some(bytes::BytesMut::with_capacity(READ_BUFFER));
                self.light_fills = 0;
            }
            return Poll::Ready(Ok(()));
        };
        if buf.is_empty() {
            // Empty and ours alone: takes back the whole allocation, copying nothing.
            buf.reserve(READ_BUFFER);
            let n = ready!(tokio_util::io::poll_read_buf(
                std::pin::Pin::new(&mut self.tcp),
                cx,
                buf
            ))?;
            if n == 0 {
                // End of stream: nothing more to buffer.
                self.buf = None;
                return Poll::Ready(Ok(()));
            }
            self.light_fills = if n < LIGHT_READ {
                self.light_fills.saturating_add(1)
            } else {
                0
            };
        }
        let n = dst.remaining().min(buf.len());
        dst.put_slice(&buf[..n]);
        buf.advance(n);
        if buf.is_empty() && self.light_fills >= LIGHT_FILLS {
            self.buf = None;
        }
        Poll::Ready(Ok(()))
    }
}

/// Wraps a connected socket for TLS (see [`READ_BUFFER`]).
pub fn transport(tcp: tokio::net::TcpStream) -> Transport {
    Transport(Some(TransportInner::Handshaking(tcp)))
}

impl Transport {
    /// Lets the connection buffer its reads from now on (see [`READ_BUFFER`]); call once
    /// the handshake has authenticated the peer. Nothing is buffered before, so nothing
    /// is lost.
    pub fn authenticated(&mut self) {
        if let Some(TransportInner::Handshaking(tcp)) = self.0.take() {
            self.0 = Some(TransportInner::Authenticated(Buffered {
                tcp,
                buf: None,
                light_fills: 0,
            }));
        }
    }

    /// The read buffer's size now: 0 until [`Transport::authenticated`], and while the
    /// connection's traffic is light.
    pub fn buffer_capacity(&self) -> usize {
        match &self.0 {
            Some(TransportInner::Authenticated(Buffered { buf: Some(_), .. })) => READ_BUFFER,
            _ => 0,
        }
    }

    /// The socket underneath.
    pub fn tcp(&self) -> &tokio::net::TcpStream {
        match self.inner() {
            TransportInner::Handshaking(tcp) => tcp,
            TransportInner::Authenticated(b) => &b.tcp,
        }
    }

    fn inner(&self) -> &TransportInner {
        #[expect(
            clippy::expect_used,
            reason = "only `authenticated` takes the inner value, and puts it back at once"
        )]
        self.0.as_ref().expect("transport is never left empty")
    }

    fn inner_mut(&mut self) -> &mut TransportInner {
        #[expect(
            clippy::expect_used,
            reason = "only `authenticated` takes the inner value, and puts it back at once"
        )]
        self.0.as_mut().expect("transport is never left empty")
    }

    /// The socket, for writing (writes are never buffered here).
    fn tcp_mut(&mut self) -> &mut tokio::net::TcpStream {
        match self.inner_mut() {
            TransportInner::Handshaking(tcp) => tcp,
            TransportInner::Authenticated(b) => &mut b.tcp,
        }
    }
}

impl tokio::io::AsyncRead for Transport {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::pin::Pin;
        match self.get_mut().inner_mut() {
            TransportInner::Handshaking(tcp) => Pin::new(tcp).poll_read(cx, buf),
            TransportInner::Authenticated(b) => b.poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Transport {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(self.get_mut().tcp_mut()).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(self.get_mut().tcp_mut()).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp().is_write_vectored()
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(self.get_mut().tcp_mut()).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(self.get_mut().tcp_mut()).poll_shutdown(cx)
    }
}

/// The largest first record [`first_record`] waits for: a TLS record's payload is at most
/// 2^14 bytes plus 256 of expansion (RFC 8446 §5.2); anything larger is rustls's to refuse.
const MAX_FIRST_RECORD: usize = 5 + (1 << 14) + 256;

/// Waits until the client's first TLS record (its ClientHello) has fully arrived, or the
/// client closed, or sent something that is no TLS handshake (rustls refuses it then). A
/// client that stops mid-record, or sends nothing, costs no TLS state: rustls gives each
/// session a 4 KiB read buffer at the first read attempt and grows it to 8 KiB when a
/// record is incomplete. The wait is kernel-side: `SO_RCVLOWAT` holds the socket's
/// readiness until the record's bytes are all queued.
pub async fn first_record(stream: &tokio::net::TcpStream) -> std::io::Result<()> {
    use std::io::{Error, ErrorKind};
    use tokio::io::Interest;
    let result = async {
        // Bytes queued at the last wakeup: a wakeup that brings none hands over to rustls
        // (which then waits its own way), so this loop can never spin.
        let mut seen = None;
        loop {
            let ready = stream.ready(Interest::READABLE).await?;
            if ready.is_read_closed() {
                return Ok(()); // The client is done sending: rustls reports the rest.
            }
            let handed_over = stream.try_io(Interest::READABLE, || {
                let queued = queued_bytes(stream)?;
                if seen.is_some_and(|s| queued <= s) {
                    return Ok(());
                }
                seen = Some(queued);
                let mut head = [std::mem::MaybeUninit::<u8>::uninit(); 5];
                let n = socket2::SockRef::from(stream).peek(&mut head)?;
                if n == 0 {
                    return Ok(()); // EOF: rustls reports it.
                }
                let mut bytes = [0u8; 5];
                for (b, h) in bytes.iter_mut().zip(&head[..n]) {
                    // SAFETY: `peek` initialised the first `n` bytes.
                    *b = unsafe { h.assume_init() };
                }
                let want = if bytes[0] != 0x16 {
                    return Ok(()); // Not a handshake record: rustls refuses it.
                } else if n < 5 {
                    5
                } else {
                    5 + usize::from(u16::from_be_bytes([bytes[3], bytes[4]]))
                };
                if want > MAX_FIRST_RECORD || queued.max(n) >= want {
                    return Ok(());
                }
                set_rcvlowat(stream, want)?;
                // Bytes that came in meanwhile may already be enough (their wakeup was
                // before the new low mark).
                if queued_bytes(stream)? >= want {
                    return Ok(());
                }
                // Clears the readiness: the next wakeup comes once `want` bytes are
                // queued, or the client closes.
                Err(Error::from(ErrorKind::WouldBlock))
            });
            match handed_over {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
    .await;
    set_rcvlowat(stream, 1)?;
    result
}

/// `FIONREAD`: bytes queued for reading.
fn queued_bytes(stream: &tokio::net::TcpStream) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd as _;
    let mut n: libc::c_int = 0;
    // SAFETY: valid socket; FIONREAD writes one int.
    let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::FIONREAD, &raw mut n) };
    if rc == 0 {
        Ok(usize::try_from(n).unwrap_or(0))
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `SO_RCVLOWAT` (socket2 does not wrap it).
fn set_rcvlowat(stream: &tokio::net::TcpStream, bytes: usize) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: valid socket and an int-sized option value.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&raw const v).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A `ServerName` for connecting to `ip`. Only satisfies the rustls API: with SNI disabled
/// it is not sent, and the verifier checks identities, not names.
pub fn server_name(ip: IpAddr) -> ServerName<'static> {
    ServerName::IpAddress(ip.into())
}

/// The SPIFFE identity of the peer's leaf certificate, once the handshake has verified it.
/// Accepts a client or server connection (both deref to `CommonState`).
pub fn peer_identity(conn: &CommonState) -> Option<Identity> {
    conn.peer_certificates()?
        .first()
        .and_then(|leaf| Identity::from_cert_der(leaf))
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::path::Path;
    use std::time::{Duration, SystemTime};

    use rustls::{CipherSuite, NamedGroup, ProtocolVersion};
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
    use tokio::time::timeout;
    use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

    use super::*;
    use crate::identity::{BuiltinCa, CertificateManager, CertificateState};

    const TD: &str = "cluster.local";

    fn id(td: &str, sa: &str) -> Identity {
        Identity::new(td, "default", sa)
    }

    fn ca(dir: &Path, td: &str) -> BuiltinCa {
        BuiltinCa::load_or_create(dir, td, Duration::from_secs(3600)).expect("built-in ca")
    }

    fn issue(ca: &BuiltinCa, td: &str, sa: &str) -> WorkloadCertificate {
        let now = SystemTime::now();
        ca.issue_with_validity(
            &id(td, sa),
            now - Duration::from_secs(60),
            now + Duration::from_secs(3600),
        )
        .expect("issue")
    }

    struct Pki {
        _dir: tempfile::TempDir,
        ca: BuiltinCa,
        other_ca: BuiltinCa,
    }

    /// Two unrelated roots; `other_ca` uses the same trust domain so only the root differs.
    fn pki() -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        Pki {
            ca: ca(&dir.path().join("a"), TD),
            other_ca: ca(&dir.path().join("b"), TD),
            _dir: dir,
        }
    }

    type Handshake = (
        io::Result<server::TlsStream<DuplexStream>>,
        io::Result<client::TlsStream<DuplexStream>>,
    );

    async fn handshake(server: Arc<ServerConfig>, client: Arc<ClientConfig>) -> Handshake {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let accept = TlsAcceptor::from(server).accept(server_io);
        // Any name works: it is neither sent nor checked.
        let connect =
            TlsConnector::from(client).connect(server_name([192, 0, 2, 7].into()), client_io);
        timeout(Duration::from_secs(10), async {
            tokio::join!(accept, connect)
        })
        .await
        .expect("handshake finished in time")
    }

    /// One round trip, proving both sides accepted each other (with TLS 1.3 the client can
    /// finish its handshake before the server has checked the client certificate).
    async fn round_trip(
        server: &mut server::TlsStream<DuplexStream>,
        client: &mut client::TlsStream<DuplexStream>,
    ) -> io::Result<()> {
        client.write_all(b"ping").await?;
        client.flush().await?;
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).await?;
        assert_eq!(&buf, b"ping");
        server.write_all(b"pong").await?;
        server.flush().await?;
        client.read_exact(&mut buf).await?;
        assert_eq!(&buf, b"pong");
        Ok(())
    }

    fn configs(
        server_cert: &WorkloadCertificate,
        client_cert: &WorkloadCertificate,
        expected: Vec<Identity>,
    ) -> (Arc<ServerConfig>, Arc<ClientConfig>) {
        (
            server_config(server_cert).expect("server config"),
            client_config(client_cert, expected).expect("client config"),
        )
    }

    fn server_error(result: Handshake) -> String {
        match result.0 {
            Ok(_) => panic!("server accepted the client"),
            Err(e) => e.to_string(),
        }
    }

    fn client_error(result: Handshake) -> String {
        match result.1 {
            Ok(_) => panic!("client accepted the server"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn provider_offers_istio_suites_and_groups_in_order() {
        let p = provider();
        let suites: Vec<CipherSuite> = p.cipher_suites.iter().map(|s| s.suite()).collect();
        assert_eq!(
            suites,
            vec![
                CipherSuite::TLS13_AES_256_GCM_SHA384,
                CipherSuite::TLS13_AES_128_GCM_SHA256
            ]
        );
        let groups: Vec<NamedGroup> = p.kx_groups.iter().map(|g| g.name()).collect();
        assert_eq!(
            groups,
            vec![
                NamedGroup::X25519,
                NamedGroup::secp256r1,
                NamedGroup::secp384r1,
                NamedGroup::X25519MLKEM768
            ]
        );
    }

    /// Writes `data` on `from` while reading as much from `to`; what `to` read.
    async fn copy_across(
        from: &mut (impl AsyncWrite + Unpin),
        to: &mut (impl AsyncRead + Unpin),
        data: &[u8],
    ) -> Vec<u8> {
        let mut got = vec![0u8; data.len()];
        let (w, r) = timeout(Duration::from_secs(10), async {
            tokio::join!(
                async {
                    from.write_all(data).await?;
                    from.flush().await
                },
                to.read_exact(&mut got)
            )
        })
        .await
        .expect("copied in time");
        w.expect("write");
        r.expect("read");
        got
    }

    /// Whether `a` is `b`'s implementation (its backend's static), not only the same suite.
    fn same_impl(a: Option<rustls::SupportedCipherSuite>, b: rustls::SupportedCipherSuite) -> bool {
        match (a, b) {
            (
                Some(rustls::SupportedCipherSuite::Tls13(a)),
                rustls::SupportedCipherSuite::Tls13(b),
            ) => std::ptr::eq(a, b),
            _ => false,
        }
    }

    #[test]
    fn record_layer_is_ring_only_where_vaes_runs_without_aws_lcs_avx512_code() {
        let cpu = |vaes, avx2, avx512| AesGcmCpu { vaes, avx2, avx512 };
        // VAES with AVX2 only: ring's VAES-AVX2 code (aws-lc's needs AVX-512).
        assert_eq!(cpu(true, true, false).record_layer(), RecordLayer::Ring);
        // aws-lc's VAES AVX-512 code runs: aws-lc.
        assert_eq!(cpu(true, true, true).record_layer(), RecordLayer::AwsLc);
        // No VAES (AES-NI only, or nothing): the same code in both; Istio's backend.
        assert_eq!(cpu(false, true, false).record_layer(), RecordLayer::AwsLc);
        assert_eq!(cpu(false, true, true).record_layer(), RecordLayer::AwsLc);
        assert_eq!(cpu(false, false, false).record_layer(), RecordLayer::AwsLc);
        assert_eq!(cpu(true, false, false).record_layer(), RecordLayer::AwsLc);
    }

    /// Which backend `provider` must have picked on this CPU, asked here the way aws-lc
    /// (`crypto_gcm_avx512_enabled`) and ring ask, not through `AesGcmCpu::detect`.
    fn expected_record_layer() -> RecordLayer {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let vaes = has!("vaes") && has!("vpclmulqdq");
            let aws_lc_avx512 = vaes
                && has!("avx512f")
                && has!("avx512dq")
                && has!("avx512ifma")
                && has!("avx512bw")
                && has!("avx512vl");
            if vaes && has!("avx2") && !aws_lc_avx512 {
                return RecordLayer::Ring;
            }
        }
        RecordLayer::AwsLc
    }

    #[tokio::test]
    async fn records_are_sealed_by_this_cpus_faster_backend_and_the_other_reads_them() {
        // Named in full, not through the module's imports, so the test does not follow them.
        let rings = [
            rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
            rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
        ];
        let aws_lcs = [
            rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
            rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
        ];
        let (ours, theirs) = match expected_record_layer() {
            RecordLayer::Ring => (rings, aws_lcs),
            RecordLayer::AwsLc => (aws_lcs, rings),
        };
        assert_eq!(record_layer(), expected_record_layer());
        let p = provider();
        assert_eq!(p.cipher_suites.len(), ours.len());
        for (suite, expected) in p.cipher_suites.iter().zip(ours) {
            assert!(
                same_impl(Some(*suite), expected),
                "{:?} is {}'s",
                suite.suite(),
                record_layer().name()
            );
        }
        // A peer whose record layer is the other backend (aws-lc's is Istio's ztunnel's
        // default build; the same groups, x25519 first), as client and as server, with
        // each suite: the same bytes on the wire.
        let pki = pki();
        let server_cert = issue(&pki.ca, TD, "server");
        let client_cert = issue(&pki.ca, TD, "client");
        for (mine, other) in ours.into_iter().zip(theirs) {
            let peer = Arc::new(CryptoProvider {
                cipher_suites: vec![other],
                ..(*p).clone()
            });
            let pairs = [
                (
                    server_config(&server_cert).expect("server config"),
                    client_config_with(&client_cert, vec![id(TD, "server")], peer.clone())
                        .expect("peer's client config"),
                    (mine, other),
                ),
                (
                    server_config_with(&server_cert, peer).expect("peer's server config"),
                    client_config(&client_cert, vec![id(TD, "server")]).expect("client config"),
                    (other, mine),
                ),
            ];
            for (server_cfg, client_cfg, (server_suite, client_suite)) in pairs {
                let (server, client) = handshake(server_cfg, client_cfg).await;
                let mut server = server.expect("server handshake");
                let mut client = client.expect("client handshake");
                // Each end sealed with its own backend's implementation of the suite.
                assert!(same_impl(
                    server.get_ref().1.negotiated_cipher_suite(),
                    server_suite
                ));
                assert!(same_impl(
                    client.get_ref().1.negotiated_cipher_suite(),
                    client_suite
                ));
                assert_eq!(
                    client
                        .get_ref()
                        .1
                        .negotiated_key_exchange_group()
                        .map(|g| g.name()),
                    Some(NamedGroup::X25519)
                );
                // Full records both ways (the bulk AES-GCM code), then small ones.
                let sent: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
                assert!(
                    copy_across(&mut client, &mut server, &sent).await == sent,
                    "the server read what the client wrote"
                );
                assert!(
                    copy_across(&mut server, &mut client, &sent).await == sent,
                    "the client read what the server wrote"
                );
                round_trip(&mut server, &mut client)
                    .await
                    .expect("round trip");
            }
        }
    }

    #[tokio::test]
    async fn good_pair_negotiates_tls13_h2_and_learns_identities() {
        let pki = pki();
        let server_cert = issue(&pki.ca, TD, "server");
        let client_cert = issue(&pki.ca, TD, "client");
        // Any member of the expected list is enough (destination, service SANs, waypoint).
        let expected = vec![id(TD, "someone-else"), id(TD, "server")];
        let (server_cfg, client_cfg) = configs(&server_cert, &client_cert, expected);
        assert!(!client_cfg.enable_sni);

        let (server, client) = handshake(server_cfg, client_cfg).await;
        let mut server = server.expect("server handshake");
        let mut client = client.expect("client handshake");
        round_trip(&mut server, &mut client)
            .await
            .expect("round trip");

        let (_, conn) = server.get_ref();
        assert_eq!(conn.protocol_version(), Some(ProtocolVersion::TLSv1_3));
        assert_eq!(conn.alpn_protocol(), Some(ALPN_H2));
        assert_eq!(
            conn.negotiated_cipher_suite().map(|s| s.suite()),
            Some(CipherSuite::TLS13_AES_256_GCM_SHA384)
        );
        assert_eq!(
            conn.negotiated_key_exchange_group().map(|g| g.name()),
            Some(NamedGroup::X25519)
        );
        assert_eq!(conn.server_name(), None, "the client must not send sni");
        assert_eq!(peer_identity(conn), Some(id(TD, "client")));

        let (_, conn) = client.get_ref();
        assert_eq!(conn.alpn_protocol(), Some(ALPN_H2));
        assert_eq!(peer_identity(conn), Some(id(TD, "server")));
    }

    #[tokio::test]
    async fn the_read_buffer_is_given_only_after_the_handshake() {
        let pki = pki();
        let (server_cfg, client_cfg) = configs(
            &issue(&pki.ca, TD, "server"),
            &issue(&pki.ca, TD, "client"),
            vec![id(TD, "server")],
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = async {
            let (tcp, _) = listener.accept().await.expect("accept");
            let io = transport(tcp);
            assert_eq!(io.buffer_capacity(), 0, "no buffer while handshaking");
            let mut tls = TlsAcceptor::from(server_cfg)
                .accept(io)
                .await
                .expect("server handshake");
            tls.get_mut().0.authenticated();
            assert_eq!(
                tls.get_ref().0.buffer_capacity(),
                0,
                "no buffer until reads need one"
            );
            let mut got = vec![0u8; 300_000];
            tls.read_exact(&mut got).await.expect("read");
            tls.write_all(&got).await.expect("echo");
            tls.flush().await.expect("flush");
        };
        let client = async {
            let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let mut tls = TlsConnector::from(client_cfg)
                .connect(server_name(addr.ip()), transport(tcp))
                .await
                .expect("client handshake");
            tls.get_mut().0.authenticated();
            let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
            tls.write_all(&data).await.expect("write");
            tls.flush().await.expect("flush");
            let mut back = vec![0u8; data.len()];
            tls.read_exact(&mut back).await.expect("read echo");
            assert!(back == data, "bytes differ after the buffer was added");
        };
        timeout(Duration::from_secs(10), async {
            tokio::join!(server, client)
        })
        .await
        .expect("finished in time");
    }

    /// Reads `n` bytes through `t` in `chunk`-sized reads, as rustls asks.
    async fn read_through(t: &mut Transport, n: usize, chunk: usize) -> Vec<u8> {
        let mut got = Vec::new();
        while got.len() < n {
            let mut buf = vec![0u8; chunk];
            let k = t.read(&mut buf).await.expect("read");
            assert!(k > 0, "end of stream after {} of {n} bytes", got.len());
            got.extend_from_slice(&buf[..k]);
        }
        got
    }

    #[tokio::test]
    async fn the_read_buffer_is_held_only_while_reads_find_more_than_asked() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let mut peer = tokio::net::TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (tcp, _) = listener.accept().await.expect("accept");
        let mut t = transport(tcp);
        t.authenticated();
        assert_eq!(t.buffer_capacity(), 0, "idle: no buffer");
        let wait = || tokio::time::sleep(Duration::from_millis(100));

        // Light traffic: each read gets less than it asked for, straight from the socket.
        peer.write_all(b"hello").await.expect("write");
        assert_eq!(read_through(&mut t, 5, 4096).await, b"hello");
        assert_eq!(t.buffer_capacity(), 0, "a light read takes no buffer");

        // A burst: the first read fills the 4 KiB asked, so the next ones go through the
        // buffer; the bytes arrive whole and in order either way.
        let burst: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 251) as u8).collect();
        peer.write_all(&burst).await.expect("write");
        wait().await;
        let first = read_through(&mut t, 4096, 4096).await;
        assert_eq!(first, burst[..4096]);
        assert_eq!(t.buffer_capacity(), READ_BUFFER, "busy: buffered");
        let rest = read_through(&mut t, burst.len() - 4096, 4096).await;
        assert!(rest == burst[4096..], "the buffered bytes differ");

        // Light again: the buffer stays through a few light fills (traffic that comes and
        // goes does not allocate it at every burst), then goes.
        for i in 1..=LIGHT_FILLS {
            peer.write_all(b"bye").await.expect("write");
            wait().await;
            assert_eq!(read_through(&mut t, 3, 4096).await, b"bye");
            let want = if i < LIGHT_FILLS { READ_BUFFER } else { 0 };
            assert_eq!(t.buffer_capacity(), want, "after {i} light fills");
        }

        // End of stream reads as such, buffered or not.
        drop(peer);
        let mut buf = [0u8; 16];
        assert_eq!(t.read(&mut buf).await.expect("read"), 0);
        assert_eq!(t.buffer_capacity(), 0);
    }

    #[tokio::test]
    async fn first_record_waits_for_the_whole_client_hello_record() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        async fn waiting(s: &tokio::net::TcpStream) -> bool {
            timeout(Duration::from_millis(200), first_record(s))
                .await
                .is_err()
        }
        assert!(waiting(&server).await, "nothing sent yet");
        // Two bytes of the header, then the header announcing 10 bytes and 4 of them.
        client.write_all(&[0x16, 0x03]).await.expect("write");
        assert!(waiting(&server).await, "half a header");
        client
            .write_all(&[0x01, 0x00, 0x0a, 1, 2, 3, 4])
            .await
            .expect("write");
        assert!(waiting(&server).await, "4 of 10 bytes");
        client.write_all(&[5, 6, 7, 8, 9, 10]).await.expect("write");
        timeout(Duration::from_secs(5), first_record(&server))
            .await
            .expect("the whole record is there")
            .expect("no error");
        // The low mark is back to 1 for rustls, and nothing was consumed.
        let mut got = [0u8; 15];
        let mut server = server;
        server.read_exact(&mut got).await.expect("read");
        assert_eq!(got[..5], [0x16, 0x03, 0x01, 0x00, 0x0a]);

        // A client that stops mid-record and then closes is handed over (rustls reports
        // the truncated record) instead of being waited for.
        let mut half = tokio::net::TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server_half, _) = listener.accept().await.expect("accept");
        half.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 1, 2])
            .await
            .expect("write");
        assert!(waiting(&server_half).await, "7 of 517 bytes");
        drop(half);
        timeout(Duration::from_secs(5), first_record(&server_half))
            .await
            .expect("closed mid-record: no wait")
            .expect("no error");

        // A closed client and a non-TLS one are handed over at once.
        let mut other = tokio::net::TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        other.write_all(b"GET / HTTP/1.1\r\n").await.expect("write");
        timeout(Duration::from_secs(5), first_record(&server))
            .await
            .expect("not tls: no wait")
            .expect("no error");
        drop(other);
        let eof = tokio::net::TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        drop(eof);
        timeout(Duration::from_secs(5), first_record(&server))
            .await
            .expect("eof: no wait")
            .expect("no error");
    }

    #[tokio::test]
    async fn server_with_unexpected_identity_is_rejected() {
        let pki = pki();
        let server_cert = issue(&pki.ca, TD, "server");
        let client_cert = issue(&pki.ca, TD, "client");
        let (server_cfg, client_cfg) = configs(&server_cert, &client_cert, vec![id(TD, "db")]);
        let err = client_error(handshake(server_cfg, client_cfg).await);
        assert!(
            err.contains(
                "server certificate identity spiffe://cluster.local/ns/default/sa/server \
                 is not one of [spiffe://cluster.local/ns/default/sa/db]"
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn same_root_client_from_another_trust_domain_is_rejected() {
        let pki = pki();
        let server_cert = issue(&pki.ca, TD, "server");
        // Chains to the server's root, so only the trust domain rule can reject it.
        let client_cert = issue(&pki.ca, "other.domain", "client");
        let (server_cfg, client_cfg) = configs(&server_cert, &client_cert, vec![id(TD, "server")]);
        let err = server_error(handshake(server_cfg, client_cfg).await);
        assert!(
            err.contains("client trust domain other.domain does not match cluster.local"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn client_from_another_ca_and_trust_domain_is_rejected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let server_ca = ca(&dir.path().join("a"), TD);
        let client_ca = ca(&dir.path().join("b"), "other.domain");
        let server_cert = issue(&server_ca, TD, "server");
        let client_cert = issue(&client_ca, "other.domain", "client");
        // The client trusts the server's root too, so the server is the one that says no.
        let client_cert = WorkloadCertificate {
            roots: vec![server_ca.root().clone(), client_ca.root().clone()],
            ..client_cert
        };
        let (server_cfg, client_cfg) = configs(&server_cert, &client_cert, vec![id(TD, "server")]);
        let err = server_error(handshake(server_cfg, client_cfg).await);
        assert!(err.contains("UnknownIssuer"), "{err}");
    }

    #[tokio::test]
    async fn server_from_unknown_root_is_rejected() {
        let pki = pki();
        let server_cert = issue(&pki.other_ca, TD, "server");
        let client_cert = issue(&pki.ca, TD, "client");
        let (server_cfg, client_cfg) = configs(&server_cert, &client_cert, vec![id(TD, "server")]);
        let err = client_error(handshake(server_cfg, client_cfg).await);
        // Both roots have the same subject (the trust domain names it), so webpki finds the
        // "issuer" by name and then fails on its signature.
        assert!(
            err.contains("BadSignature") || err.contains("UnknownIssuer"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn expired_certificates_are_rejected_both_ways() {
        let pki = pki();
        let now = SystemTime::now();
        let expired = |sa| {
            pki.ca
                .issue_with_validity(
                    &id(TD, sa),
                    now - Duration::from_secs(7200),
                    now - Duration::from_secs(3600),
                )
                .expect("issue expired")
        };
        let good_server = issue(&pki.ca, TD, "server");
        let good_client = issue(&pki.ca, TD, "client");

        let (server_cfg, client_cfg) =
            configs(&expired("server"), &good_client, vec![id(TD, "server")]);
        let err = client_error(handshake(server_cfg, client_cfg).await);
        assert!(err.contains("expired"), "{err}");

        let (server_cfg, client_cfg) =
            configs(&good_server, &expired("client"), vec![id(TD, "server")]);
        let err = server_error(handshake(server_cfg, client_cfg).await);
        assert!(err.contains("expired"), "{err}");
    }

    #[tokio::test]
    async fn client_without_certificate_is_rejected() {
        let pki = pki();
        let server_cert = issue(&pki.ca, TD, "server");
        let verifier = IdentityVerifier::new(
            root_store(&server_cert).expect("roots"),
            vec![id(TD, "server")],
            provider(),
        );
        let mut client_cfg = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(TLS13_ONLY)
            .expect("tls 1.3")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        client_cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
        client_cfg.enable_sni = false;

        let server_cfg = server_config(&server_cert).expect("server config");
        let (server, client) = handshake(server_cfg, Arc::new(client_cfg)).await;
        let err = match server {
            Ok(_) => panic!("server accepted a client without a certificate"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("no certificates"), "{err}");
        // The client learns it from the alert at the latest when it reads.
        if let Ok(mut client) = client {
            let mut buf = [0u8; 1];
            assert!(client.read(&mut buf).await.is_err());
        }
    }

    #[test]
    fn client_config_needs_expected_identities_and_roots() {
        let pki = pki();
        let cert = issue(&pki.ca, TD, "client");
        let err = client_config(&cert, Vec::new()).expect_err("empty expected list");
        assert!(matches!(err, Error::NoExpectedIdentities { .. }), "{err}");

        let cert = WorkloadCertificate {
            roots: Vec::new(),
            ..cert
        };
        let err = client_config(&cert, vec![id(TD, "server")]).expect_err("no roots");
        assert!(matches!(err, Error::NoRoots { .. }), "{err}");

        let cert = WorkloadCertificate {
            roots: vec![b"not a certificate".to_vec().into()],
            ..cert
        };
        let err = server_config(&cert).expect_err("bad root");
        assert!(
            err.to_string().contains("unusable root certificate"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn cached_client_config_is_reused_until_the_certificate_is_renewed() {
        let pki = pki();
        let server_cfg = server_config(&issue(&pki.ca, TD, "server")).expect("server config");
        let expected = [id(TD, "server")];
        let cache = ClientConfigs::new(8);
        let cert = Arc::new(issue(&pki.ca, TD, "client"));
        let first = cache.get(&cert, &expected).expect("config");
        let again = cache.get(&cert, &expected).expect("config");
        assert!(
            Arc::ptr_eq(&first, &again),
            "the same certificate built a second config"
        );
        // The same certificate in another allocation (the manager's copy of it) too.
        let copy = Arc::new(WorkloadCertificate {
            identity: cert.identity.clone(),
            chain: cert.chain.clone(),
            key: cert.key.clone_key(),
            roots: cert.roots.clone(),
            not_before: cert.not_before,
            not_after: cert.not_after,
        });
        assert!(Arc::ptr_eq(
            &first,
            &cache.get(&copy, &expected).expect("config")
        ));

        let renewed = Arc::new(issue(&pki.ca, TD, "client"));
        assert_ne!(renewed.chain, cert.chain);
        let new = cache.get(&renewed, &expected).expect("config");
        assert!(
            !Arc::ptr_eq(&first, &new),
            "a renewed certificate got the old config"
        );
        assert_eq!(
            cache.len(),
            1,
            "the renewed certificate's config replaces the old one"
        );
        // The new config presents the new certificate.
        let (server, client) = handshake(server_cfg, new).await;
        client.expect("client handshake");
        let server = server.expect("server handshake");
        let presented = server
            .get_ref()
            .1
            .peer_certificates()
            .expect("client chain")[0]
            .clone();
        assert_eq!(presented, renewed.chain[0]);
    }

    #[tokio::test]
    async fn cached_client_configs_differ_by_expected_identities() {
        let pki = pki();
        let server_cert = issue(&pki.ca, TD, "server");
        let cache = ClientConfigs::new(8);
        let cert = Arc::new(issue(&pki.ca, TD, "client"));
        let to_db = cache.get(&cert, &[id(TD, "db")]).expect("config");
        let to_server = cache.get(&cert, &[id(TD, "server")]).expect("config");
        assert!(!Arc::ptr_eq(&to_db, &to_server));
        assert_eq!(cache.len(), 2);
        let server_cfg = server_config(&server_cert).expect("server config");
        let err = client_error(handshake(server_cfg.clone(), to_db).await);
        assert!(err.contains("is not one of"), "{err}");
        handshake(server_cfg, to_server)
            .await
            .1
            .expect("the config expecting the server's identity accepts it");
        // An unusable request is refused, not cached.
        let err = cache.get(&cert, &[]).expect_err("no expected identities");
        assert!(matches!(err, Error::NoExpectedIdentities { .. }), "{err}");
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn cached_client_configs_stay_within_the_limit_dropping_the_least_recently_used() {
        let pki = pki();
        let cache = ClientConfigs::new(2);
        let a = Arc::new(issue(&pki.ca, TD, "a"));
        let b = Arc::new(issue(&pki.ca, TD, "b"));
        let c = Arc::new(issue(&pki.ca, TD, "c"));
        let to = [id(TD, "server")];
        let a1 = cache.get(&a, &to).expect("config");
        let b1 = cache.get(&b, &to).expect("config");
        // `a` is used again, so `b` is the least recently used when `c` arrives.
        cache.get(&a, &to).expect("config");
        cache.get(&c, &to).expect("config");
        assert_eq!(cache.len(), 2);
        assert!(Arc::ptr_eq(&a1, &cache.get(&a, &to).expect("config")));
        assert!(
            !Arc::ptr_eq(&b1, &cache.get(&b, &to).expect("config")),
            "b was kept"
        );
        assert_eq!(cache.len(), 2);
        // Many more sources: still two.
        for sa in ["d", "e", "f", "g"] {
            cache
                .get(&Arc::new(issue(&pki.ca, TD, sa)), &to)
                .expect("config");
            assert_eq!(cache.len(), 2);
        }
    }

    #[tokio::test]
    async fn renewal_leaves_established_connections_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Arc::new(
            BuiltinCa::load_or_create(dir.path(), TD, Duration::from_secs(2)).expect("ca"),
        );
        let manager = CertificateManager::new(ca.clone());
        let server_id = id(TD, "server");
        let old_server = manager.get(&server_id).await.expect("server cert");
        // Long-lived, so only the server side renews during the test.
        let client_cert = issue(&ca, TD, "client");
        let mut updates = manager.subscribe(&server_id).await;
        updates.borrow_and_update();

        let (server_cfg, client_cfg) = configs(&old_server, &client_cert, vec![server_id.clone()]);
        let (server, client) = handshake(server_cfg, client_cfg.clone()).await;
        let (mut old_conn_server, mut old_conn_client) = (
            server.expect("server handshake"),
            client.expect("client handshake"),
        );

        timeout(Duration::from_secs(3), updates.changed())
            .await
            .expect("renewed in time")
            .expect("subscribed");
        let CertificateState::Available(new_server) = updates.borrow().clone() else {
            panic!("renewal published no certificate");
        };
        assert_ne!(new_server.chain, old_server.chain);

        // The connection made with the old certificate keeps working...
        round_trip(&mut old_conn_server, &mut old_conn_client)
            .await
            .expect("old connection survives renewal");
        // ...and new connections use the new one.
        let (server, client) =
            handshake(server_config(&new_server).expect("config"), client_cfg).await;
        let (mut server, mut client) = (server.expect("server"), client.expect("client"));
        round_trip(&mut server, &mut client)
            .await
            .expect("new connection");
        let leaf = client.get_ref().1.peer_certificates().expect("peer certs")[0].clone();
        assert_eq!(leaf, new_server.chain[0]);
    }
}
