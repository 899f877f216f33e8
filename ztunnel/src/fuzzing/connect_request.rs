//! The CONNECT request a client sends to `:15008`, as the HBONE server receives it from h2:
//! [`parse_connect`] with the `forwarded`, `baggage` and `traceparent` parsers under it.
//!
//! Input, one item per line: the address the connection arrived on, the method, the
//! `:authority`, then `name: value` headers. Lines that h2 itself would refuse (an
//! unparsable method, authority or header) are dropped, as h2 never hands such a request
//! over. The seeds are the client's own requests ([`ConnectRequest::to_http`]).
use std::net::{IpAddr, SocketAddr};

use http::{Method, Request, Uri, header::HeaderName, header::HeaderValue, uri::Authority};

use crate::hbone::{Baggage, ConnectRequest, TargetAddr, parse_connect};

pub fn run(data: &[u8]) {
    let Some((arrived_on, req)) = request(data) else {
        return;
    };
    let Ok(target) = parse_connect(&req, arrived_on) else {
        return;
    };
    // The security property: an IP authority is only ever the address the client dialled.
    if let TargetAddr::Ip(addr) = &target.addr {
        assert_eq!(
            addr.ip().to_canonical(),
            arrived_on.to_canonical(),
            "accepted an authority for another address"
        );
    }
    // What is logged and routed on is the parsed form: it must read back as itself.
    let shown = target.addr.to_string();
    assert_eq!(
        shown.parse::<TargetAddr>().ok().as_ref(),
        Some(&target.addr),
        "target {shown} does not parse back"
    );
}

/// `(arrived_on, request)` from the line format, or `None` where h2 would have refused it.
fn request(data: &[u8]) -> Option<(IpAddr, Request<()>)> {
    let mut lines = data.split(|b| *b == b'\n');
    let arrived_on: IpAddr = std::str::from_utf8(lines.next()?).ok()?.parse().ok()?;
    let method = Method::from_bytes(lines.next()?).ok()?;
    let authority = Authority::try_from(lines.next()?).ok()?;
    // h2 builds a CONNECT's URI from `:authority` alone; other methods carry a scheme and
    // a path too (RFC 9113 §8.3.1, §8.5).
    let uri = if method == Method::CONNECT {
        Uri::from(authority)
    } else {
        Uri::builder()
            .scheme("http")
            .authority(authority)
            .path_and_query("/")
            .build()
            .ok()?
    };
    let mut req = Request::new(());
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    for line in lines {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii_start());
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            req.headers_mut().append(name, value);
        }
    }
    Some((arrived_on, req))
}

/// Requests as the client builds them, plus the refused shapes the unit tests cover.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let baggage = Baggage {
        cluster: "Kubernetes".into(),
        namespace: "default".into(),
        workload_type: "deployment".into(),
        workload_name: "productpage-v1".into(),
        service: "productpage".into(),
        revision: "v1".into(),
    };
    let client = |authority: &str, from: &str, host: Option<&str>| {
        let from: SocketAddr = from.parse().expect("seed address is valid");
        let mut r = ConnectRequest::new(authority, from);
        r.forwarded_host = host.map(str::to_owned);
        r.baggage = baggage.clone();
        r
    };
    let encode = |arrived_on: &str, req: &Request<()>| {
        let mut out = format!(
            "{arrived_on}\n{}\n{}\n",
            req.method(),
            req.uri().authority().map(Authority::as_str).unwrap_or("")
        )
        .into_bytes();
        for (name, value) in req.headers() {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.push(b'\n');
        }
        out
    };
    let to_http = |r: ConnectRequest| r.to_http().expect("seed request is valid");
    let raw = |s: &str| s.as_bytes().to_vec();
    vec![
        (
            "ipv4",
            encode(
                "10.0.0.7",
                &to_http(client("10.0.0.7:8080", "10.0.0.1:41234", None)),
            ),
        ),
        (
            "ipv6-with-host",
            encode(
                "fd00::7",
                &to_http(client(
                    "[fd00::7]:8080",
                    "[fd00::1]:41234",
                    Some("reviews.default.svc.cluster.local"),
                )),
            ),
        ),
        (
            "mapped-arrival",
            encode(
                "::ffff:10.0.0.7",
                &to_http(client("10.0.0.7:80", "10.0.0.1:1", None)),
            ),
        ),
        (
            "hostname",
            encode(
                "10.0.0.7",
                &to_http(client(
                    "reviews.default.svc.cluster.local:9080",
                    "10.0.0.1:1",
                    None,
                )),
            ),
        ),
        (
            "wrong-address",
            encode(
                "10.0.0.7",
                &to_http(client("10.0.0.8:8080", "10.0.0.1:1", None)),
            ),
        ),
        ("no-port", raw("10.0.0.7\nCONNECT\n10.0.0.7\n")),
        ("port-zero", raw("10.0.0.7\nCONNECT\n10.0.0.7:0\n")),
        ("bad-ipv4", raw("10.0.0.7\nCONNECT\n999.0.0.7:80\n")),
        ("get", raw("10.0.0.7\nGET\n10.0.0.7:80\n")),
        (
            "odd-headers",
            raw(
                "10.0.0.7\nCONNECT\n10.0.0.7:80\nforwarded: For=10.0.0.1:80;Host=\"x\", for=\"1.1.1.1:1\"\nbaggage: userId=alice, k8s.daemonset.name=ds;p=1,service.name=s\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\n",
            ),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_reach_the_parser_and_the_accepted_ones_pass() {
        let mut accepted = 0;
        for (name, seed) in seeds() {
            let (arrived_on, req) = request(&seed).unwrap_or_else(|| panic!("seed {name}"));
            if parse_connect(&req, arrived_on).is_ok() {
                accepted += 1;
            }
            run(&seed);
        }
        // ipv4, ipv6-with-host, mapped-arrival, hostname, odd-headers.
        assert_eq!(accepted, 5);
    }
}
