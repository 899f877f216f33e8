//! The scrape endpoint (`GET /metrics`, Istio's :15020) and the readiness probe
//! (`GET /healthz/ready`, Istio's :15021), each on a listener the caller binds.
use std::{convert::Infallible, future::Future, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use super::Metrics;

pub const METRICS_PATH: &str = "/metrics";
pub const READINESS_PATH: &str = "/healthz/ready";

/// OpenMetrics 1.0.0, because that is what prometheus-client's encoder writes (`_total`
/// sample names under a `# TYPE x counter` family, `# EOF`) and what Prometheus asks for
/// first in its default `scrape_protocols`. Labelled `text/plain; version=0.0.4` it would be
/// parsed as the classic format, where `x_total` samples do not belong to family `x` and
/// lose their counter type.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

const TEXT_CONTENT_TYPE: &str = "text/plain; charset=utf-8";

/// Both ports are reachable from the node network (kubelet, Prometheus); a client that
/// opens a connection and never finishes its headers must not hold it forever.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Pause after a failed accept (EMFILE, ENFILE) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

type Body = Full<Bytes>;

/// Serves `GET /metrics` until the task is dropped: calls `refresh` first (so gauges
/// read from elsewhere, such as eBPF maps and the HBONE pool, are current), then returns
/// [`Metrics::encode`]. Both run on the blocking pool, since `refresh` may walk eBPF maps.
/// Other paths get 404, other methods on `/metrics` 405.
pub async fn serve_metrics(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    refresh: impl Fn() + Send + Sync + 'static,
) {
    let refresh = Arc::new(refresh);
    serve(listener, "metrics", move |req: Request<Incoming>| {
        let (metrics, refresh) = (metrics.clone(), refresh.clone());
        async move {
            if let Some(resp) = route(&req, METRICS_PATH) {
                return resp;
            }
            let encoded = tokio::task::spawn_blocking(move || {
                refresh();
                metrics.encode()
            })
            .await;
            match encoded {
                Ok(body) => respond(StatusCode::OK, METRICS_CONTENT_TYPE, body),
                Err(e) => {
                    tracing::error!(error = %e, "metrics refresh failed");
                    respond(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        TEXT_CONTENT_TYPE,
                        "metrics refresh failed\n".to_owned(),
                    )
                }
            }
        }
    })
    .await
}

/// Serves `GET /metrics` from `encode` (a registry of the caller's own: the waypoint's)
/// until the task is dropped, with the same paths and answers as [`serve_metrics`].
pub async fn serve_encoded(
    listener: TcpListener,
    encode: impl Fn() -> String + Send + Sync + 'static,
) {
    let encode = Arc::new(encode);
    serve(listener, "metrics", move |req: Request<Incoming>| {
        let encode = encode.clone();
        async move {
            if let Some(resp) = route(&req, METRICS_PATH) {
                return resp;
            }
            respond(StatusCode::OK, METRICS_CONTENT_TYPE, encode())
        }
    })
    .await
}

/// Serves `GET /healthz/ready` until the task is dropped: 200 `ready\n` when `ready()` is
/// `Ok`, else 503 with the reason and a newline. Other paths get 404, other methods 405.
pub async fn serve_readiness(
    listener: TcpListener,
    ready: impl Fn() -> Result<(), String> + Send + Sync + 'static,
) {
    let ready = Arc::new(ready);
    serve(listener, "readiness", move |req: Request<Incoming>| {
        let ready = ready.clone();
        async move {
            if let Some(resp) = route(&req, READINESS_PATH) {
                return resp;
            }
            match ready() {
                Ok(()) => respond(StatusCode::OK, TEXT_CONTENT_TYPE, "ready\n".to_owned()),
                Err(reason) => respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    TEXT_CONTENT_TYPE,
                    format!("{reason}\n"),
                ),
            }
        }
    })
    .await
}

/// The 404/405 answer for anything but `GET` or `HEAD` of `path`; `None` when the request
/// is for `path` itself.
fn route(req: &Request<Incoming>, path: &str) -> Option<Response<Body>> {
    if req.uri().path() != path {
        return Some(respond(
            StatusCode::NOT_FOUND,
            TEXT_CONTENT_TYPE,
            format!("not found; try {path}\n"),
        ));
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut resp = respond(
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT_CONTENT_TYPE,
            format!("{path} supports GET\n"),
        );
        resp.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return Some(resp);
    }
    None
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    resp
}

/// Accepts HTTP/1 connections forever, one task per connection.
async fn serve<H, F>(listener: TcpListener, name: &'static str, handler: H)
where
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let handler = Arc::new(handler);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(server = name, error = %e, "failed to accept a connection");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let resp = handler(req);
                async move { Ok::<_, Infallible>(resp.await) }
            });
            let res = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
            if let Err(e) = res {
                tracing::debug!(server = name, %peer, error = %e, "http connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::SocketAddr,
        sync::atomic::{AtomicBool, AtomicI64, Ordering},
    };

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    struct Reply {
        status: u16,
        headers: String,
        body: String,
    }

    /// One HTTP/1.1 request over a fresh loopback connection, read to the end.
    async fn request(addr: SocketAddr, method: &str, path: &str) -> Reply {
        let mut conn = tokio::net::TcpStream::connect(addr)
            .await
            .expect("connect to test server");
        let req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        conn.write_all(req.as_bytes()).await.expect("write request");
        let mut raw = String::new();
        conn.read_to_string(&mut raw).await.expect("read response");
        let (head, body) = raw.split_once("\r\n\r\n").expect("header/body separator");
        let (status_line, headers) = head.split_once("\r\n").unwrap_or((head, ""));
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status code");
        Reply {
            status,
            headers: headers.to_ascii_lowercase(),
            body: body.to_owned(),
        }
    }

    async fn bind() -> (TcpListener, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        (listener, addr)
    }

    #[tokio::test]
    async fn readiness_is_503_with_reason_until_ready_then_200() {
        let (listener, addr) = bind().await;
        let ready = Arc::new(AtomicBool::new(false));
        let flag = ready.clone();
        let task = tokio::spawn(serve_readiness(listener, move || {
            if flag.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err("waiting for workload certificates".to_owned())
            }
        }));

        let r = request(addr, "GET", READINESS_PATH).await;
        assert_eq!(r.status, 503);
        assert_eq!(r.body, "waiting for workload certificates\n");

        ready.store(true, Ordering::SeqCst);
        let r = request(addr, "GET", READINESS_PATH).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body, "ready\n");
        assert!(
            r.headers.contains("content-type: text/plain"),
            "{}",
            r.headers
        );

        assert_eq!(request(addr, "GET", "/healthz/live").await.status, 404);
        let r = request(addr, "POST", READINESS_PATH).await;
        assert_eq!(r.status, 405);
        assert!(r.headers.contains("allow: get, head"), "{}", r.headers);
        task.abort();
    }

    #[tokio::test]
    async fn metrics_endpoint_refreshes_then_serves_openmetrics() {
        let (listener, addr) = bind().await;
        let metrics = Metrics::new();
        let scrapes = Arc::new(AtomicI64::new(0));
        let (m, n) = (metrics.clone(), scrapes.clone());
        let task = tokio::spawn(serve_metrics(listener, metrics.clone(), move || {
            m.set_enrolled_pods(n.fetch_add(1, Ordering::SeqCst) + 1);
        }));

        let r = request(addr, "GET", METRICS_PATH).await;
        assert_eq!(r.status, 200);
        assert!(
            r.headers
                .contains(&format!("content-type: {METRICS_CONTENT_TYPE}")),
            "{}",
            r.headers
        );
        assert!(
            r.body.lines().any(|l| l == "ztunnel_enrolled_pods 1"),
            "{}",
            r.body
        );
        assert!(r.body.ends_with("# EOF\n"), "{}", r.body);

        let r = request(addr, "GET", METRICS_PATH).await;
        assert!(
            r.body.lines().any(|l| l == "ztunnel_enrolled_pods 2"),
            "{}",
            r.body
        );

        assert_eq!(request(addr, "GET", "/stats/prometheus").await.status, 404);
        assert_eq!(request(addr, "POST", METRICS_PATH).await.status, 405);
        // Neither a 404 nor a 405 runs the refresh.
        assert_eq!(scrapes.load(Ordering::SeqCst), 2);
        task.abort();
    }
}
