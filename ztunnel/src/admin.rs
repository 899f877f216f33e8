//! The admin API on loopback (default 127.0.0.1:15000): `/config_dump` (JSON of the
//! running state), `/fast_path` (GET shows, POST `?enabled=true|false` switches),
//! `/logging` and `/quitquitquit` (drain, then exit).
use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use crate::{
    app::{EnrolledPodInfo, Shared},
    config::Config,
    ebpf::{Features, Occupancy},
    proxy::ConnectionRecord,
};

/// What `/config_dump` returns.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigDump {
    pub config: serde_json::Value,
    /// Every workload the store knows, in the shape of Istio ztunnel's dump.
    pub workloads: Vec<WorkloadDump>,
    pub services: Vec<ServiceDump>,
    pub policies: Vec<crate::policy::Authorization>,
    pub peer_authentications: Vec<crate::policy::PeerAuthentication>,
    pub certificates: Vec<CertificateDump>,
    pub enrolled_pods: Vec<EnrolledPodInfo>,
    pub capture: CaptureDump,
    pub connections: ConnectionsDump,
    /// The last upgrade this ztunnel took part in.
    #[serde(default)]
    pub handover: crate::app::HandoverStatus,
}

/// A workload, with Istio ztunnel's field names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadDump {
    pub uid: String,
    pub workload_ips: Vec<std::net::IpAddr>,
    /// `HBONE` or `TCP`.
    pub protocol: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub workload_name: String,
    pub workload_type: String,
    pub canonical_name: String,
    pub canonical_revision: String,
    pub node: String,
    pub network: String,
    pub cluster_id: String,
    pub trust_domain: String,
    /// The SPIFFE identity.
    pub identity: String,
    /// `Healthy` (the local file has no health).
    pub status: String,
}

/// A service, with Istio ztunnel's field names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceDump {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    pub vips: Vec<std::net::IpAddr>,
    /// Service port → target port.
    pub ports: std::collections::BTreeMap<u16, u16>,
    /// Endpoint workload uids.
    pub endpoints: Vec<String>,
    pub subject_alt_names: Vec<String>,
}

/// A workload certificate, with Istio ztunnel's field names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateDump {
    pub identity: String,
    /// `Available`, `Pending` or `Unavailable`.
    pub state: String,
    pub cert_chain: Vec<CertDump>,
    /// Seconds until the leaf expires (0 when expired or missing).
    pub expiry_seconds: u64,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertDump {
    pub pem: String,
    /// RFC 3339.
    pub valid_from: String,
    /// RFC 3339.
    pub expiration_time: String,
}

fn rfc3339(t: Option<std::time::SystemTime>) -> String {
    t.map(|t| humantime::format_rfc3339_seconds(t).to_string())
        .unwrap_or_default()
}

fn state_dump(shared: &Shared) -> (Vec<WorkloadDump>, Vec<ServiceDump>, crate::state::Store) {
    let store = (*shared.proxy.store()).clone();
    let workloads = store
        .cfg
        .workloads
        .iter()
        .map(|w| WorkloadDump {
            uid: store.uid(w),
            workload_ips: w.addresses.clone(),
            protocol: match store.protocol(w) {
                crate::state::Protocol::Hbone => "HBONE",
                crate::state::Protocol::Tcp => "TCP",
            }
            .to_owned(),
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            service_account: w.service_account.clone(),
            workload_name: w.workload_name(),
            workload_type: w.workload_type(),
            canonical_name: w.canonical_name(),
            canonical_revision: w.canonical_revision(),
            node: w.node.clone(),
            network: w.network.clone(),
            cluster_id: store.cfg.cluster.clone(),
            trust_domain: store.trust_domain(w).to_owned(),
            identity: store.identity(w),
            status: "Healthy".to_owned(),
        })
        .collect();
    let services = store
        .cfg
        .services
        .iter()
        .map(|s| ServiceDump {
            name: s.name.clone(),
            namespace: s.namespace.clone(),
            hostname: s.hostname(),
            vips: s.addresses.clone(),
            ports: s
                .ports
                .iter()
                .map(|p| (p.port, p.target_port.unwrap_or(p.port)))
                .collect(),
            endpoints: store.endpoints(s).map(|w| store.uid(w)).collect(),
            subject_alt_names: s.subject_alt_names.clone(),
        })
        .collect();
    (workloads, services, store)
}

fn certificates(shared: &Shared) -> Vec<CertificateDump> {
    let now = std::time::SystemTime::now();
    shared
        .proxy
        .certs
        .snapshot()
        .into_iter()
        .map(|c| CertificateDump {
            identity: c.identity.to_string(),
            state: match c.state {
                "available" => "Available",
                "pending" => "Pending",
                _ => "Unavailable",
            }
            .to_owned(),
            cert_chain: if c.chain_pem.is_empty() {
                Vec::new()
            } else {
                vec![CertDump {
                    pem: c.chain_pem.clone(),
                    valid_from: rfc3339(c.not_before),
                    expiration_time: rfc3339(c.not_after),
                }]
            },
            expiry_seconds: c
                .not_after
                .and_then(|t| t.duration_since(now).ok())
                .map_or(0, |d| d.as_secs()),
            error: c.error,
        })
        .collect()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CaptureDump {
    pub mode: String,
    pub features: serde_json::Value,
    pub fast_path: bool,
    pub pin_dir: String,
    pub occupancy: Occupancy,
    pub counters: std::collections::BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionsDump {
    pub opened_total: u64,
    /// Pooled outbound HBONE connections and the streams open on them.
    pub hbone_pool_connections: usize,
    pub hbone_pool_streams: usize,
    pub list: Vec<ConnectionRecord>,
}

pub fn dump(cfg: &Config, shared: &Shared) -> ConfigDump {
    let features: &Features = shared.capture.features();
    let (opened_total, list) = shared.proxy.connections.snapshot();
    let (workloads, services, store) = state_dump(shared);
    ConfigDump {
        config: serde_json::to_value(cfg).unwrap_or_default(),
        workloads,
        services,
        policies: store.cfg.policies.clone(),
        peer_authentications: store.cfg.peer_authentications.clone(),
        certificates: certificates(shared),
        enrolled_pods: shared.enrolled_info(),
        handover: shared.handover_status(),
        capture: CaptureDump {
            mode: shared.capture.mode().to_owned(),
            features: serde_json::to_value(features).unwrap_or_default(),
            fast_path: shared.capture.fast_path(),
            pin_dir: shared
                .capture
                .pin_dir()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            occupancy: shared.capture.occupancy(),
            counters: shared
                .capture
                .stats()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
        },
        connections: {
            let pool = shared.proxy.pool_stats();
            ConnectionsDump {
                opened_total,
                hbone_pool_connections: pool.connections,
                hbone_pool_streams: pool.active_streams,
                list,
            }
        },
    }
}

pub async fn serve(listener: TcpListener, cfg: Arc<Config>, shared: Arc<Shared>) {
    let mut errors = crate::limits::AcceptErrors::new(
        crate::metrics::listener::ADMIN,
        "ztunnel",
        shared.proxy.metrics.clone(),
    );
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => {
                errors.accepted();
                accepted
            }
            Err(e) => {
                // Out of descriptors, retrying at once would spin.
                errors.failed(&e).await;
                continue;
            }
        };
        if !peer.ip().is_loopback() {
            // Belt and braces: the listener is bound to loopback already.
            continue;
        }
        let (cfg, shared) = (cfg.clone(), shared.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let (cfg, shared) = (cfg.clone(), shared.clone());
                async move { Ok::<_, Infallible>(handle(req, &cfg, &shared, peer)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn handle(
    req: Request<Incoming>,
    cfg: &Config,
    shared: &Shared,
    _peer: SocketAddr,
) -> Response<Full<Bytes>> {
    tracing::debug!(method = %req.method(), uri = %req.uri(), "admin request");
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/config_dump") => json(StatusCode::OK, &dump(cfg, shared)),
        (&Method::GET, "/fast_path") => json(
            StatusCode::OK,
            &serde_json::json!({ "enabled": shared.capture.fast_path() }),
        ),
        (&Method::POST, "/fast_path") => {
            let q = req.uri().query().unwrap_or("");
            let on = match q {
                "enabled=true" => true,
                "enabled=false" => false,
                _ => {
                    return text(
                        StatusCode::BAD_REQUEST,
                        "expected ?enabled=true or ?enabled=false\n",
                    );
                }
            };
            match shared.capture.set_fast_path(on) {
                Ok(()) => {
                    tracing::info!(enabled = on, "fast path switched");
                    json(StatusCode::OK, &serde_json::json!({ "enabled": on }))
                }
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}\n")),
            }
        }
        (&Method::GET, "/logging") => text(StatusCode::OK, &format!("{}\n", shared.log.level())),
        (&Method::POST, "/logging") => {
            let level = req
                .uri()
                .query()
                .unwrap_or("")
                .split('&')
                .find_map(|kv| kv.strip_prefix("level="))
                .unwrap_or("");
            if level.is_empty() {
                return text(StatusCode::BAD_REQUEST, "expected ?level=<filter>\n");
            }
            match shared.log.set(level) {
                Ok(()) => {
                    tracing::info!(level, "log level changed");
                    text(StatusCode::OK, &format!("{level}\n"))
                }
                Err(e) => text(StatusCode::BAD_REQUEST, &format!("{e}\n")),
            }
        }
        (&Method::POST, "/quitquitquit") => {
            shared.request_drain("POST /quitquitquit", false);
            text(StatusCode::OK, "draining\n")
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "endpoints: GET /config_dump, GET|POST /fast_path, GET|POST /logging, POST /quitquitquit\n",
        ),
    }
}

fn json<T: Serialize>(status: StatusCode, v: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(v) {
        Ok(body) => response(status, "application/json", body),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}\n")),
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    response(status, "text/plain", body.as_bytes().to_vec())
}

fn response(status: StatusCode, ty: &str, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = ty.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}
