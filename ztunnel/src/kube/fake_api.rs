//! An in-process Kubernetes API server for tests: core/v1 collections (and Gateway API
//! Gateways and HTTPRoutes, and Istio's AuthorizationPolicies, once "installed") served as lists and watch streams with resource versions,
//! bookmarks, closed streams and 410 Gone, plus Secret get and create. It records every call as (verb, resource, namespaced) so tests can check
//! them against the RBAC rules.
use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::{Method, Request, Response, StatusCode, body::Frame};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// One API call as RBAC sees it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Call {
    pub verb: String,
    pub resource: String,
    pub namespaced: bool,
    /// The `resourceVersion` a watch resumed from.
    pub resource_version: Option<String>,
}

#[derive(Default)]
struct Collection {
    objects: BTreeMap<String, Value>,
    /// Every change, for watches that resume from a resource version.
    history: Vec<(u64, Value)>,
    /// Watches from a version below this get 410 Gone.
    oldest: u64,
    watchers: Vec<mpsc::UnboundedSender<Bytes>>,
}

#[derive(Default)]
struct Inner {
    rv: u64,
    collections: BTreeMap<String, Collection>,
    secrets: BTreeMap<String, Value>,
    calls: Vec<Call>,
    /// Created just before the next Secret create is handled: a ztunnel on another node won.
    race_secret: Option<Value>,
    /// Whether the Gateway API's CRDs are installed: until then `gateways` and
    /// `httproutes` are a 404.
    gateway_api: bool,
    /// Whether Istio's CRDs are installed: until then `authorizationpolicies` is a 404.
    istio_crds: bool,
    /// Resources whose list and watch are refused with 403 (a role without the grant).
    forbidden: std::collections::BTreeSet<String>,
}

#[derive(Clone)]
pub struct FakeApi {
    pub addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
}

fn kind_of(resource: &str) -> &'static str {
    match resource {
        "pods" => "Pod",
        "namespaces" => "Namespace",
        "services" => "Service",
        "gateways" => "Gateway",
        "httproutes" => "HTTPRoute",
        "authorizationpolicies" => "AuthorizationPolicy",
        _ => "Unknown",
    }
}

fn api_version_of(resource: &str) -> &'static str {
    match resource {
        "gateways" | "httproutes" => GATEWAY_API,
        "authorizationpolicies" => ISTIO_SECURITY_API,
        _ => "v1",
    }
}

/// The Gateway API group and version Gateways are served under.
const GATEWAY_API: &str = "gateway.networking.k8s.io/v1";
/// Istio's security group and version (AuthorizationPolicy).
const ISTIO_SECURITY_API: &str = "security.istio.io/v1";

fn object_key(obj: &Value) -> String {
    let m = &obj["metadata"];
    format!(
        "{}/{}",
        m["namespace"].as_str().unwrap_or_default(),
        m["name"].as_str().unwrap_or_default()
    )
}

fn line(v: &Value) -> Bytes {
    let mut s = v.to_string();
    s.push('\n');
    Bytes::from(s)
}

impl FakeApi {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake api server");
        let addr = listener.local_addr().expect("local addr");
        let api = Self {
            addr,
            inner: Arc::default(),
        };
        api.serve(listener);
        api
    }

    /// Also serves on `listener` (one bound in a pod's network namespace, for a client
    /// there); must be called inside a tokio runtime.
    // Used by the privileged tests (tests/tests/it/kube.rs includes this file), not by
    // ztunnel's own unit tests.
    #[allow(dead_code)]
    pub fn serve_on(&self, listener: std::net::TcpListener) -> std::io::Result<()> {
        listener.set_nonblocking(true)?;
        self.serve(tokio::net::TcpListener::from_std(listener)?);
        Ok(())
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let served = self.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let api = served.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let api = api.clone();
                        async move { Ok::<_, Infallible>(api.handle(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(conn), svc)
                        .await;
                });
            }
        });
    }

    pub fn client(&self) -> kube::Client {
        let url = format!("http://{}", self.addr).parse().expect("url");
        kube::Client::try_from(kube::Config::new(url)).expect("client for the fake api")
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    /// Panics unless every call so far is one `granted` (ztunnel's `API_ACCESS`) allows.
    pub fn assert_calls_granted(&self, granted: &[super::Access]) {
        for call in self.calls() {
            assert!(
                granted.iter().any(|a| a.resource == call.resource
                    && a.namespaced == call.namespaced
                    && a.verbs.contains(&call.verb.as_str())),
                "call not covered by the RBAC rules (API_ACCESS): {call:?}"
            );
        }
    }

    /// Adds or replaces an object, telling open watches.
    pub fn apply(&self, resource: &str, mut obj: Value) {
        let mut inner = self.lock();
        inner.rv += 1;
        let rv = inner.rv;
        obj["apiVersion"] = json!(api_version_of(resource));
        obj["kind"] = json!(kind_of(resource));
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let c = inner.collections.entry(resource.to_owned()).or_default();
        let ty = if c.objects.insert(object_key(&obj), obj.clone()).is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let ev = json!({"type": ty, "object": obj});
        c.history.push((rv, ev.clone()));
        c.watchers.retain(|w| w.send(line(&ev)).is_ok());
    }

    /// Deletes an object; with `tell` false open watches miss it (only a relist sees it).
    pub fn delete(&self, resource: &str, key: &str, tell: bool) {
        let mut inner = self.lock();
        inner.rv += 1;
        let rv = inner.rv;
        let c = inner.collections.entry(resource.to_owned()).or_default();
        let Some(mut obj) = c.objects.remove(key) else {
            panic!("fake api: no {resource} {key} to delete");
        };
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let ev = json!({"type": "DELETED", "object": obj});
        if tell {
            c.history.push((rv, ev.clone()));
            c.watchers.retain(|w| w.send(line(&ev)).is_ok());
        }
    }

    /// Sends a bookmark at the current version to open watches; returns that version.
    pub fn bookmark(&self, resource: &str) -> String {
        let mut inner = self.lock();
        inner.rv += 1;
        let rv = inner.rv.to_string();
        let kind = kind_of(resource);
        let c = inner.collections.entry(resource.to_owned()).or_default();
        let ev = json!({"type": "BOOKMARK", "object": {"apiVersion": api_version_of(resource), "kind": kind,
            "metadata": {"resourceVersion": rv}}});
        c.watchers.retain(|w| w.send(line(&ev)).is_ok());
        rv
    }

    /// Ends open watches the way an API server's timeout does.
    pub fn close_watches(&self, resource: &str) {
        self.lock()
            .collections
            .entry(resource.to_owned())
            .or_default()
            .watchers
            .clear();
    }

    /// Compacts history: open watches get 410 Gone, older versions cannot be resumed.
    pub fn expire(&self, resource: &str) {
        let mut inner = self.lock();
        inner.rv += 1;
        let rv = inner.rv;
        let c = inner.collections.entry(resource.to_owned()).or_default();
        c.oldest = rv;
        c.history.clear();
        let gone = gone();
        for w in c.watchers.drain(..) {
            let _ = w.send(line(&gone));
        }
    }

    /// Installs the Gateway API's CRDs: `gateways` is served from now on.
    pub fn install_gateway_api(&self) {
        self.lock().gateway_api = true;
    }

    /// Refuses list and watch of `resource` with 403 from now on, as the API server does
    /// for a role without the grant.
    pub fn forbid(&self, resource: &str) {
        self.lock().forbidden.insert(resource.to_owned());
    }

    /// Installs Istio's CRDs: `authorizationpolicies` is served from now on.
    pub fn install_istio_crds(&self) {
        self.lock().istio_crds = true;
    }

    pub fn secret(&self, key: &str) -> Option<Value> {
        self.lock().secrets.get(key).cloned()
    }

    /// The next Secret create loses to this one, created a moment earlier.
    pub fn race_secret_create(&self, winner: Value) {
        self.lock().race_secret = Some(winner);
    }

    async fn handle(
        &self,
        req: Request<hyper::body::Incoming>,
    ) -> Response<BoxBody<Bytes, Infallible>> {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let query: BTreeMap<String, String> = req
            .uri()
            .query()
            .unwrap_or_default()
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let gateways = format!("/apis/{GATEWAY_API}/");
        let istio = format!("/apis/{ISTIO_SECURITY_API}/");
        let parts: Vec<&str> = match (path.strip_prefix(&gateways), path.strip_prefix(&istio)) {
            (None, Some(rest)) => {
                if !self.lock().istio_crds {
                    self.record("list", rest, false, None);
                    return status(
                        StatusCode::NOT_FOUND,
                        "NotFound",
                        "the server could not find the requested resource",
                    );
                }
                rest.split('/').collect()
            }
            (Some(rest), _) => {
                if !self.lock().gateway_api {
                    self.record("list", rest, false, None);
                    // What an API server without the CRD answers.
                    return status(
                        StatusCode::NOT_FOUND,
                        "NotFound",
                        "the server could not find the requested resource",
                    );
                }
                rest.split('/').collect()
            }
            (None, None) => path.trim_start_matches("/api/v1/").split('/').collect(),
        };
        match (method, parts.as_slice()) {
            (Method::GET, [resource]) if self.lock().forbidden.contains(*resource) => {
                self.record("list", resource, false, None);
                status(
                    StatusCode::FORBIDDEN,
                    "Forbidden",
                    &format!("{resource} is forbidden: the role does not grant list"),
                )
            }
            (Method::GET, [resource]) => {
                let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
                let rv = query.get("resourceVersion").cloned();
                self.record(
                    if watch { "watch" } else { "list" },
                    resource,
                    false,
                    rv.clone(),
                );
                if watch {
                    self.watch(resource, rv.as_deref().unwrap_or("0"))
                } else {
                    self.list(resource)
                }
            }
            (Method::GET, ["namespaces", ns, "secrets", name]) => {
                self.record("get", "secrets", true, None);
                match self.secret(&format!("{ns}/{name}")) {
                    Some(s) => respond(StatusCode::OK, &s),
                    None => status(
                        StatusCode::NOT_FOUND,
                        "NotFound",
                        &format!("secrets \"{name}\" not found"),
                    ),
                }
            }
            (Method::POST, ["namespaces", ns, "secrets"]) => {
                self.record("create", "secrets", true, None);
                let mut obj: Value = match serde_json::from_slice(&body) {
                    Ok(v) => v,
                    Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()),
                };
                let key = format!(
                    "{ns}/{}",
                    obj["metadata"]["name"].as_str().unwrap_or_default()
                );
                let mut inner = self.lock();
                if let Some(winner) = inner.race_secret.take() {
                    inner.secrets.insert(key.clone(), winner);
                }
                if inner.secrets.contains_key(&key) {
                    return status(
                        StatusCode::CONFLICT,
                        "AlreadyExists",
                        &format!("secrets {key:?} already exists"),
                    );
                }
                inner.rv += 1;
                obj["metadata"]["resourceVersion"] = json!(inner.rv.to_string());
                inner.secrets.insert(key, obj.clone());
                respond(StatusCode::CREATED, &obj)
            }
            _ => status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("fake api: no route for {path}"),
            ),
        }
    }

    fn record(
        &self,
        verb: &str,
        resource: &str,
        namespaced: bool,
        resource_version: Option<String>,
    ) {
        self.lock().calls.push(Call {
            verb: verb.to_owned(),
            resource: resource.to_owned(),
            namespaced,
            resource_version,
        });
    }

    fn list(&self, resource: &str) -> Response<BoxBody<Bytes, Infallible>> {
        let mut inner = self.lock();
        let rv = inner.rv.to_string();
        let c = inner.collections.entry(resource.to_owned()).or_default();
        let items: Vec<Value> = c.objects.values().cloned().collect();
        respond(
            StatusCode::OK,
            &json!({"apiVersion": api_version_of(resource), "kind": format!("{}List", kind_of(resource)),
                "metadata": {"resourceVersion": rv}, "items": items}),
        )
    }

    fn watch(&self, resource: &str, from: &str) -> Response<BoxBody<Bytes, Infallible>> {
        let from: u64 = from.parse().unwrap_or(0);
        let (tx, rx) = mpsc::unbounded_channel();
        {
            let mut inner = self.lock();
            let c = inner.collections.entry(resource.to_owned()).or_default();
            if from < c.oldest {
                let _ = tx.send(line(&gone()));
            } else {
                for (_, ev) in c.history.iter().filter(|(rv, _)| *rv > from) {
                    let _ = tx.send(line(ev));
                }
                c.watchers.push(tx);
            }
        }
        let body = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
        });
        Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .body(StreamBody::new(body).boxed())
            .expect("valid response")
    }
}

fn gone() -> Value {
    json!({"type": "ERROR", "object": {"apiVersion": "v1", "kind": "Status", "status": "Failure",
        "code": 410, "reason": "Expired", "message": "too old resource version"}})
}

fn respond(code: StatusCode, v: &Value) -> Response<BoxBody<Bytes, Infallible>> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())).boxed())
        .expect("valid response")
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<BoxBody<Bytes, Infallible>> {
    respond(
        code,
        &json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
            "code": code.as_u16(), "reason": reason, "message": message}),
    )
}
