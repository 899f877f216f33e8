//! Istio's CA answer: an `IstioCertificateResponse` read by [`parse_answer`] into a
//! workload certificate (PEM, X.509, the SPIFFE identity, validity), and an accepted one
//! used as ztunnel uses it: TLS server and client configs, renewal time, the admin dump.
//!
//! Input: the response's protobuf encoding. The key and identity asked for are fixed per
//! process; the seeds are answers the built-in CA issues for them (leaf and root; the
//! leaf alone, roots then coming from `--istio-root-cert`; another identity's leaf).
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use prost::Message as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::identity::{BuiltinCa, Identity, WorkloadCertificate, certificate_pem};
use crate::istio::ca_client::parse_answer;
use crate::istio::proto::ca::IstioCertificateResponse;
use crate::tls;

/// What the harness asks for and trusts, and what the seeds answer with.
struct Fixture {
    id: Identity,
    key: PrivateKeyDer<'static>,
    root: CertificateDer<'static>,
    leaf_pem: String,
    root_pem: String,
    other_leaf_pem: String,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let (cert, key) =
            BuiltinCa::generate_root_pem("cluster.local").expect("generate a test root");
        let ca = BuiltinCa::from_pem(
            "fuzz",
            cert.as_bytes(),
            key.as_bytes(),
            "cluster.local",
            Duration::from_secs(3600),
        )
        .expect("load the test root");
        let id: Identity = "spiffe://cluster.local/ns/shop/sa/web"
            .parse()
            .expect("valid identity");
        let other: Identity = "spiffe://cluster.local/ns/shop/sa/db"
            .parse()
            .expect("valid identity");
        let leaf = ca.issue(&id).expect("issue the test leaf");
        let other_leaf = ca.issue(&other).expect("issue the other leaf");
        Fixture {
            id,
            key: leaf.key.clone_key(),
            root: ca.root().clone(),
            leaf_pem: certificate_pem(&leaf.chain[0]),
            root_pem: certificate_pem(ca.root()),
            other_leaf_pem: certificate_pem(&other_leaf.chain[0]),
        }
    })
}

pub fn run(data: &[u8]) {
    let Ok(answer) = IstioCertificateResponse::decode(data) else {
        return;
    };
    let f = fixture();
    let fallback = std::slice::from_ref(&f.root);
    let Ok(cert) = parse_answer(&answer.cert_chain, f.key.clone_key(), &f.id, fallback) else {
        return;
    };
    assert_eq!(
        cert.identity, f.id,
        "accepted a certificate for another identity"
    );
    use_certificate(&cert);
}

/// What the certificate manager, the proxy and the admin API do with a new certificate.
fn use_certificate(cert: &WorkloadCertificate) {
    let _ = tls::server_config(cert);
    let _ = tls::client_config(cert, vec![cert.identity.clone()]);
    let _ = cert.refresh_at();
    let _ = cert.expiry_seconds(SystemTime::now());
    let _ = cert.is_expired(SystemTime::now());
    let _ = (cert.chain_pem(), cert.roots_pem(), format!("{cert:?}"));
}

fn answer(chain: &[&str]) -> Vec<u8> {
    IstioCertificateResponse {
        cert_chain: chain.iter().map(|s| (*s).to_owned()).collect(),
    }
    .encode_to_vec()
}

pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let f = fixture();
    let both = format!("{}{}", f.leaf_pem, f.root_pem);
    vec![
        ("leaf-root", answer(&[&f.leaf_pem, &f.root_pem])),
        ("leaf-only", answer(&[&f.leaf_pem])),
        (
            "leaf-root-root",
            answer(&[&f.leaf_pem, &f.root_pem, &f.root_pem]),
        ),
        ("one-element-two-pems", answer(&[&both, &f.root_pem])),
        ("other-identity", answer(&[&f.other_leaf_pem, &f.root_pem])),
        ("not-pem", answer(&["not pem", &f.root_pem])),
        ("empty", answer(&[])),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_give_certificates_the_proxy_can_serve_with() {
        let f = fixture();
        let mut served = 0;
        for (name, seed) in seeds() {
            let answer = IstioCertificateResponse::decode(seed.as_slice()).expect("decodes");
            let cert = parse_answer(
                &answer.cert_chain,
                f.key.clone_key(),
                &f.id,
                std::slice::from_ref(&f.root),
            );
            if let Ok(cert) = cert {
                tls::server_config(&cert).unwrap_or_else(|e| panic!("seed {name}: {e}"));
                served += 1;
            }
            run(&seed);
        }
        // leaf-root, leaf-only, leaf-root-root, one-element-two-pems.
        assert_eq!(served, 4);
    }
}
