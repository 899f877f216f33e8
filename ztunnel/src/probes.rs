//! Kubelet probes. In Istio's ambient mode, istio-cni SNATs connections that processes in
//! the node's network namespace (the kubelet among them) open to ambient pods to a fixed
//! link-local address (169.254.7.127, `fd16:9254:7127:1337:ffff:ffff:ffff:ffff` for IPv6),
//! and the pod's own rules let that source past ztunnel, so health probes reach pods whose
//! PeerAuthentication is STRICT. Without istio-cni (`--source file|kube`) nobody SNATs:
//! the probes arrive from the node's own addresses. ztunnel therefore treats plaintext
//! connections from `--probe-sources` — Istio's two SNAT addresses and, with `node`, the
//! addresses of the node's network namespace — as probes: carried to the app without
//! authorization (as Istio's bypass is) and kept out of Istio's metric families (which
//! never see Istio's probes either). Anyone else outside the mesh is policed as before.
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    str::FromStr,
    sync::{Arc, RwLock},
};

use serde::Serialize;

use crate::netns::{self, Netns};

/// istio-cni's default probe SNAT address (`HOST_PROBE_SNAT_IP`).
pub const ISTIO_PROBE_SNAT_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 7, 127);
/// istio-cni's default IPv6 probe SNAT address (`HOST_PROBE_V6_SNAT_IP`).
pub const ISTIO_PROBE_SNAT_V6: Ipv6Addr = Ipv6Addr::new(
    0xfd16, 0x9254, 0x7127, 0x1337, 0xffff, 0xffff, 0xffff, 0xffff,
);

/// One entry of `--probe-sources`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ProbeSource {
    /// A fixed address.
    Addr(IpAddr),
    /// Every address of the node's network namespace (loopback left out).
    #[serde(serialize_with = "node_keyword")]
    Node,
}

fn node_keyword<S: serde::Serializer>(s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str("node")
}

impl FromStr for ProbeSource {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s == "node" {
            return Ok(Self::Node);
        }
        s.parse().map(Self::Addr).map_err(|_| {
            format!("{s:?} is neither an IP address nor `node` (the node's own addresses)")
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to list the addresses of the node's network namespace {path}")]
    Addresses {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error(transparent)]
    Netns(#[from] netns::Error),
}

/// The probe sources in force: the fixed ones and, when configured, the node's addresses
/// as last read.
#[derive(Debug, Default)]
pub struct ProbeSources {
    fixed: BTreeSet<IpAddr>,
    /// The node's network namespace, when `node` is configured.
    node_netns: Option<PathBuf>,
    current: RwLock<Arc<BTreeSet<IpAddr>>>,
}

impl ProbeSources {
    /// `node` entries read the addresses of `node_netns` (see [`Self::refresh`]).
    pub fn new(sources: &[ProbeSource], node_netns: PathBuf) -> Self {
        let fixed: BTreeSet<IpAddr> = sources
            .iter()
            .filter_map(|s| match s {
                ProbeSource::Addr(ip) => Some(canonical(*ip)),
                ProbeSource::Node => None,
            })
            .collect();
        Self {
            current: RwLock::new(Arc::new(fixed.clone())),
            fixed,
            node_netns: sources.contains(&ProbeSource::Node).then_some(node_netns),
        }
    }

    /// Whether a plaintext connection from `ip` is a probe.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&canonical(ip))
    }

    /// The addresses in force now.
    pub fn addresses(&self) -> Vec<IpAddr> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect()
    }

    /// Whether the node's addresses are part of the set (and need refreshing).
    pub fn follows_node(&self) -> bool {
        self.node_netns.is_some()
    }

    /// Reads the node's addresses again (blocking: enters the node's netns on this
    /// thread). On failure the previous set stays in force.
    pub fn refresh(&self, home: &Netns) -> Result<(), Error> {
        let Some(path) = &self.node_netns else {
            return Ok(());
        };
        let node = Netns::open(path)?;
        let addrs = node
            .run(home, nix::ifaddrs::getifaddrs)?
            .map_err(|source| Error::Addresses {
                path: path.clone(),
                source,
            })?;
        let mut set = self.fixed.clone();
        set.extend(
            addrs
                .filter_map(|a| a.address)
                .filter_map(|a| {
                    a.as_sockaddr_in()
                        .map(|s| IpAddr::V4(s.ip()))
                        .or_else(|| a.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))
                })
                .filter(|ip| !ip.is_loopback())
                .map(canonical),
        );
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        if **current != set {
            tracing::info!(addresses = ?set, "kubelet probe sources");
            *current = Arc::new(set);
        }
        Ok(())
    }
}

/// v4-mapped IPv6 addresses compare as IPv4 (a dual-stack listener reports them so).
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse_addresses_and_the_node_keyword() {
        assert_eq!(
            "169.254.7.127".parse::<ProbeSource>(),
            Ok(ProbeSource::Addr(IpAddr::V4(ISTIO_PROBE_SNAT_V4)))
        );
        assert_eq!(
            " fd16:9254:7127:1337:ffff:ffff:ffff:ffff".parse::<ProbeSource>(),
            Ok(ProbeSource::Addr(IpAddr::V6(ISTIO_PROBE_SNAT_V6)))
        );
        assert_eq!("node".parse::<ProbeSource>(), Ok(ProbeSource::Node));
        let err = "10.0.0.0/8".parse::<ProbeSource>().expect_err("a CIDR");
        assert!(err.contains("\"10.0.0.0/8\" is neither"), "{err}");
        // As the config dump shows them.
        let shown = serde_json::to_string(&[
            ProbeSource::Addr(IpAddr::V4(ISTIO_PROBE_SNAT_V4)),
            ProbeSource::Node,
        ])
        .expect("serializes");
        assert_eq!(shown, r#"["169.254.7.127","node"]"#);
    }

    #[test]
    fn fixed_sources_match_with_and_without_v4_mapping() {
        let p = ProbeSources::new(
            &[
                ProbeSource::Addr(IpAddr::V4(ISTIO_PROBE_SNAT_V4)),
                ProbeSource::Addr(IpAddr::V6(ISTIO_PROBE_SNAT_V6)),
            ],
            PathBuf::from("/proc/1/ns/net"),
        );
        assert!(!p.follows_node());
        assert!(p.contains(IpAddr::V4(ISTIO_PROBE_SNAT_V4)));
        assert!(p.contains("::ffff:169.254.7.127".parse().expect("valid")));
        assert!(p.contains(IpAddr::V6(ISTIO_PROBE_SNAT_V6)));
        assert!(!p.contains("169.254.7.126".parse().expect("valid")));
        assert!(!ProbeSources::default().contains(IpAddr::V4(ISTIO_PROBE_SNAT_V4)));
    }

    #[test]
    fn node_addresses_come_from_the_node_netns_without_loopback() {
        // This test's own netns stands in for the node's.
        let home = Netns::current().expect("own netns");
        let p = ProbeSources::new(&[ProbeSource::Node], PathBuf::from("/proc/self/ns/net"));
        assert!(p.follows_node());
        p.refresh(&home).expect("own addresses");
        assert!(!p.contains(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        let own: Vec<IpAddr> = nix::ifaddrs::getifaddrs()
            .expect("getifaddrs")
            .filter_map(|a| a.address)
            .filter_map(|a| a.as_sockaddr_in().map(|s| IpAddr::V4(s.ip())))
            .filter(|ip| !ip.is_loopback())
            .collect();
        for ip in own {
            assert!(p.contains(ip), "{ip} missing from {:?}", p.addresses());
        }
        let missing = ProbeSources::new(&[ProbeSource::Node], PathBuf::from("/nonexistent"));
        let err = missing.refresh(&home).expect_err("no such netns");
        assert!(err.to_string().contains("/nonexistent"), "{err}");
    }
}
