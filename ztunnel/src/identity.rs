//! Workload identities and their certificates: the SPIFFE [`Identity`] carried in a URI SAN,
//! the [`WorkloadCertificate`] a workload presents, the [`CertificateSource`] seam that CA
//! clients plug into (the [`BuiltinCa`] today; the Istio CA and mounted files later), and the
//! [`CertificateManager`] that caches certificates per identity and renews them at half-life.
//!
//! The identity rules follow Istio's ztunnel (`src/identity.rs`, `src/tls/certificate.rs`):
//! an identity is exactly `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`, and a
//! certificate's identity is its first URI SAN of that form; DNS/IP SANs and the subject are
//! ignored.

mod ca;
mod manager;

pub use ca::{BuiltinCa, DEFAULT_LIFETIME, ROOT_CERT_FILE, ROOT_KEY_FILE};
pub use manager::{CertificateManager, CertificateSnapshot, CertificateState};

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::error::X509Error;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{ASN1Time, FromDer, X509Certificate};

const SPIFFE_PREFIX: &str = "spiffe://";

/// Errors of the identity module: parsing identities and certificates, the built-in CA and the
/// certificate manager.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "invalid identity {input:?}: {reason} (expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>)"
    )]
    InvalidIdentity { input: String, reason: &'static str },

    #[error("failed to parse {what}: {problem}")]
    ParseCertificate { what: String, problem: String },

    #[error("{what} has no spiffe uri san")]
    NoSpiffeIdentity { what: String },

    #[error("{what} has a validity time that is out of range")]
    ValidityOutOfRange { what: String },

    #[error("workload certificate chain is empty: the leaf certificate is missing")]
    EmptyChain,

    #[error("workload certificate for {identity} has no root certificates")]
    NoRoots { identity: Identity },

    #[error("failed to {action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("built-in ca file {} is not usable pem: {problem}", path.display())]
    RootPem { path: PathBuf, problem: String },

    #[error("built-in ca file {} is not a valid certificate: {problem}", path.display())]
    RootCertificate { path: PathBuf, problem: String },

    #[error(
        "built-in ca key {} is accessible by others (mode {mode:04o}): a private key must be readable by its owner only, as ssh requires of its keys; fix it with `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    KeyPermissions { path: PathBuf, mode: u32 },

    #[error("built-in ca file {} holds an unusable key", path.display())]
    RootKey {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },

    #[error("built-in ca file {} is unusable: {reason}", path.display())]
    RootUnusable { path: PathBuf, reason: String },

    #[error(
        "found {} but not {}: restore the missing file, or remove both to generate a new root",
        present.display(),
        missing.display()
    )]
    RootIncomplete { present: PathBuf, missing: PathBuf },

    #[error(
        "timed out after {waited:?} waiting for the lock {} while another ztunnel creates the built-in ca root; if none is running, check what holds it (`fuser {}`)",
        path.display(),
        path.display()
    )]
    CaLocked { path: PathBuf, waited: Duration },

    #[error("built-in ca failed to {action}")]
    Generate {
        action: String,
        #[source]
        source: rcgen::Error,
    },

    #[error(
        "certificate lifetime {lifetime:?} is invalid: it must be between one second and the root's ten years"
    )]
    InvalidLifetime { lifetime: Duration },

    #[error(
        "certificate validity for {identity} is invalid: not_after must be after not_before, both between 1970 and 9999"
    )]
    InvalidValidity { identity: Identity },

    #[error("built-in ca for trust domain {trust_domain} does not issue for {identity}")]
    ForeignTrustDomain {
        identity: Identity,
        trust_domain: String,
    },

    #[error("certificate for {identity} is unavailable")]
    Unavailable {
        identity: Identity,
        #[source]
        source: Arc<Error>,
    },

    #[error("certificate for {identity} expired {} s ago and has not been renewed yet", expired_for.as_secs())]
    Expired {
        identity: Identity,
        expired_for: Duration,
    },

    #[error("ca at {address} failed to issue a certificate for {identity}")]
    RemoteCa {
        address: String,
        identity: Identity,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    #[error(
        "certificate for {identity} was forgotten (or its fetcher stopped) while being fetched"
    )]
    Forgotten { identity: Identity },
}

/// A SPIFFE workload identity: `spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl Identity {
    pub fn new(
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Self {
        Self {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        }
    }

    /// The identity of a DER certificate: its first URI SAN that is a SPIFFE identity.
    /// `None` when the certificate does not parse or carries no such SAN.
    pub fn from_cert_der(der: &[u8]) -> Option<Identity> {
        Self::all_from_cert_der(der).into_iter().next()
    }

    /// Every URI SAN of a DER certificate that is a SPIFFE identity, in certificate order.
    ///
    /// The TLS verifiers accept a peer when any of these matches, as Istio's ztunnel does;
    /// URI SANs of other forms are skipped rather than failing the certificate.
    pub fn all_from_cert_der(der: &[u8]) -> Vec<Identity> {
        match X509Certificate::from_der(der) {
            Ok((_, cert)) => identities_of(&cert),
            Err(_) => Vec::new(),
        }
    }
}

fn identities_of(cert: &X509Certificate<'_>) -> Vec<Identity> {
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => uri.parse().ok(),
            _ => None,
        })
        .collect()
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SPIFFE_PREFIX}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for Identity {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = |reason| Error::InvalidIdentity {
            input: s.to_owned(),
            reason,
        };
        let rest = s
            .strip_prefix(SPIFFE_PREFIX)
            .ok_or_else(|| invalid("it does not start with spiffe://"))?;
        let parts: Vec<&str> = rest.split('/').collect();
        let [trust_domain, "ns", namespace, "sa", service_account] = parts[..] else {
            return Err(invalid(
                "the path is not exactly <trust-domain>/ns/<namespace>/sa/<service-account>",
            ));
        };
        if trust_domain.is_empty() {
            return Err(invalid("the trust domain is empty"));
        }
        if namespace.is_empty() {
            return Err(invalid("the namespace is empty"));
        }
        if service_account.is_empty() {
            return Err(invalid("the service account is empty"));
        }
        Ok(Identity::new(trust_domain, namespace, service_account))
    }
}

// Config, xDS and the admin dump carry identities as their URI string.
impl serde::Serialize for Identity {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Identity {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The certificate a workload presents: its identity, its chain and key, and the roots its
/// peers must chain to.
pub struct WorkloadCertificate {
    pub identity: Identity,
    /// The leaf first, then intermediates (never the roots).
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key (PKCS#8).
    pub key: PrivateKeyDer<'static>,
    /// Trust anchors for peers' chains.
    pub roots: Vec<CertificateDer<'static>>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl WorkloadCertificate {
    /// Builds a workload certificate from a CA answer: the identity and validity are read from
    /// the leaf (`chain[0]`), so they always agree with what peers will see.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Self, Error> {
        let leaf = chain.first().ok_or(Error::EmptyChain)?;
        let what = || "workload leaf certificate".to_owned();
        let (_, cert) = X509Certificate::from_der(leaf).map_err(|e| Error::ParseCertificate {
            what: what(),
            problem: der_problem(e),
        })?;
        let identity = identities_of(&cert)
            .into_iter()
            .next()
            .ok_or_else(|| Error::NoSpiffeIdentity { what: what() })?;
        if roots.is_empty() {
            return Err(Error::NoRoots { identity });
        }
        let validity = cert.validity();
        let (Some(not_before), Some(not_after)) = (
            system_time(&validity.not_before),
            system_time(&validity.not_after),
        ) else {
            return Err(Error::ValidityOutOfRange { what: what() });
        };
        Ok(Self {
            identity,
            chain,
            key,
            roots,
            not_before,
            not_after,
        })
    }

    /// When to renew: half way through the lifetime (Istio's `src/identity/manager.rs`), so a
    /// CA outage has the other half to recover in before the certificate expires.
    pub fn refresh_at(&self) -> SystemTime {
        match self.not_after.duration_since(self.not_before) {
            Ok(lifetime) => self.not_before + lifetime / 2,
            Err(_) => self.not_before,
        }
    }

    /// Whole seconds left until `not_after`; 0 once expired.
    pub fn expiry_seconds(&self, now: SystemTime) -> u64 {
        self.not_after
            .duration_since(now)
            .map(|left| left.as_secs())
            .unwrap_or(0)
    }

    pub fn is_expired(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }

    /// The leaf and intermediates as concatenated PEM.
    pub fn chain_pem(&self) -> String {
        self.chain.iter().map(|c| certificate_pem(c)).collect()
    }

    /// The roots as concatenated PEM.
    pub fn roots_pem(&self) -> String {
        self.roots.iter().map(|c| certificate_pem(c)).collect()
    }
}

// Hand-written so the private key can never end up in a log line.
impl fmt::Debug for WorkloadCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadCertificate")
            .field("identity", &self.identity.to_string())
            .field("chain_len", &self.chain.len())
            .field("roots_len", &self.roots.len())
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// The future a [`CertificateSource`] returns.
pub type CertificateFuture<'a> =
    Pin<Box<dyn Future<Output = Result<WorkloadCertificate, Error>> + Send + 'a>>;

/// Where workload certificates come from: the built-in CA, the Istio CA, mounted files.
/// Object safe so the [`CertificateManager`] can hold any of them as `Arc<dyn _>`.
pub trait CertificateSource: Send + Sync {
    /// Issues (or loads) a fresh certificate for `id`.
    fn fetch<'a>(&'a self, id: &'a Identity) -> CertificateFuture<'a>;
}

/// PEM-encodes a DER certificate (RFC 7468: base64 in 64-character lines).
pub fn certificate_pem(der: &[u8]) -> String {
    pem_encode("CERTIFICATE", der)
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 0x3f) as usize]));
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    // The alphabet is ASCII, so every 64-byte chunk is valid UTF-8.
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn system_time(t: &ASN1Time) -> Option<SystemTime> {
    let secs = t.timestamp();
    if secs >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_secs(secs.unsigned_abs()))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_secs(secs.unsigned_abs()))
    }
}

/// What is wrong with a certificate's DER, in words (x509-parser's own texts are nom's:
/// "nom error: Eof").
pub fn der_problem(e: x509_parser::nom::Err<X509Error>) -> String {
    use x509_parser::{der_parser::error::BerError, nom::error::ErrorKind};
    let e = match e {
        x509_parser::nom::Err::Incomplete(_) => return TRUNCATED_DER.to_owned(),
        x509_parser::nom::Err::Error(e) | x509_parser::nom::Err::Failure(e) => e,
    };
    match e {
        X509Error::NomError(ErrorKind::Eof) | X509Error::Der(BerError::Incomplete(_)) => {
            TRUNCATED_DER.to_owned()
        }
        X509Error::NomError(kind) => {
            format!("it is not an X.509 certificate (parse step {kind:?} failed)")
        }
        X509Error::Der(e) => format!("its DER encoding is invalid ({e})"),
        e => format!("it is not a valid X.509 certificate ({e})"),
    }
}

const TRUNCATED_DER: &str = "it is cut short: the data ends inside the certificate";

/// What is wrong with a PEM text, in words (the pem parser's own texts print the missing
/// marker as a list of byte values). `label` is the section expected (`CERTIFICATE`).
pub fn pem_problem(e: &rustls_pki_types::pem::Error, label: &str) -> String {
    use rustls_pki_types::pem::Error as Pem;
    match e {
        Pem::MissingSectionEnd { end_marker } => format!(
            "it is cut short: the \"-----END {}-----\" line is missing",
            String::from_utf8_lossy(end_marker).trim()
        ),
        Pem::IllegalSectionStart { line } => format!(
            "line {:?} is not a valid \"-----BEGIN …-----\" line",
            String::from_utf8_lossy(line)
        ),
        Pem::Base64Decode(e) => format!("its base64 text is damaged ({e})"),
        Pem::NoItemsFound => format!("it holds no \"-----BEGIN {label}-----\" section"),
        Pem::SectionTooLarge => "a pem section is larger than 256 MB".to_owned(),
        e => e.to_string(),
    }
}

/// Every certificate of a PEM text, each checked to parse as X.509. Errors say which
/// certificate (1-based) and what is wrong with it.
pub fn certificates_from_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls_pki_types::pem::PemObject as _;
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_problem(&e, "CERTIFICATE"))?;
    if certs.is_empty() {
        return Err(pem_problem(
            &rustls_pki_types::pem::Error::NoItemsFound,
            "CERTIFICATE",
        ));
    }
    for (i, c) in certs.iter().enumerate() {
        X509Certificate::from_der(c).map_err(|e| {
            format!(
                "certificate {} of {}: {}",
                i + 1,
                certs.len(),
                der_problem(e)
            )
        })?;
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_round_trips_through_its_uri() {
        let id: Identity = "spiffe://cluster.local/ns/default/sa/bookinfo"
            .parse()
            .expect("valid identity");
        assert_eq!(id, Identity::new("cluster.local", "default", "bookinfo"));
        assert_eq!(
            id.to_string(),
            "spiffe://cluster.local/ns/default/sa/bookinfo"
        );
    }

    #[test]
    fn malformed_identities_are_rejected() {
        let cases = [
            ("spiffe://td/ns/default/sa", "not exactly"),
            ("spiffe://td/ns/default/sa/a/b", "not exactly"),
            ("spiffe://td/default/sa/a", "not exactly"),
            ("spiffe://td/ns/default/xx/a", "not exactly"),
            ("spiffe://td/xx/default/sa/a", "not exactly"),
            ("http://td/ns/default/sa/a", "spiffe://"),
            ("SPIFFE://td/ns/default/sa/a", "spiffe://"),
            ("td/ns/default/sa/a", "spiffe://"),
            ("", "spiffe://"),
            ("spiffe:///ns/default/sa/a", "trust domain is empty"),
            ("spiffe://td/ns//sa/a", "namespace is empty"),
            ("spiffe://td/ns/default/sa/", "service account is empty"),
        ];
        for (input, want) in cases {
            match input.parse::<Identity>() {
                Ok(id) => panic!("{input:?} parsed as {id}"),
                Err(e) => {
                    let msg = e.to_string();
                    assert!(msg.contains(want), "{input:?}: {msg}");
                    assert!(msg.contains(&format!("{input:?}")), "{input:?}: {msg}");
                }
            }
        }
    }

    #[test]
    fn identity_serializes_as_its_uri() {
        let id = Identity::new("td", "ns1", "sa1");
        let json = serde_json::to_string(&id).expect("serialize");
        assert_eq!(json, "\"spiffe://td/ns/ns1/sa/sa1\"");
        let back: Identity = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, id);
        assert!(serde_json::from_str::<Identity>("\"spiffe://td/ns/x\"").is_err());
    }

    fn cert_with_sans(sans: Vec<rcgen::SanType>) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = sans;
        params.self_signed(&key).expect("self-signed").der().clone()
    }

    fn uri(s: &str) -> rcgen::SanType {
        rcgen::SanType::URI(s.try_into().expect("ia5 uri"))
    }

    #[test]
    fn certificate_identity_is_first_spiffe_uri_san() {
        let der = cert_with_sans(vec![
            rcgen::SanType::DnsName("spiffe.example".try_into().expect("dns")),
            uri("https://example.com/not-spiffe"),
            uri("spiffe://td/ns/a/sa/first"),
            uri("spiffe://td/ns/a/sa/second"),
        ]);
        assert_eq!(
            Identity::from_cert_der(&der),
            Some(Identity::new("td", "a", "first"))
        );
        assert_eq!(Identity::all_from_cert_der(&der).len(), 2);
    }

    #[test]
    fn certificate_without_spiffe_san_has_no_identity() {
        let der = cert_with_sans(vec![
            rcgen::SanType::DnsName("td".try_into().expect("dns")),
            uri("spiffe://td/ns/a/sa"),
        ]);
        assert_eq!(Identity::from_cert_der(&der), None);
        assert_eq!(Identity::from_cert_der(b"not a certificate"), None);
    }

    #[test]
    fn refresh_is_at_half_life_and_expiry_counts_down() {
        let not_before = UNIX_EPOCH + Duration::from_secs(1_000);
        let cert = WorkloadCertificate {
            identity: Identity::new("td", "ns", "sa"),
            chain: Vec::new(),
            key: PrivateKeyDer::Pkcs8(Vec::new().into()),
            roots: Vec::new(),
            not_before,
            not_after: not_before + Duration::from_secs(100),
        };
        assert_eq!(cert.refresh_at(), not_before + Duration::from_secs(50));
        assert_eq!(
            cert.expiry_seconds(not_before + Duration::from_secs(30)),
            70
        );
        assert_eq!(
            cert.expiry_seconds(not_before + Duration::from_secs(300)),
            0
        );
        assert!(cert.is_expired(not_before + Duration::from_secs(100)));
        assert!(!format!("{cert:?}").contains("key"));
    }

    #[test]
    fn pem_encoding_matches_rcgen() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let cert = rcgen::CertificateParams::default()
            .self_signed(&key)
            .expect("self-signed");
        assert_eq!(
            certificate_pem(cert.der()),
            cert.pem().replace("\r\n", "\n")
        );
        for len in 0usize..5 {
            let data: Vec<u8> = (0..len).map(|i| i as u8 * 77).collect();
            let pem = pem_encode("X", &data);
            let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
            assert_eq!(body.len(), len.div_ceil(3) * 4, "{pem}");
        }
        assert_eq!(
            pem_encode("X", b"foob"),
            "-----BEGIN X-----\nZm9vYg==\n-----END X-----\n"
        );
    }
}
