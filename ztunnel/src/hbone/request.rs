//! The HBONE CONNECT request: what the client puts on the wire ([`ConnectRequest`]) and
//! what the server reads back from it ([`parse_connect`] → [`Target`] or [`Rejection`]).
//!
//! Header formats follow Istio's ztunnel byte for byte (`HBONE.md`, "The CONNECT request").

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use http::header::{FORWARDED, HeaderName, HeaderValue, InvalidHeaderValue};
use http::{Method, StatusCode, Uri};

/// W3C baggage: describes the workload on the sending side of a request or response.
pub const BAGGAGE: HeaderName = HeaderName::from_static("baggage");
/// W3C trace context.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid hbone authority {authority:?}: expected ip:port, [ipv6]:port or host:port")]
    InvalidAuthority { authority: String },
    #[error("invalid value for the {header} header of the CONNECT request to {authority}")]
    InvalidHeader {
        header: HeaderName,
        authority: String,
        #[source]
        source: InvalidHeaderValue,
    },
    #[error("malformed baggage member {member:?}: expected key=value")]
    MalformedBaggage { member: String },
}

/// Where a CONNECT stream asks to go: the parsed `:authority`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TargetAddr {
    /// `ip:port` or `[ipv6]:port`.
    Ip(SocketAddr),
    /// `host:port`; resolving the name is the caller's business.
    Host { name: String, port: u16 },
}

impl TargetAddr {
    pub fn port(&self) -> u16 {
        match self {
            TargetAddr::Ip(addr) => addr.port(),
            TargetAddr::Host { port, .. } => *port,
        }
    }
}

impl fmt::Display for TargetAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetAddr::Ip(addr) => write!(f, "{addr}"),
            TargetAddr::Host { name, port } => write!(f, "{name}:{port}"),
        }
    }
}

impl FromStr for TargetAddr {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || Error::InvalidAuthority {
            authority: s.to_owned(),
        };
        if let Ok(addr) = s.parse::<SocketAddr>() {
            if addr.port() == 0 {
                return Err(invalid());
            }
            return Ok(TargetAddr::Ip(addr));
        }
        let (name, port) = s.rsplit_once(':').ok_or_else(invalid)?;
        // u16::from_str accepts a leading '+', which is not a port.
        if !port.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid());
        }
        let port = port.parse::<u16>().map_err(|_| invalid())?;
        if port == 0 || !is_hostname(name) {
            return Err(invalid());
        }
        Ok(TargetAddr::Host {
            name: name.to_owned(),
            port,
        })
    }
}

/// A DNS name as RFC 1123 allows it (plus `_`, which Kubernetes service names never
/// contain but SRV-style names do). A final label of only digits is refused so that a
/// malformed IPv4 address (`999.1.1.1`) is not mistaken for a name.
fn is_hostname(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > 253 {
        return false;
    }
    let labels_ok = name.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    let last_numeric = name
        .rsplit('.')
        .next()
        .is_some_and(|last| last.bytes().all(|b| b.is_ascii_digit()));
    labels_ok && !last_numeric
}

/// The `baggage` header ztunnel sends: who the workload on this side is.
///
/// Empty fields are left out of the header; a workload without a type or a name is left
/// out entirely.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Baggage {
    pub cluster: String,
    pub namespace: String,
    /// Kubernetes kind of the workload, lowercase: `deployment`, `pod`, `daemonset`...
    pub workload_type: String,
    pub workload_name: String,
    /// Canonical service name (`service.istio.io/canonical-name`).
    pub service: String,
    /// Canonical revision (`service.istio.io/canonical-revision`).
    pub revision: String,
}

impl Baggage {
    pub fn is_empty(&self) -> bool {
        self == &Baggage::default()
    }
}

impl fmt::Display for Baggage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let workload_key = format!("k8s.{}.name", self.workload_type);
        let workload_name = if self.workload_type.is_empty() {
            ""
        } else {
            self.workload_name.as_str()
        };
        let members = [
            ("k8s.cluster.name", self.cluster.as_str()),
            ("k8s.namespace.name", self.namespace.as_str()),
            (workload_key.as_str(), workload_name),
            ("service.name", self.service.as_str()),
            ("service.version", self.revision.as_str()),
        ];
        let mut first = true;
        for (key, value) in members {
            if value.is_empty() {
                continue;
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            write!(f, "{key}={value}")?;
        }
        Ok(())
    }
}

impl FromStr for Baggage {
    type Err = Error;

    /// Reads the members ztunnel writes and ignores any other member, since baggage is
    /// shared with tracing systems that add their own.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut baggage = Baggage::default();
        for member in s.split(',').map(str::trim).filter(|m| !m.is_empty()) {
            // W3C baggage allows `;property` suffixes; none of ours carry any.
            let kv = member.split(';').next().unwrap_or(member);
            let (key, value) = kv.split_once('=').ok_or_else(|| Error::MalformedBaggage {
                member: member.to_owned(),
            })?;
            let (key, value) = (key.trim(), value.trim().to_owned());
            match key {
                "k8s.cluster.name" => baggage.cluster = value,
                "k8s.namespace.name" => baggage.namespace = value,
                "service.name" => baggage.service = value,
                "service.version" => baggage.revision = value,
                _ => {
                    if let Some(kind) = key
                        .strip_prefix("k8s.")
                        .and_then(|k| k.strip_suffix(".name"))
                        .filter(|k| !k.is_empty() && !k.contains('.'))
                    {
                        baggage.workload_type = kind.to_owned();
                        baggage.workload_name = value;
                    }
                }
            }
        }
        Ok(baggage)
    }
}

/// A fresh W3C `traceparent`: version 00, random trace and span ids, not sampled.
pub fn new_traceparent() -> String {
    // All-zero ids are invalid (W3C trace-context §3.2.2.3), hence the ranges start at 1.
    let trace_id: u128 = rand::random_range(1..=u128::MAX);
    let span_id: u64 = rand::random_range(1..=u64::MAX);
    format!("00-{trace_id:032x}-{span_id:016x}-00")
}

/// What the client asks of the server when it opens a tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    /// `ip:port` (`[ipv6]:port`) or `host:port` the tunnel should reach.
    pub authority: String,
    /// The original client, sent as `forwarded: for="<ip:port>"`.
    pub forwarded_for: SocketAddr,
    /// The service hostname the client dialled, sent as `;host=` in `forwarded`.
    pub forwarded_host: Option<String>,
    /// Describes the source workload; left out of the request when empty.
    pub baggage: Baggage,
    pub traceparent: String,
}

impl ConnectRequest {
    /// A request with empty baggage and a fresh `traceparent`.
    pub fn new(authority: impl Into<String>, forwarded_for: SocketAddr) -> Self {
        ConnectRequest {
            authority: authority.into(),
            forwarded_for,
            forwarded_host: None,
            baggage: Baggage::default(),
            traceparent: new_traceparent(),
        }
    }

    /// The value of the `forwarded` header (RFC 7239).
    pub fn forwarded(&self) -> String {
        // SocketAddr's Display already brackets IPv6 ("[::1]:80"); RFC 7239 §6 requires
        // the value to be quoted because of the ':'.
        match &self.forwarded_host {
            Some(host) => format!("for=\"{}\";host={host}", self.forwarded_for),
            None => format!("for=\"{}\"", self.forwarded_for),
        }
    }

    /// The request head as sent on the wire: `:method CONNECT` and `:authority` only.
    ///
    /// The URI carries nothing but the authority, which makes h2 leave out `:scheme` and
    /// `:path` as RFC 9113 §8.5 requires for CONNECT.
    pub fn to_http(&self) -> Result<http::Request<()>, Error> {
        let invalid = || Error::InvalidAuthority {
            authority: self.authority.clone(),
        };
        self.authority.parse::<TargetAddr>()?;
        let authority = http::uri::Authority::from_str(&self.authority).map_err(|_| invalid())?;

        let mut req = http::Request::new(());
        *req.method_mut() = Method::CONNECT;
        *req.uri_mut() = Uri::from(authority);
        *req.version_mut() = http::Version::HTTP_2;
        let header = |name: HeaderName, value: String| {
            HeaderValue::try_from(value).map_err(|source| Error::InvalidHeader {
                header: name,
                authority: self.authority.clone(),
                source,
            })
        };
        let headers = req.headers_mut();
        headers.insert(FORWARDED, header(FORWARDED, self.forwarded())?);
        if !self.baggage.is_empty() {
            headers.insert(BAGGAGE, header(BAGGAGE, self.baggage.to_string())?);
        }
        if !self.traceparent.is_empty() {
            headers.insert(TRACEPARENT, header(TRACEPARENT, self.traceparent.clone())?);
        }
        Ok(req)
    }
}

/// A CONNECT request the server accepted for further checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub addr: TargetAddr,
    /// The original client from `forwarded: for=`, when present and well formed.
    pub forwarded_for: Option<SocketAddr>,
    /// The service hostname from `forwarded: ...;host=`.
    pub forwarded_host: Option<String>,
    /// The source workload, when the `baggage` header is present and well formed.
    pub baggage: Option<Baggage>,
    pub traceparent: Option<String>,
}

/// Why a CONNECT stream is refused: answered with `status` and no body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("hbone request rejected with {status}: {reason}")]
pub struct Rejection {
    pub status: StatusCode,
    pub reason: String,
}

impl Rejection {
    pub fn new(status: StatusCode, reason: impl Into<String>) -> Self {
        Rejection {
            status,
            reason: reason.into(),
        }
    }

    /// 400: the request itself is wrong.
    pub fn bad_request(reason: impl Into<String>) -> Self {
        Rejection::new(StatusCode::BAD_REQUEST, reason)
    }

    /// 401: authorization policy denied the connection.
    pub fn unauthorized(reason: impl Into<String>) -> Self {
        Rejection::new(StatusCode::UNAUTHORIZED, reason)
    }

    /// 503: unknown workload, service or port, or the upstream could not be reached.
    pub fn unavailable(reason: impl Into<String>) -> Self {
        Rejection::new(StatusCode::SERVICE_UNAVAILABLE, reason)
    }
}

/// Checks a CONNECT request that arrived on a connection to `arrived_on` (the pod IP the
/// client dialled) and extracts where it wants to go.
///
/// Only the 400 cases are decided here; which targets exist (503) and who may reach them
/// (401) is for the caller. Malformed `forwarded` or `baggage` headers are ignored rather
/// than refused: they inform telemetry, not routing.
pub fn parse_connect<B>(req: &http::Request<B>, arrived_on: IpAddr) -> Result<Target, Rejection> {
    parse_connect_on(req, Some(arrived_on))
}

/// [`parse_connect`], where `None` takes an IP authority whatever address the connection
/// arrived on (a waypoint: the authority is the service VIP or workload behind it).
pub fn parse_connect_on<B>(
    req: &http::Request<B>,
    arrived_on: Option<IpAddr>,
) -> Result<Target, Rejection> {
    if req.method() != Method::CONNECT {
        return Err(Rejection::bad_request(format!(
            "method {} is not CONNECT",
            req.method()
        )));
    }
    let authority = req
        .uri()
        .authority()
        .ok_or_else(|| Rejection::bad_request("CONNECT request has no authority"))?;
    let addr = authority
        .as_str()
        .parse::<TargetAddr>()
        .map_err(|e| Rejection::bad_request(e.to_string()))?;
    if let (TargetAddr::Ip(ip), Some(arrived_on)) = (&addr, arrived_on) {
        // A dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d.
        if ip.ip().to_canonical() != arrived_on.to_canonical() {
            return Err(Rejection::bad_request(format!(
                "authority {ip} does not match the address {arrived_on} the connection arrived on"
            )));
        }
    }

    let headers = req.headers();
    let text = |name: &HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    let (forwarded_for, forwarded_host) = text(&FORWARDED).map(parse_forwarded).unwrap_or_default();
    let baggage = text(&BAGGAGE).and_then(|v| match v.parse::<Baggage>() {
        Ok(b) => Some(b),
        Err(error) => {
            tracing::debug!(%error, "ignoring baggage header");
            None
        }
    });
    Ok(Target {
        addr,
        forwarded_for,
        forwarded_host,
        baggage,
        traceparent: text(&TRACEPARENT).map(str::to_owned),
    })
}

/// Reads `for` and `host` from the first element of a `forwarded` header (RFC 7239 §4);
/// later elements describe proxies further along, which HBONE never adds.
fn parse_forwarded(value: &str) -> (Option<SocketAddr>, Option<String>) {
    let first = value.split(',').next().unwrap_or_default();
    let (mut forwarded_for, mut host) = (None, None);
    for pair in first.split(';') {
        let Some((key, value)) = pair.split_once('=') else {
            continue;
        };
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(value);
        match key.trim().to_ascii_lowercase().as_str() {
            "for" => forwarded_for = value.parse::<SocketAddr>().ok(),
            "host" if !value.is_empty() => host = Some(value.to_owned()),
            _ => {}
        }
    }
    (forwarded_for, host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn sample_baggage() -> Baggage {
        Baggage {
            cluster: "Kubernetes".into(),
            namespace: "default".into(),
            workload_type: "deployment".into(),
            workload_name: "productpage-v1".into(),
            service: "productpage".into(),
            revision: "v1".into(),
        }
    }

    fn connect(authority: &str) -> http::Request<()> {
        let mut req = http::Request::new(());
        *req.method_mut() = Method::CONNECT;
        *req.uri_mut() =
            Uri::from(http::uri::Authority::from_str(authority).expect("test authority is valid"));
        req
    }

    #[test]
    fn connect_request_has_only_method_and_authority() {
        let mut r = ConnectRequest::new("10.0.0.7:8080", "10.0.0.1:41234".parse().expect("addr"));
        r.baggage = sample_baggage();
        let req = r.to_http().expect("valid request");
        assert_eq!(req.method(), Method::CONNECT);
        assert_eq!(
            req.uri().authority().map(|a| a.as_str()),
            Some("10.0.0.7:8080")
        );
        assert_eq!(req.uri().scheme(), None);
        assert_eq!(req.uri().path_and_query(), None);
        let h = req.headers();
        assert_eq!(h[FORWARDED], "for=\"10.0.0.1:41234\"");
        assert_eq!(
            h[BAGGAGE],
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,\
             k8s.deployment.name=productpage-v1,service.name=productpage,service.version=v1"
        );
        assert_eq!(h[TRACEPARENT], r.traceparent.as_str());
    }

    #[test]
    fn forwarded_brackets_ipv6_and_adds_host() {
        let mut r = ConnectRequest::new("[fd00::7]:80", "[fd00::1]:5555".parse().expect("addr"));
        r.forwarded_host = Some("reviews.default.svc.cluster.local".into());
        assert_eq!(
            r.forwarded(),
            "for=\"[fd00::1]:5555\";host=reviews.default.svc.cluster.local"
        );
    }

    #[test]
    fn request_round_trips_through_parse_connect() {
        for (authority, forwarded_for, host) in [
            ("10.0.0.7:8080", "10.0.0.1:41234", None),
            (
                "[fd00::7]:8080",
                "[fd00::1]:41234",
                Some("reviews.default.svc.cluster.local"),
            ),
        ] {
            let mut r = ConnectRequest::new(authority, forwarded_for.parse().expect("addr"));
            r.forwarded_host = host.map(str::to_owned);
            r.baggage = sample_baggage();
            let req = r.to_http().expect("valid request");
            let TargetAddr::Ip(dst) = authority.parse::<TargetAddr>().expect("authority") else {
                panic!("{authority} is an ip authority");
            };
            let t = parse_connect(&req, dst.ip()).expect("accepted");
            assert_eq!(t.addr, TargetAddr::Ip(dst));
            assert_eq!(t.forwarded_for, Some(r.forwarded_for));
            assert_eq!(t.forwarded_host.as_deref(), host);
            assert_eq!(t.baggage, Some(sample_baggage()));
            assert_eq!(t.traceparent.as_deref(), Some(r.traceparent.as_str()));
        }
    }

    #[test]
    fn parse_connect_table() {
        let pod = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7));
        let pod6 = IpAddr::V6("fd00::7".parse::<Ipv6Addr>().expect("v6"));
        let ok = |addr: TargetAddr| Ok::<_, StatusCode>(addr);
        let cases: [(&str, IpAddr, Result<TargetAddr, StatusCode>); 9] = [
            (
                "10.0.0.7:8080",
                pod,
                ok(TargetAddr::Ip("10.0.0.7:8080".parse().expect("addr"))),
            ),
            (
                "[fd00::7]:443",
                pod6,
                ok(TargetAddr::Ip("[fd00::7]:443".parse().expect("addr"))),
            ),
            (
                "reviews.default.svc.cluster.local:9080",
                pod,
                ok(TargetAddr::Host {
                    name: "reviews.default.svc.cluster.local".into(),
                    port: 9080,
                }),
            ),
            ("10.0.0.8:8080", pod, Err(StatusCode::BAD_REQUEST)),
            ("[fd00::8]:443", pod6, Err(StatusCode::BAD_REQUEST)),
            ("10.0.0.7", pod, Err(StatusCode::BAD_REQUEST)),
            ("10.0.0.7:0", pod, Err(StatusCode::BAD_REQUEST)),
            ("reviews", pod, Err(StatusCode::BAD_REQUEST)),
            ("999.0.0.7:80", pod, Err(StatusCode::BAD_REQUEST)),
        ];
        for (authority, arrived_on, want) in cases {
            let got = parse_connect(&connect(authority), arrived_on)
                .map(|t| t.addr)
                .map_err(|r| r.status);
            assert_eq!(got, want, "authority {authority}");
        }
    }

    #[test]
    fn ipv4_mapped_arrival_address_matches() {
        let mapped: IpAddr = "::ffff:10.0.0.7".parse().expect("addr");
        assert!(parse_connect(&connect("10.0.0.7:80"), mapped).is_ok());
    }

    #[test]
    fn wrong_method_is_rejected_with_400() {
        let mut req = connect("10.0.0.7:80");
        *req.method_mut() = Method::GET;
        let err = parse_connect(&req, "10.0.0.7".parse().expect("ip")).expect_err("GET");
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert!(err.reason.contains("GET"), "{}", err.reason);
    }

    #[test]
    fn missing_authority_is_rejected_with_400() {
        let mut req = http::Request::new(());
        *req.method_mut() = Method::CONNECT;
        let err = parse_connect(&req, "10.0.0.7".parse().expect("ip")).expect_err("no authority");
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn to_http_refuses_bad_authority() {
        for authority in ["", "10.0.0.7", "a b:80", "host:+80", "user@host:80"] {
            let r = ConnectRequest::new(authority, "10.0.0.1:1".parse().expect("addr"));
            assert!(
                matches!(r.to_http(), Err(Error::InvalidAuthority { .. })),
                "{authority:?}"
            );
        }
    }

    #[test]
    fn baggage_round_trip_omits_empty_values() {
        assert_eq!(
            sample_baggage().to_string().parse::<Baggage>().ok(),
            Some(sample_baggage())
        );
        let partial = Baggage {
            namespace: "ns".into(),
            workload_type: "pod".into(),
            workload_name: "p-1".into(),
            ..Baggage::default()
        };
        assert_eq!(
            partial.to_string(),
            "k8s.namespace.name=ns,k8s.pod.name=p-1"
        );
        assert_eq!(partial.to_string().parse::<Baggage>().ok(), Some(partial));
        // A name without a kind cannot be written as k8s.<type>.name.
        let no_type = Baggage {
            workload_name: "p-1".into(),
            ..Baggage::default()
        };
        assert_eq!(no_type.to_string(), "");
    }

    #[test]
    fn baggage_ignores_foreign_members_and_refuses_garbage() {
        let b: Baggage = "userId=alice, k8s.daemonset.name=ds;p=1,service.name=s"
            .parse()
            .expect("valid baggage");
        assert_eq!(b.workload_type, "daemonset");
        assert_eq!(b.workload_name, "ds");
        assert_eq!(b.service, "s");
        assert!(matches!(
            "k8s.cluster.name".parse::<Baggage>(),
            Err(Error::MalformedBaggage { .. })
        ));
    }

    #[test]
    fn forwarded_parsing_tolerates_variants() {
        let cases = [
            ("for=\"10.0.0.1:80\"", Some("10.0.0.1:80"), None),
            (
                "for=\"[fd00::1]:80\";host=a.b",
                Some("[fd00::1]:80"),
                Some("a.b"),
            ),
            (
                "For=10.0.0.1:80;Host=\"x\", for=\"1.1.1.1:1\"",
                Some("10.0.0.1:80"),
                Some("x"),
            ),
            ("for=unknown", None, None),
        ];
        for (value, want_for, want_host) in cases {
            let (f, h) = parse_forwarded(value);
            assert_eq!(f, want_for.map(|a| a.parse().expect("addr")), "{value}");
            assert_eq!(h.as_deref(), want_host, "{value}");
        }
    }

    #[test]
    fn traceparent_has_w3c_format() {
        let a = new_traceparent();
        let parts: Vec<&str> = a.split('-').collect();
        assert_eq!(parts.len(), 4, "{a}");
        assert_eq!(parts[0], "00");
        assert_eq!(parts[1].len(), 32);
        assert_eq!(parts[2].len(), 16);
        assert_eq!(parts[3], "00");
        let lower_hex = |s: &str| {
            s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        assert!(lower_hex(parts[1]) && lower_hex(parts[2]), "{a}");
        assert_ne!(a, new_traceparent(), "ids are random");
    }
}
