//! An in-process fake istiod for the Istio-mode tests: delta ADS serving `Address` and
//! `Authorization` resources from a table the test edits, and Istio's CA signing CSRs
//! with a test root. Both over TLS (a serving certificate for 127.0.0.1 from the same
//! root) and both checking the bearer token and `clusterid` header. It records NACKs,
//! the versions each new stream said it held, and the identities it issued. `restart`
//! drops every stream and the listener, then serves again on the same port.
use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, CertifiedIssuer,
    DistinguishedName, IsCa, KeyPair, SanType,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};
use ztunnel::istio::proto::{
    ca::{
        IstioCertificateRequest, IstioCertificateResponse,
        istio_certificate_service_server::{
            IstioCertificateService, IstioCertificateServiceServer,
        },
    },
    envoy::{
        DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
        aggregated_discovery_service_server::{
            AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
        },
    },
};

pub const TOKEN: &str = "test-token";
pub const CLUSTER: &str = "Kubernetes";

/// (type url, name) → (version, encoded body).
type Table = BTreeMap<(String, String), (String, Vec<u8>)>;

struct State {
    table: Mutex<Table>,
    version: Mutex<u64>,
    changed: watch::Sender<u64>,
    kill: watch::Sender<u64>,
    nacks: Mutex<Vec<String>>,
    initial_versions: Mutex<Vec<(String, HashMap<String, String>)>>,
    issued: Mutex<Vec<String>>,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn check_auth<T>(req: &Request<T>) -> Result<(), Status> {
    let md = req.metadata();
    if md.get("authorization").and_then(|v| v.to_str().ok()) != Some(&format!("Bearer {TOKEN}")) {
        return Err(Status::unauthenticated("missing or wrong bearer token"));
    }
    if md.get("clusterid").and_then(|v| v.to_str().ok()) != Some(CLUSTER) {
        return Err(Status::unauthenticated("missing clusterid"));
    }
    Ok(())
}

#[derive(Clone)]
struct Svc(Arc<State>);

impl State {
    /// The resources of `type_url` that differ from what a stream has, as one response.
    fn diff(
        &self,
        type_url: &str,
        sent: &mut BTreeMap<String, String>,
    ) -> Option<DeltaDiscoveryResponse> {
        let table = lock(&self.table);
        let mut resources = Vec::new();
        let mut now = BTreeMap::new();
        for ((t, name), (version, body)) in table.iter() {
            if t != type_url {
                continue;
            }
            now.insert(name.clone(), version.clone());
            if sent.get(name) != Some(version) {
                resources.push(Resource {
                    version: version.clone(),
                    resource: Some(prost_types::Any {
                        type_url: type_url.to_owned(),
                        value: body.clone(),
                    }),
                    name: name.clone(),
                    aliases: vec![],
                });
            }
        }
        let removed: Vec<String> = sent
            .keys()
            .filter(|n| !now.contains_key(*n))
            .cloned()
            .collect();
        *sent = now;
        if resources.is_empty() && removed.is_empty() {
            return None;
        }
        let mut v = lock(&self.version);
        *v += 1;
        Some(DeltaDiscoveryResponse {
            system_version_info: v.to_string(),
            resources,
            type_url: type_url.to_owned(),
            nonce: format!("nonce-{v}"),
            removed_resources: removed,
        })
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Svc {
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn delta_aggregated_resources(
        &self,
        req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        check_auth(&req)?;
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let state = self.0.clone();
        tokio::spawn(async move {
            let mut changed = state.changed.subscribe();
            let mut kill = state.kill.subscribe();
            let mut subscribed: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
            loop {
                tokio::select! {
                    msg = inbound.message() => {
                        let Ok(Some(msg)) = msg else { return };
                        if let Some(e) = &msg.error_detail {
                            lock(&state.nacks).push(e.message.clone());
                        }
                        if msg.response_nonce.is_empty() {
                            lock(&state.initial_versions)
                                .push((msg.type_url.clone(), msg.initial_resource_versions.clone()));
                            let sent = subscribed.entry(msg.type_url.clone()).or_default();
                            *sent = msg.initial_resource_versions.into_iter().collect();
                            // A fresh subscription always gets an answer, even if empty.
                            let resp = state.diff(&msg.type_url, sent).unwrap_or_else(|| {
                                DeltaDiscoveryResponse {
                                    type_url: msg.type_url.clone(),
                                    nonce: "initial".into(),
                                    ..Default::default()
                                }
                            });
                            if tx.send(Ok(resp)).await.is_err() { return }
                        }
                    }
                    _ = changed.changed() => {
                        for (t, sent) in subscribed.iter_mut() {
                            if let Some(resp) = state.diff(t, sent)
                                && tx.send(Ok(resp)).await.is_err()
                            {
                                return;
                            }
                        }
                    }
                    _ = kill.changed() => {
                        let _ = tx.send(Err(Status::unavailable("istiod restarting"))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[tonic::async_trait]
impl IstioCertificateService for Svc {
    async fn create_certificate(
        &self,
        req: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        check_auth(&req)?;
        let req = req.into_inner();
        let csr = CertificateSigningRequestParams::from_pem(&req.csr)
            .map_err(|e| Status::invalid_argument(format!("bad csr: {e}")))?;
        let sans: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .filter_map(|s| match s {
                SanType::URI(u) => Some(u.as_str().to_owned()),
                _ => None,
            })
            .collect();
        let impersonated = req
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get("ImpersonatedIdentity"))
            .and_then(|v| match &v.kind {
                Some(prost_types::value::Kind::StringValue(s)) => Some(s.clone()),
                _ => None,
            })
            .ok_or_else(|| Status::invalid_argument("no ImpersonatedIdentity"))?;
        if sans != [impersonated.clone()] {
            return Err(Status::invalid_argument(format!(
                "csr sans {sans:?} are not [{impersonated}]"
            )));
        }
        let mut params = csr.params.clone();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|_| Status::internal("clock"))?;
        let epoch = rcgen::date_time_ymd(1970, 1, 1);
        params.not_before = epoch + (now - Duration::from_secs(60));
        params.not_after = epoch + now + Duration::from_secs(req.validity_duration.max(60) as u64);
        let csr = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        };
        let leaf = csr
            .signed_by(&self.0.issuer)
            .map_err(|e| Status::internal(format!("sign: {e}")))?;
        lock(&self.0.issued).push(impersonated);
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: vec![leaf.pem(), self.0.issuer.pem()],
        }))
    }
}

pub struct FakeIstiod {
    pub addr: SocketAddr,
    pub root_cert: PathBuf,
    pub token: PathBuf,
    state: Arc<State>,
    serving: (String, String),
    rt: tokio::runtime::Runtime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl FakeIstiod {
    /// Starts serving on a free loopback port; the root and token files go into `dir`.
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        let mut root = CertificateParams::default();
        root.distinguished_name = DistinguishedName::new();
        root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let issuer = CertifiedIssuer::self_signed(root, KeyPair::generate()?)?;
        let mut serving = CertificateParams::new(vec!["istiod.istio-system.svc".to_owned()])?;
        serving
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        let key = KeyPair::generate()?;
        let cert = serving.signed_by(&key, &issuer)?;
        let root_cert = dir.join("istiod-root.pem");
        std::fs::write(&root_cert, issuer.pem())?;
        let token = dir.join("istio-token");
        std::fs::write(&token, format!("{TOKEN}\n"))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let addr = listener.local_addr()?;
        let mut me = Self {
            addr,
            root_cert,
            token,
            state: Arc::new(State {
                table: Mutex::default(),
                version: Mutex::new(0),
                changed: watch::channel(0).0,
                kill: watch::channel(0).0,
                nacks: Mutex::default(),
                initial_versions: Mutex::default(),
                issued: Mutex::default(),
                issuer,
            }),
            serving: (cert.pem(), key.serialize_pem()),
            rt,
            stop: None,
        };
        me.serve(listener)?;
        Ok(me)
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) -> anyhow::Result<()> {
        let identity = tonic::transport::Identity::from_pem(&self.serving.0, &self.serving.1);
        // tonic's server builds its TLS config from rustls' process default, which rustls
        // cannot pick by itself with both of its backends compiled in (ztunnel's records
        // are ring's on some CPUs, the rest aws-lc-rs'); kube's client installs aws-lc-rs'
        // the same way.
        let _ = tokio_rustls::rustls::crypto::aws_lc_rs::default_provider().install_default();
        let svc = Svc(self.state.clone());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let router = tonic::transport::Server::builder()
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))?
            .add_service(AggregatedDiscoveryServiceServer::new(svc.clone()))
            .add_service(IstioCertificateServiceServer::new(svc));
        self.rt.spawn(router.serve_with_incoming_shutdown(
            TcpListenerStream::new(listener),
            async {
                let _ = stop_rx.await;
            },
        ));
        self.stop = Some(stop_tx);
        Ok(())
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Drops every stream and stops listening (ztunnel sees the connection fail).
    pub fn stop(&mut self) {
        self.state.kill.send_modify(|v| *v += 1);
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }

    /// Serves again on the same port.
    pub fn resume(&mut self) -> anyhow::Result<()> {
        let addr = self.addr;
        let listener = self
            .rt
            .block_on(async {
                // The old listener may take a moment to be dropped by the stopping server.
                for _ in 0..100 {
                    match tokio::net::TcpListener::bind(addr).await {
                        Ok(l) => return Ok(l),
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
                tokio::net::TcpListener::bind(addr).await
            })
            .with_context(|| format!("failed to listen on {addr} again"))?;
        self.serve(listener)
    }

    /// Adds or replaces a resource (`version` must change for a replacement to be sent).
    pub fn put(&self, type_url: &str, name: &str, version: &str, body: Vec<u8>) {
        lock(&self.state.table).insert(
            (type_url.to_owned(), name.to_owned()),
            (version.to_owned(), body),
        );
        self.state.changed.send_modify(|v| *v += 1);
    }

    pub fn put_message<M: prost::Message>(&self, type_url: &str, name: &str, version: &str, m: &M) {
        self.put(type_url, name, version, m.encode_to_vec());
    }

    pub fn remove(&self, type_url: &str, name: &str) {
        lock(&self.state.table).remove(&(type_url.to_owned(), name.to_owned()));
        self.state.changed.send_modify(|v| *v += 1);
    }

    /// Edits the table without notifying streams (as while stopped).
    pub fn put_quietly<M: prost::Message>(&self, type_url: &str, name: &str, version: &str, m: &M) {
        lock(&self.state.table).insert(
            (type_url.to_owned(), name.to_owned()),
            (version.to_owned(), m.encode_to_vec()),
        );
    }

    pub fn nacks(&self) -> Vec<String> {
        lock(&self.state.nacks).clone()
    }

    /// For each stream opened: the type and the versions ztunnel said it held.
    pub fn initial_versions(&self) -> Vec<(String, HashMap<String, String>)> {
        lock(&self.state.initial_versions).clone()
    }

    /// A certificate for `identity` from this istiod's CA, as a workload (or a waypoint)
    /// would hold it: for test peers that must be trusted by ztunnels of this istiod.
    pub fn issue(
        &self,
        identity: &ztunnel::identity::Identity,
    ) -> anyhow::Result<ztunnel::identity::WorkloadCertificate> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .subject_alt_names
            .push(SanType::URI(identity.to_string().try_into()?));
        let key = KeyPair::generate()?;
        let leaf = params.signed_by(&key, &self.state.issuer)?;
        Ok(ztunnel::identity::WorkloadCertificate::new(
            vec![leaf.der().clone()],
            tokio_rustls::rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            vec![self.state.issuer.der().clone()],
        )?)
    }

    pub fn issued(&self) -> Vec<String> {
        lock(&self.state.issued).clone()
    }
}

impl Drop for FakeIstiod {
    fn drop(&mut self) {
        self.stop();
    }
}
