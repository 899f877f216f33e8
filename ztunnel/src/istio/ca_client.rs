//! A [`CertificateSource`] backed by Istio's CA (`istio.v1.auth.IstioCertificateService/
//! CreateCertificate`): a fresh ECDSA P-256 key and CSR (empty subject, one URI SAN) per
//! request, the identity named in the `ImpersonatedIdentity` metadata (ztunnel asks on
//! behalf of its pods), and the answer read as leaf, intermediates, then the roots last.
//! The [`CertificateManager`](crate::identity::CertificateManager) renews at half-life and
//! keeps the current certificate while the CA is unreachable.
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::{
    channel::AuthChannel,
    proto::ca::{
        IstioCertificateRequest, istio_certificate_service_client::IstioCertificateServiceClient,
    },
};
use crate::identity::{self, CertificateFuture, CertificateSource, Identity, WorkloadCertificate};

const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The metadata key that names the identity ztunnel asks for on a pod's behalf.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to build a certificate request: {action}")]
    Csr {
        action: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("the ca refused the request: {}: {}", status.code(), status.message())]
    Rpc {
        #[source]
        status: tonic::Status,
    },
    #[error("the ca answered with no certificates")]
    EmptyAnswer,
    #[error("the ca's answer is unusable: element {element} of {count}: {problem}")]
    Pem {
        element: usize,
        count: usize,
        problem: String,
    },
    #[error("the ca issued a certificate for {got:?}, not the identity asked for")]
    WrongIdentity { got: Option<String> },
    #[error("the ca's answer is unusable")]
    Certificate {
        #[source]
        source: identity::Error,
    },
}

/// The CA's health as last seen, for readiness and metrics.
#[derive(Debug, Clone, Default)]
pub struct CaStatus {
    /// The last request's error, while the CA keeps failing.
    pub last_error: Option<String>,
    pub last_success: Option<SystemTime>,
}

pub struct IstioCa {
    client: IstioCertificateServiceClient<AuthChannel>,
    address: String,
    lifetime: Duration,
    /// Roots to use when the CA's answer carries none (a single-element chain).
    fallback_roots: Vec<CertificateDer<'static>>,
    status: Arc<Mutex<CaStatus>>,
}

impl IstioCa {
    pub fn new(
        channel: AuthChannel,
        address: String,
        lifetime: Duration,
        fallback_roots: Vec<CertificateDer<'static>>,
    ) -> Self {
        Self {
            client: IstioCertificateServiceClient::new(channel),
            address,
            lifetime,
            fallback_roots,
            status: Arc::default(),
        }
    }

    /// Shared view of the CA's health.
    pub fn status(&self) -> Arc<Mutex<CaStatus>> {
        self.status.clone()
    }

    async fn request(&self, id: &Identity) -> Result<WorkloadCertificate, Error> {
        let csr_err = |action| move |source| Error::Csr { action, source };
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(csr_err("generate a key"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            id.to_string()
                .try_into()
                .map_err(csr_err("encode the uri san"))?,
        )];
        let csr = params
            .serialize_request(&key)
            .map_err(csr_err("sign the request"))?
            .pem()
            .map_err(csr_err("encode the request"))?;
        let req = IstioCertificateRequest {
            csr,
            validity_duration: self.lifetime.as_secs() as i64,
            metadata: Some(prost_types::Struct {
                fields: BTreeMap::from([(
                    IMPERSONATED_IDENTITY.to_owned(),
                    prost_types::Value {
                        kind: Some(prost_types::value::Kind::StringValue(id.to_string())),
                    },
                )]),
            }),
        };
        let mut req = tonic::Request::new(req);
        // A CA that accepts the connection but never answers must not stall renewal.
        req.set_timeout(REQUEST_TIMEOUT);
        let answer = self
            .client
            .clone()
            .create_certificate(req)
            .await
            .map_err(|status| Error::Rpc { status })?
            .into_inner();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        parse_answer(&answer.cert_chain, key, id, &self.fallback_roots)
    }
}

/// Reads the CA's `cert_chain`: each element PEM; the leaf first, then intermediates, the
/// last element the root(s) (HBONE.md). A single element is the leaf alone, and the roots
/// are the ones ztunnel already trusts for istiod.
pub fn parse_answer(
    elements: &[String],
    key: PrivateKeyDer<'static>,
    id: &Identity,
    fallback_roots: &[CertificateDer<'static>],
) -> Result<WorkloadCertificate, Error> {
    let count = elements.len();
    let certs = |element: usize, pem: &str| {
        identity::certificates_from_pem(pem.as_bytes()).map_err(|problem| Error::Pem {
            element: element + 1,
            count,
            problem,
        })
    };
    let (first, rest) = elements.split_first().ok_or(Error::EmptyAnswer)?;
    let mut chain = certs(0, first)?;
    let roots = match rest.split_last() {
        Some((last, middle)) => {
            for (i, m) in middle.iter().enumerate() {
                chain.extend(certs(i + 1, m)?);
            }
            certs(count - 1, last)?
        }
        None => fallback_roots.to_vec(),
    };
    if chain.is_empty() {
        return Err(Error::EmptyAnswer);
    }
    let cert = WorkloadCertificate::new(chain, key, roots)
        .map_err(|source| Error::Certificate { source })?;
    if &cert.identity != id {
        return Err(Error::WrongIdentity {
            got: Some(cert.identity.to_string()),
        });
    }
    Ok(cert)
}

impl CertificateSource for IstioCa {
    fn fetch<'a>(&'a self, id: &'a Identity) -> CertificateFuture<'a> {
        Box::pin(async move {
            let result = self.request(id).await;
            let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
            match result {
                Ok(cert) => {
                    status.last_error = None;
                    status.last_success = Some(SystemTime::now());
                    Ok(cert)
                }
                Err(e) => {
                    status.last_error = Some(format!("{e}"));
                    tracing::warn!(ca = %self.address, identity = %id, error = %e, "istio ca request failed");
                    Err(identity::Error::RemoteCa {
                        address: self.address.clone(),
                        identity: id.clone(),
                        source: Box::new(e),
                    })
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::identity::{BuiltinCa, certificate_pem};

    fn issued(
        id: &Identity,
    ) -> (
        String,
        String,
        PrivateKeyDer<'static>,
        CertificateDer<'static>,
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = BuiltinCa::load_or_create(dir.path(), &id.trust_domain, Duration::from_secs(3600))
            .expect("ca");
        let cert = ca.issue(id).expect("issue");
        (
            certificate_pem(&cert.chain[0]),
            certificate_pem(ca.root()),
            cert.key.clone_key(),
            ca.root().clone(),
        )
    }

    #[test]
    fn answer_is_leaf_then_intermediates_then_roots() {
        let id: Identity = "spiffe://td/ns/shop/sa/web".parse().expect("id");
        let (leaf, root, key, root_der) = issued(&id);
        let cert = parse_answer(&[leaf.clone(), root], key.clone_key(), &id, &[]).expect("valid");
        assert_eq!(cert.identity, id);
        assert_eq!(cert.chain.len(), 1);
        assert_eq!(cert.roots, vec![root_der.clone()]);
        // The leaf alone: the roots come from what ztunnel already trusts.
        let cert = parse_answer(&[leaf], key, &id, std::slice::from_ref(&root_der)).expect("valid");
        assert_eq!(cert.roots, vec![root_der]);
    }

    #[test]
    fn answers_for_another_identity_or_without_certificates_are_refused() {
        let id: Identity = "spiffe://td/ns/shop/sa/web".parse().expect("id");
        let other: Identity = "spiffe://td/ns/shop/sa/db".parse().expect("id");
        let (leaf, root, key, _) = issued(&other);
        let err = parse_answer(&[leaf, root.clone()], key.clone_key(), &id, &[])
            .expect_err("wrong identity")
            .to_string();
        assert!(err.contains("spiffe://td/ns/shop/sa/db"), "{err}");
        assert!(matches!(
            parse_answer(&[], key.clone_key(), &id, &[]),
            Err(Error::EmptyAnswer)
        ));
        assert!(matches!(
            parse_answer(&["not pem".into(), root], key, &id, &[]),
            Err(Error::EmptyAnswer | Error::Pem { .. })
        ));
    }
}
