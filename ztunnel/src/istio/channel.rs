//! The gRPC channel to istiod (xDS and CA alike): TLS trusting a root certificate file,
//! and on every request a bearer token read from a file (a projected service-account
//! token, which the kubelet rotates) and the `clusterid` header.
use std::path::{Path, PathBuf};

use tonic::{
    metadata::AsciiMetadataValue,
    service::interceptor::InterceptedService,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to read istiod's root certificate {}", path.display())]
    ReadRoot {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid istiod address {address:?}")]
    Address {
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// Where istiod is and how to authenticate to it.
#[derive(Debug, Clone)]
pub struct ChannelConfig {
    /// `https://host:port`.
    pub address: String,
    /// PEM roots that istiod's serving certificate chains to.
    pub root_cert: PathBuf,
    /// A file holding the bearer token; none sends no `authorization` header.
    pub token: Option<PathBuf>,
    pub cluster_id: String,
}

/// Adds the token and cluster id to each request.
#[derive(Clone)]
pub struct Auth {
    token: Option<PathBuf>,
    cluster_id: String,
}

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(path) = &self.token {
            let token = std::fs::read_to_string(path).map_err(|e| {
                tonic::Status::unauthenticated(format!(
                    "failed to read token {}: {e}",
                    path.display()
                ))
            })?;
            let value: AsciiMetadataValue =
                format!("Bearer {}", token.trim()).parse().map_err(|_| {
                    tonic::Status::unauthenticated(format!(
                        "token {} is not a valid header value",
                        path.display()
                    ))
                })?;
            req.metadata_mut().insert("authorization", value);
        }
        if let Ok(v) = self.cluster_id.parse() {
            req.metadata_mut().insert("clusterid", v);
        }
        Ok(req)
    }
}

pub type AuthChannel = InterceptedService<Channel, Auth>;

fn read_root(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::ReadRoot {
        path: path.to_owned(),
        source,
    })
}

/// A lazily connecting channel: it dials on first use and again after a failure, so a
/// control plane that is down at start-up is not fatal.
pub fn connect(cfg: &ChannelConfig) -> Result<AuthChannel, Error> {
    let bad = |source| Error::Address {
        address: cfg.address.clone(),
        source,
    };
    let tls =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read_root(&cfg.root_cert)?));
    let channel = Endpoint::from_shared(cfg.address.clone())
        .map_err(bad)?
        .connect_timeout(std::time::Duration::from_secs(5))
        .http2_keep_alive_interval(std::time::Duration::from_secs(10))
        .keep_alive_timeout(std::time::Duration::from_secs(20))
        .tls_config(tls)
        .map_err(bad)?
        .connect_lazy();
    Ok(InterceptedService::new(
        channel,
        Auth {
            token: cfg.token.clone(),
            cluster_id: cfg.cluster_id.clone(),
        },
    ))
}
