//! The admin API on loopback (default 127.0.0.1:15000): `/config_dump` (JSON of the
//! running state) and `/fast_path` (GET shows, POST `?enabled=true|false` switches).
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
    pub enrolled_pods: Vec<EnrolledPodInfo>,
    pub capture: CaptureDump,
    pub connections: ConnectionsDump,
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
    ConfigDump {
        config: serde_json::to_value(cfg).unwrap_or_default(),
        enrolled_pods: shared.enrolled_info(),
        capture: CaptureDump {
            mode: "ebpf".to_owned(),
            features: serde_json::to_value(features).unwrap_or_default(),
            fast_path: shared.capture.fast_path(),
            pin_dir: shared.capture.pin_dir().display().to_string(),
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
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
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
        _ => text(
            StatusCode::NOT_FOUND,
            "endpoints: GET /config_dump, GET|POST /fast_path\n",
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
