//! The built-in CA: a self-signed ECDSA P-256 root kept on disk that issues workload
//! certificates in-process, for clusters (and tests) without an Istio CA.
//!
//! The root is generated once and never overwritten: every certificate it ever issued chains
//! to it, so replacing it silently would break peers that still trust the old one. Leaves look
//! like what Istio's CA issues for a ztunnel CSR (`src/tls/csr.rs`): an empty subject, one
//! critical URI SAN, serverAuth + clientAuth.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
    PublicKeyData, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_parser::asn1_rs::Tag;
use x509_parser::prelude::{FromDer, X509Certificate, X509Name};

use super::{CertificateFuture, CertificateSource, Error, Identity, WorkloadCertificate};

/// File name of the root certificate (PEM) inside the CA directory.
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
/// File name of the root private key (PKCS#8 PEM, mode 0600) inside the CA directory.
pub const ROOT_KEY_FILE: &str = "root-key.pem";
/// Leaf lifetime Istio's ztunnel requests by default.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);

const ROOT_COMMON_NAME: &str = "ztunnel built-in root";
const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
/// Certificates start this much in the past so peers with a slightly slow clock accept them.
const MAX_BACKDATE: Duration = Duration::from_secs(60);
/// 9999-12-31T23:59:59Z, the last time a certificate can encode (RFC 5280 §4.1.2.5).
const LATEST_X509_TIME: i64 = 253_402_300_799;
/// The file whose `flock` serializes the first start of ztunnels sharing a CA directory.
pub const LOCK_FILE: &str = ".root.lock";
/// How long a start waits for another ztunnel to finish creating the root (a key and a
/// self-signed certificate: milliseconds, or seconds on a loaded machine).
const LOCK_TIMEOUT: Duration = Duration::from_secs(30);
const LOCK_POLL: Duration = Duration::from_millis(20);

/// A CA whose root lives in a directory on this node. Issues leaves for its trust domain.
pub struct BuiltinCa {
    trust_domain: String,
    lifetime: Duration,
    root: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl BuiltinCa {
    /// Loads the root from `dir` (`root-cert.pem`, `root-key.pem`), or generates and stores
    /// one when neither file exists. Leaves are issued for `lifetime`: at least one second and
    /// at most the root's ten years.
    pub fn load_or_create(
        dir: &Path,
        trust_domain: &str,
        lifetime: Duration,
    ) -> Result<Self, Error> {
        if lifetime < Duration::from_secs(1) || lifetime > ROOT_VALIDITY {
            return Err(Error::InvalidLifetime { lifetime });
        }
        let cert_path = dir.join(ROOT_CERT_FILE);
        let key_path = dir.join(ROOT_KEY_FILE);
        // The usual start: both files there, nothing to create, no lock (the directory may
        // be read-only). Anything else is decided under the directory's lock, so that of
        // several ztunnels starting at once on an empty directory one creates the root and
        // the others load it, and none mistakes a root being published for a broken one.
        let (root, issuer) = if exists(&cert_path)? && exists(&key_path)? {
            load_root(&cert_path, &key_path, trust_domain)?
        } else {
            create_dir(dir)?;
            let _lock = lock_dir(dir, LOCK_TIMEOUT)?;
            match (exists(&cert_path)?, exists(&key_path)?) {
                (true, true) => load_root(&cert_path, &key_path, trust_domain)?,
                (false, false) => create_root(dir, &cert_path, &key_path, trust_domain)?,
                (true, false) => {
                    return Err(Error::RootIncomplete {
                        present: cert_path,
                        missing: key_path,
                    });
                }
                (false, true) => {
                    return Err(Error::RootIncomplete {
                        present: key_path,
                        missing: cert_path,
                    });
                }
            }
        };
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            lifetime,
            root,
            issuer,
        })
    }

    /// A new root for `trust_domain` as PEM texts `(certificate, PKCS#8 key)`, for storing
    /// elsewhere (a Kubernetes Secret) before [`BuiltinCa::from_pem`] loads it.
    pub fn generate_root_pem(trust_domain: &str) -> Result<(String, String), Error> {
        let (key, _, cert) = generate_root(trust_domain)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Loads a root kept outside a directory; `origin` names it in errors (for example
    /// `secret istio-system/ztunnel-ca-root`), followed by the key's name.
    pub fn from_pem(
        origin: &str,
        cert_pem: &[u8],
        key_pem: &[u8],
        trust_domain: &str,
        lifetime: Duration,
    ) -> Result<Self, Error> {
        if lifetime < Duration::from_secs(1) || lifetime > ROOT_VALIDITY {
            return Err(Error::InvalidLifetime { lifetime });
        }
        let (root, issuer) = root_from_pem(
            cert_pem,
            key_pem,
            &Path::new(origin).join(ROOT_CERT_FILE),
            &Path::new(origin).join(ROOT_KEY_FILE),
            trust_domain,
        )?;
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            lifetime,
            root,
            issuer,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn root(&self) -> &CertificateDer<'static> {
        &self.root
    }

    /// Issues a leaf for `id`, valid for the configured lifetime from now.
    pub fn issue(&self, id: &Identity) -> Result<WorkloadCertificate, Error> {
        if id.trust_domain != self.trust_domain {
            return Err(Error::ForeignTrustDomain {
                identity: id.clone(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        let now = whole_seconds(SystemTime::now());
        // Backdating eats into the lifetime from the point of view of refresh_at(), so cap it
        // for short-lived (test) certificates: they must still renew at about half-life.
        let backdate = MAX_BACKDATE.min(Duration::from_secs(self.lifetime.as_secs() / 10));
        let lifetime_secs = self.lifetime.as_secs() + u64::from(self.lifetime.subsec_nanos() > 0);
        let not_before = now.checked_sub(backdate).unwrap_or(now);
        let not_after = now
            .checked_add(Duration::from_secs(lifetime_secs))
            .unwrap_or(now);
        self.issue_with_validity(id, not_before, not_after)
    }

    /// Issues a leaf for `id` with an explicit validity, for tests (expired or not yet valid
    /// certificates) and tools. Unlike [`BuiltinCa::issue`], any trust domain is accepted.
    pub fn issue_with_validity(
        &self,
        id: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<WorkloadCertificate, Error> {
        let in_x509_range = |t| (0..=LATEST_X509_TIME).contains(&unix_seconds(t));
        if not_after <= not_before || !in_x509_range(not_before) || !in_x509_range(not_after) {
            return Err(Error::InvalidValidity {
                identity: id.clone(),
            });
        }
        let generate = |action: &str| {
            let action = format!("{action} for {id}");
            move |source| Error::Generate { action, source }
        };
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate("generate a key"))?;

        let mut params = CertificateParams::default();
        // Identity is the URI SAN alone; with an empty subject RFC 5280 §4.2.1.6 requires the
        // SAN to be critical, which rcgen does on its own.
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            id.to_string()
                .try_into()
                .map_err(generate("encode the uri san"))?,
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, not_before, not_after);

        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(generate("sign the certificate"))?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        WorkloadCertificate::new(vec![cert.der().clone()], key, vec![self.root.clone()])
    }
}

impl CertificateSource for BuiltinCa {
    fn fetch<'a>(&'a self, id: &'a Identity) -> CertificateFuture<'a> {
        // Signing is a few hundred microseconds: not worth a blocking-pool hop.
        Box::pin(async move { self.issue(id) })
    }
}

fn exists(path: &Path) -> Result<bool, Error> {
    path.try_exists().map_err(|source| Error::Io {
        action: "check for",
        path: path.to_owned(),
        source,
    })
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    fs::read(path).map_err(|source| Error::Io {
        action: "read",
        path: path.to_owned(),
        source,
    })
}

fn root_params(distinguished_name: DistinguishedName) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn create_dir(dir: &Path) -> Result<(), Error> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| Error::Io {
            action: "create the built-in ca directory",
            path: dir.to_owned(),
            source,
        })
}

/// Takes the CA directory's lock (`flock` on [`LOCK_FILE`]), polling for at most `timeout`.
/// The kernel drops it when the holder exits, so a crashed ztunnel never leaves it taken.
fn lock_dir(dir: &Path, timeout: Duration) -> Result<Flock<fs::File>, Error> {
    let path = dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|source| Error::Io {
            action: "open the lock file",
            path: path.clone(),
            source,
        })?;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((f, Errno::EWOULDBLOCK | Errno::EINTR)) => {
                if std::time::Instant::now() >= deadline {
                    return Err(Error::CaLocked {
                        path,
                        waited: timeout,
                    });
                }
                file = f;
                std::thread::sleep(LOCK_POLL);
            }
            Err((_, errno)) => {
                return Err(Error::Io {
                    action: "lock",
                    path,
                    source: errno.into(),
                });
            }
        }
    }
}

/// Creates and publishes a new root; the caller holds the directory's lock and found
/// neither file.
fn create_root(
    dir: &Path,
    cert_path: &Path,
    key_path: &Path,
    trust_domain: &str,
) -> Result<(CertificateDer<'static>, Issuer<'static, KeyPair>), Error> {
    let (key, params, cert) = generate_root(trust_domain)?;

    // The key goes first: a crash in between leaves a key without a certificate, which
    // load_or_create reports instead of silently generating a second root.
    publish(dir, key_path, key.serialize_pem().as_bytes(), 0o600)?;
    publish(dir, cert_path, cert.pem().as_bytes(), 0o644)?;
    sync_dir(dir)?;
    tracing::info!(
        cert = %cert_path.display(),
        trust_domain,
        serial = %serial_hex(cert.der()),
        "generated a new built-in ca root"
    );
    Ok((cert.der().clone(), Issuer::new(params, key)))
}

/// A fresh self-signed root for `trust_domain`: its key, the parameters it was signed with
/// (an [`Issuer`] needs them) and the certificate.
fn generate_root(
    trust_domain: &str,
) -> Result<(KeyPair, CertificateParams, rcgen::Certificate), Error> {
    let generate = |action: &str| {
        let action = action.to_owned();
        move |source| Error::Generate { action, source }
    };
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(generate("generate the root key"))?;
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, ROOT_COMMON_NAME);
    name.push(DnType::OrganizationName, trust_domain);
    let mut params = root_params(name);
    let now = whole_seconds(SystemTime::now());
    set_validity(&mut params, now - MAX_BACKDATE, now + ROOT_VALIDITY);
    let cert = params
        .self_signed(&key)
        .map_err(generate("self-sign the root certificate"))?;
    Ok((key, params, cert))
}

/// Writes `contents` to a private temporary file in `dir` and links it to `path`, which
/// must not exist yet (`link` fails with `EEXIST`, the `O_EXCL` of names). `path` thus
/// appears complete or not at all: never half written, never replacing a root. The file
/// is created with `mode`, so a key is never readable by others, not even for a moment.
fn publish(dir: &Path, path: &Path, contents: &[u8], mode: u32) -> Result<(), Error> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    let io = |action: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| Error::Io {
            action,
            path,
            source,
        }
    };
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()
    })()
    .map_err(io("write", &tmp))
    .and_then(|()| fs::hard_link(&tmp, path).map_err(io("write", path)));
    // The name was only for the link; with or without it, the temporary file goes.
    let removed = fs::remove_file(&tmp).map_err(io("remove", &tmp));
    written.and(removed)
}

/// Makes the new names durable: without it a power loss could keep the key's name and
/// lose the certificate's.
fn sync_dir(dir: &Path) -> Result<(), Error> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| Error::Io {
            action: "sync the built-in ca directory",
            path: dir.to_owned(),
            source,
        })
}

/// The certificate's serial number in hex, to tell roots apart in logs (rcgen derives it
/// from the key, so two roots never share one).
fn serial_hex(der: &[u8]) -> String {
    X509Certificate::from_der(der)
        .map(|(_, c)| c.raw_serial_as_string())
        .unwrap_or_else(|_| "-".to_owned())
}

fn load_root(
    cert_path: &Path,
    key_path: &Path,
    trust_domain: &str,
) -> Result<(CertificateDer<'static>, Issuer<'static, KeyPair>), Error> {
    check_key_mode(key_path)?;
    root_from_pem(
        &read(cert_path)?,
        &read(key_path)?,
        cert_path,
        key_path,
        trust_domain,
    )
}

/// Refuses a key file that its group or others may read or write, as ssh does for
/// private keys: the root key signs every identity in the mesh.
fn check_key_mode(path: &Path) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = fs::metadata(path)
        .map_err(|source| Error::Io {
            action: "check the permissions of",
            path: path.to_owned(),
            source,
        })?
        .permissions()
        .mode()
        & 0o7777;
    if mode & 0o077 != 0 {
        return Err(Error::KeyPermissions {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// Checks and loads a root from its PEM texts; `cert_path` and `key_path` name where they
/// came from in errors and logs (files, or a Kubernetes Secret's keys).
fn root_from_pem(
    cert_pem: &[u8],
    key_pem: &[u8],
    cert_path: &Path,
    key_path: &Path,
    trust_domain: &str,
) -> Result<(CertificateDer<'static>, Issuer<'static, KeyPair>), Error> {
    let unusable = |path: &Path, reason: String| Error::RootUnusable {
        path: path.to_owned(),
        reason,
    };
    let root = CertificateDer::from_pem_slice(cert_pem).map_err(|e| Error::RootPem {
        path: cert_path.to_owned(),
        problem: super::pem_problem(&e, "CERTIFICATE"),
    })?;
    // rcgen's own pem errors say only "malformedframing": read the pem here first.
    PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| Error::RootPem {
        path: key_path.to_owned(),
        problem: super::pem_problem(&e, "PRIVATE KEY"),
    })?;
    let key_pem = String::from_utf8(key_pem.to_vec())
        .map_err(|_| unusable(key_path, "it is not utf-8 pem text".to_owned()))?;
    let key = KeyPair::from_pem(&key_pem).map_err(|source| Error::RootKey {
        path: key_path.to_owned(),
        source,
    })?;

    let (_, parsed) = X509Certificate::from_der(&root).map_err(|e| Error::RootCertificate {
        path: cert_path.to_owned(),
        problem: super::der_problem(e),
    })?;
    if !parsed.is_ca() {
        return Err(unusable(
            cert_path,
            "it is not a ca certificate (basicConstraints CA:TRUE is missing)".to_owned(),
        ));
    }
    if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
        return Err(unusable(
            key_path,
            format!("it is not the key of {}", cert_path.display()),
        ));
    }
    if parsed.validity().not_after.timestamp() <= unix_seconds(SystemTime::now()) {
        return Err(unusable(
            cert_path,
            format!(
                "it expired at {}; remove both root files to generate a new root",
                parsed.validity().not_after
            ),
        ));
    }
    let name = distinguished_name(parsed.subject()).ok_or_else(|| {
        unusable(
            cert_path,
            "its subject uses an attribute encoding this ca cannot reproduce".to_owned(),
        )
    })?;
    let organization = name.get(&DnType::OrganizationName).cloned();
    let issuer = Issuer::new(root_params(name), key);

    // Leaves name their issuer by re-encoding the subject above; webpki matches issuer and
    // subject byte for byte, so prove the round trip once here rather than fail every
    // handshake later.
    let probe = CertificateParams::default()
        .signed_by(issuer.key(), &issuer)
        .map_err(|source| Error::Generate {
            action: "sign a probe certificate with the loaded root".to_owned(),
            source,
        })?;
    let probe_issuer = X509Certificate::from_der(probe.der())
        .map(|(_, probe)| probe.issuer().as_raw().to_vec())
        .unwrap_or_default();
    if probe_issuer != parsed.subject().as_raw() {
        return Err(unusable(
            cert_path,
            "its subject does not survive re-encoding, so issued leaves would not chain to it"
                .to_owned(),
        ));
    }

    if organization != Some(DnValue::Utf8String(trust_domain.to_owned())) {
        // Only informational: trust comes from the root key, not from the subject.
        tracing::info!(
            cert = %cert_path.display(),
            trust_domain,
            "built-in ca root was created for another trust domain"
        );
    }
    tracing::info!(
        cert = %cert_path.display(),
        serial = %serial_hex(&root),
        "loaded the built-in ca root"
    );
    Ok((root, issuer))
}

/// Rebuilds an rcgen name from a parsed one with the same attribute types, order and string
/// types. `None` for encodings rcgen cannot write (multi-valued RDNs, unusual string types).
fn distinguished_name(name: &X509Name<'_>) -> Option<DistinguishedName> {
    let mut dn = DistinguishedName::new();
    for rdn in name.iter() {
        let [attr] = rdn.iter().collect::<Vec<_>>()[..] else {
            return None;
        };
        let oid: Vec<u64> = attr.attr_type().iter()?.collect();
        let value = attr.attr_value();
        let text = std::str::from_utf8(value.data).ok()?;
        let value = match value.header.tag() {
            Tag::Utf8String => DnValue::Utf8String(text.to_owned()),
            Tag::PrintableString => DnValue::PrintableString(text.try_into().ok()?),
            Tag::Ia5String => DnValue::Ia5String(text.try_into().ok()?),
            _ => return None,
        };
        dn.push(DnType::from_oid(&oid), value);
    }
    Some(dn)
}

/// Callers keep both times within 1970..=9999, where the `time` arithmetic cannot overflow.
fn set_validity(params: &mut CertificateParams, not_before: SystemTime, not_after: SystemTime) {
    // rcgen takes `time` values; build them from the epoch so this crate need not name `time`.
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + Duration::from_secs(unix_seconds(not_before).max(0).unsigned_abs());
    params.not_after = epoch + Duration::from_secs(unix_seconds(not_after).max(0).unsigned_abs());
}

/// Certificates carry whole seconds; truncating up front keeps our notion of validity equal
/// to what peers parse from the certificate.
fn whole_seconds(t: SystemTime) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(unix_seconds(t).max(0).unsigned_abs())
}

fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use x509_parser::extensions::{GeneralName, ParsedExtension};
    use x509_parser::oid_registry::{
        OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_SIG_ECDSA_WITH_SHA256,
        OID_X509_EXT_SUBJECT_ALT_NAME,
    };

    use super::*;

    fn id(td: &str, sa: &str) -> Identity {
        Identity::new(td, "default", sa)
    }

    fn new_ca(dir: &Path) -> BuiltinCa {
        BuiltinCa::load_or_create(dir, "cluster.local", DEFAULT_LIFETIME).expect("built-in ca")
    }

    #[test]
    fn issued_leaf_has_spiffe_san_empty_subject_p256_key_and_lifetime() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = new_ca(dir.path());
        let before = SystemTime::now();
        let cert = ca.issue(&id("cluster.local", "app")).expect("issue");
        let after = SystemTime::now();

        assert_eq!(cert.identity, id("cluster.local", "app"));
        assert_eq!(cert.chain.len(), 1);
        assert_eq!(cert.roots, vec![ca.root().clone()]);
        assert!(matches!(cert.key, PrivateKeyDer::Pkcs8(_)));

        let (_, leaf) = X509Certificate::from_der(&cert.chain[0]).expect("leaf parses");
        assert!(
            leaf.subject().iter().next().is_none(),
            "subject must be empty"
        );
        let (_, root) = X509Certificate::from_der(ca.root()).expect("root parses");
        assert_eq!(leaf.issuer().as_raw(), root.subject().as_raw());

        let san = leaf
            .extensions()
            .iter()
            .find(|e| e.oid == OID_X509_EXT_SUBJECT_ALT_NAME)
            .expect("san extension");
        assert!(san.critical, "san must be critical with an empty subject");
        let ParsedExtension::SubjectAlternativeName(names) = san.parsed_extension() else {
            panic!("san does not parse");
        };
        assert_eq!(
            names.general_names,
            vec![GeneralName::URI("spiffe://cluster.local/ns/default/sa/app")]
        );

        let spki = leaf.public_key();
        assert_eq!(spki.algorithm.algorithm, OID_KEY_TYPE_EC_PUBLIC_KEY);
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .expect("named curve");
        assert_eq!(curve, OID_EC_P256);
        assert_eq!(
            leaf.signature_algorithm.algorithm,
            OID_SIG_ECDSA_WITH_SHA256
        );
        let key = KeyPair::try_from(&cert.key).expect("key loads");
        assert_eq!(key.algorithm(), &PKCS_ECDSA_P256_SHA256);
        assert_eq!(key.subject_public_key_info(), spki.raw);

        let eku = leaf
            .extended_key_usage()
            .expect("eku")
            .expect("eku present");
        assert!(eku.value.server_auth && eku.value.client_auth);
        let ku = leaf.key_usage().expect("ku").expect("ku present");
        assert!(ku.value.digital_signature() && ku.value.key_encipherment());
        assert!(!ku.value.key_cert_sign());
        assert!(!leaf.is_ca());

        // Valid from about a minute ago for DEFAULT_LIFETIME from now.
        let whole = |t: SystemTime| unix_seconds(t);
        let not_before = leaf.validity().not_before.timestamp();
        let not_after = leaf.validity().not_after.timestamp();
        assert!(not_before <= whole(before) - 60 && not_before >= whole(after) - 61);
        assert_eq!(not_after - not_before, 24 * 60 * 60 + 60);
        assert_eq!(whole(cert.not_before), not_before);
        assert_eq!(whole(cert.not_after), not_after);
        assert_eq!(
            whole(cert.refresh_at()),
            not_before + (24 * 60 * 60 + 60) / 2
        );
    }

    #[test]
    fn root_is_persisted_private_and_reloaded_identical() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_dir = dir.path().join("nested/ca");
        let first = new_ca(&ca_dir);

        let key_mode = fs::metadata(ca_dir.join(ROOT_KEY_FILE))
            .expect("key file")
            .permissions()
            .mode();
        assert_eq!(key_mode & 0o777, 0o600);
        let dir_mode = fs::metadata(&ca_dir).expect("ca dir").permissions().mode();
        assert_eq!(dir_mode & 0o077, 0, "ca dir must not be open to others");
        let key_pem = fs::read(ca_dir.join(ROOT_KEY_FILE)).expect("key file");

        let second = new_ca(&ca_dir);
        assert_eq!(first.root(), second.root());
        assert_eq!(
            fs::read(ca_dir.join(ROOT_KEY_FILE)).expect("key file"),
            key_pem
        );

        let (_, root) = X509Certificate::from_der(first.root()).expect("root parses");
        assert!(root.is_ca());
        assert!(
            root.key_usage()
                .expect("ku")
                .expect("ku present")
                .value
                .key_cert_sign()
        );
        let years = (root.validity().not_after.timestamp()
            - root.validity().not_before.timestamp())
            / (365 * 24 * 60 * 60);
        assert!(years >= 9, "root validity is {years} years");
        let subject = root.subject().to_string();
        assert!(subject.contains("CN=ztunnel built-in root"), "{subject}");
        assert!(subject.contains("O=cluster.local"), "{subject}");

        // A leaf from the reloaded root chains to the root written by the first run.
        let leaf = second.issue(&id("cluster.local", "app")).expect("issue");
        let (_, leaf) = X509Certificate::from_der(&leaf.chain[0]).expect("leaf parses");
        assert_eq!(leaf.issuer().as_raw(), root.subject().as_raw());
    }

    #[test]
    fn ten_concurrent_first_starts_on_an_empty_dir_share_one_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_dir = dir.path().join("ca");
        let start = std::sync::Barrier::new(10);
        let roots: Vec<Vec<u8>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..10)
                .map(|_| {
                    s.spawn(|| {
                        start.wait();
                        BuiltinCa::load_or_create(&ca_dir, "cluster.local", DEFAULT_LIFETIME)
                            .map(|ca| ca.root().to_vec())
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("no panic").expect("every start succeeds"))
                .collect()
        });
        let on_disk =
            CertificateDer::from_pem_slice(&fs::read(ca_dir.join(ROOT_CERT_FILE)).expect("cert"))
                .expect("pem");
        for root in &roots {
            assert_eq!(
                root.as_slice(),
                on_disk.as_ref(),
                "every start uses the published root"
            );
        }
        // Nothing but the root, its key and the lock is left behind (no temporary files).
        let mut names: Vec<String> = fs::read_dir(&ca_dir)
            .expect("ca dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, [LOCK_FILE, ROOT_CERT_FILE, ROOT_KEY_FILE]);
    }

    #[test]
    fn a_start_waits_for_the_lock_and_gives_up_after_its_timeout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let held = lock_dir(dir.path(), Duration::from_secs(1)).expect("first lock");
        let err = lock_dir(dir.path(), Duration::from_millis(100)).expect_err("lock is held");
        assert!(matches!(err, Error::CaLocked { .. }), "{err}");
        assert!(err.to_string().contains(LOCK_FILE), "{err}");
        drop(held);
        lock_dir(dir.path(), Duration::from_secs(1)).expect("free again once released");
    }

    #[test]
    fn a_dir_holding_a_root_is_loaded_without_the_lock() {
        // A mounted, read-only directory (a Secret volume) has no room for a lock file.
        let dir = tempfile::tempdir().expect("tempdir");
        let first = new_ca(dir.path()).root().clone();
        fs::remove_file(dir.path().join(LOCK_FILE)).expect("remove lock");
        let loaded = new_ca(dir.path());
        assert_eq!(loaded.root(), &first);
        assert!(!dir.path().join(LOCK_FILE).exists());
    }

    #[test]
    fn corrupt_root_files_are_reported_not_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        new_ca(dir.path());
        let cert_path = dir.path().join(ROOT_CERT_FILE);
        let key_path = dir.path().join(ROOT_KEY_FILE);
        let good_key = fs::read(&key_path).expect("key");

        fs::write(
            &key_path,
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .expect("corrupt key");
        let err = BuiltinCa::load_or_create(dir.path(), "cluster.local", DEFAULT_LIFETIME)
            .err()
            .expect("corrupt key must fail");
        assert!(err.to_string().contains(ROOT_KEY_FILE), "{err}");

        fs::write(&key_path, &good_key).expect("restore key");
        fs::write(&cert_path, b"garbage").expect("corrupt cert");
        let err = BuiltinCa::load_or_create(dir.path(), "cluster.local", DEFAULT_LIFETIME)
            .err()
            .expect("corrupt cert must fail");
        assert!(err.to_string().contains(ROOT_CERT_FILE), "{err}");
        assert_eq!(fs::read(&cert_path).expect("cert"), b"garbage");

        // A key from another root is caught before it signs anything.
        let other = tempfile::tempdir().expect("tempdir");
        new_ca(other.path());
        fs::copy(other.path().join(ROOT_CERT_FILE), &cert_path).expect("copy cert");
        let err = BuiltinCa::load_or_create(dir.path(), "cluster.local", DEFAULT_LIFETIME)
            .err()
            .expect("mismatched key must fail");
        assert!(err.to_string().contains("is not the key of"), "{err}");

        fs::remove_file(&cert_path).expect("remove cert");
        let err = BuiltinCa::load_or_create(dir.path(), "cluster.local", DEFAULT_LIFETIME)
            .err()
            .expect("half a root must fail");
        assert!(matches!(err, Error::RootIncomplete { .. }), "{err}");
        assert!(
            !cert_path.exists(),
            "the missing root must not be regenerated"
        );
    }

    #[test]
    fn a_root_key_others_may_read_is_refused_as_ssh_does() {
        let dir = tempfile::tempdir().expect("tempdir");
        new_ca(dir.path());
        let key_path = dir.path().join(ROOT_KEY_FILE);
        for mode in [0o640, 0o604, 0o644, 0o660, 0o602] {
            fs::set_permissions(&key_path, fs::Permissions::from_mode(mode)).expect("chmod");
            let err = BuiltinCa::load_or_create(dir.path(), "cluster.local", DEFAULT_LIFETIME)
                .err()
                .expect("an open key must be refused")
                .to_string();
            let want = format!("mode {mode:04o}");
            assert!(err.contains(&key_path.display().to_string()), "{err}");
            assert!(err.contains(&want), "{want} missing: {err}");
            assert!(
                err.contains(&format!("chmod 600 {}", key_path.display())),
                "{err}"
            );
        }
        for mode in [0o600, 0o400] {
            fs::set_permissions(&key_path, fs::Permissions::from_mode(mode)).expect("chmod");
            BuiltinCa::load_or_create(dir.path(), "cluster.local", DEFAULT_LIFETIME)
                .expect("a key only its owner can read is fine");
        }
    }

    /// Truncated certificates (a cut PEM text, a cut DER inside whole PEM) and keys are
    /// reported naming the file and what is wrong, in words, never as byte lists.
    #[test]
    fn truncated_certificates_and_keys_are_reported_in_words() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = new_ca(dir.path());
        let cert_path = dir.path().join(ROOT_CERT_FILE);
        let key_path = dir.path().join(ROOT_KEY_FILE);
        let (cert, key) = (
            fs::read_to_string(&cert_path).expect("cert"),
            fs::read_to_string(&key_path).expect("key"),
        );
        let der = ca.root().clone();
        let cut_der = crate::identity::certificate_pem(&der[..der.len() / 2]);
        let load = |cert: &str, key: &str| {
            fs::write(&cert_path, cert).expect("write cert");
            fs::write(&key_path, key).expect("write key");
            let err = BuiltinCa::load_or_create(dir.path(), "cluster.local", DEFAULT_LIFETIME)
                .err()
                .expect("broken root must fail");
            crate::proxy::error_chain(&err)
        };
        for (what, err, file, want) in [
            (
                "pem cut short",
                load(&cert[..cert.len() / 2], &key),
                &cert_path,
                "it is cut short: the \"-----END CERTIFICATE-----\" line is missing",
            ),
            (
                "der cut short",
                load(&cut_der, &key),
                &cert_path,
                "is not a valid certificate: it is cut short: the data ends inside the certificate",
            ),
            (
                "empty",
                load("", &key),
                &cert_path,
                "it holds no \"-----BEGIN CERTIFICATE-----\" section",
            ),
            (
                "key cut short",
                load(&cert, &key[..key.len() / 2]),
                &key_path,
                "it is cut short: the \"-----END PRIVATE KEY-----\" line is missing",
            ),
        ] {
            assert!(err.contains(&file.display().to_string()), "{what}: {err}");
            assert!(err.contains(want), "{what}: want {want:?} in {err}");
            assert!(
                !err.contains("[45,") && !err.contains("nom error"),
                "{what}: {err}"
            );
        }

        // The same words for a CA answer and a leaf.
        let err = crate::identity::certificates_from_pem(
            format!("{cert}{}", &cert[..cert.len() - 40]).as_bytes(),
        )
        .expect_err("second certificate cut");
        assert!(
            err.contains("\"-----END CERTIFICATE-----\" line is missing"),
            "{err}"
        );
        let err = crate::identity::certificates_from_pem(format!("{cert}{cut_der}").as_bytes())
            .expect_err("second der cut");
        assert_eq!(
            err,
            "certificate 2 of 2: it is cut short: the data ends inside the certificate"
        );
        let leaf = ca.issue(&id("cluster.local", "app")).expect("issue");
        let err = crate::identity::WorkloadCertificate::new(
            vec![CertificateDer::from(leaf.chain[0][..100].to_vec())],
            leaf.key.clone_key(),
            leaf.roots.clone(),
        )
        .expect_err("cut leaf")
        .to_string();
        assert_eq!(
            err,
            "failed to parse workload leaf certificate: it is cut short: the data ends inside the certificate"
        );
    }

    #[test]
    fn issuing_rejects_foreign_trust_domains_and_empty_validity() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = new_ca(dir.path());
        assert!(matches!(
            ca.issue(&id("other.domain", "app")),
            Err(Error::ForeignTrustDomain { .. })
        ));
        let now = SystemTime::now();
        assert!(matches!(
            ca.issue_with_validity(&id("cluster.local", "app"), now, now),
            Err(Error::InvalidValidity { .. })
        ));
        let far = UNIX_EPOCH + Duration::from_secs(LATEST_X509_TIME as u64 + 1);
        assert!(matches!(
            ca.issue_with_validity(&id("cluster.local", "app"), now, far),
            Err(Error::InvalidValidity { .. })
        ));
        for lifetime in [
            Duration::from_millis(10),
            Duration::from_secs(20 * 365 * 86_400),
        ] {
            assert!(matches!(
                BuiltinCa::load_or_create(dir.path(), "cluster.local", lifetime),
                Err(Error::InvalidLifetime { .. })
            ));
        }
    }

    #[test]
    fn short_lifetimes_keep_half_life_renewal_in_the_future() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = BuiltinCa::load_or_create(dir.path(), "td", Duration::from_secs(2)).expect("ca");
        let cert = ca.issue(&id("td", "app")).expect("issue");
        assert_eq!(
            cert.not_after
                .duration_since(cert.not_before)
                .expect("ordered"),
            Duration::from_secs(2)
        );
        assert!(cert.refresh_at() + Duration::from_secs(1) > SystemTime::now());
    }
}
