//! Istio's ztunnel as the bench's scenario I: one instance inside each pod's network
//! namespace in its dedicated mode (`PROXY_MODE=dedicated`, a sidecar-like deployment of
//! the same proxy code), with the in-pod iptables rule of Istio's own
//! `scripts/ztunnel-redirect.sh`, its workloads from a local file (`LOCAL_XDS_PATH`, no
//! istiod) and certificates from its built-in fake CA (`FAKE_CA=true`, which needs its
//! `testing` feature). Every instance's fake CA signs with the same compiled-in root, so the
//! client's instance and the server's speak HBONE over mTLS to each other, verifying the
//! SPIFFE identities the workload file gives.
//!
//! The binary is built from Istio's public repository (docs/bench/README.md says how);
//! nothing of it is vendored here.
use std::{
    fs::File,
    net::{Ipv4Addr, SocketAddr},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::Serialize;

use crate::{Pod, PodProcess, Topology};

/// The mark Istio's ztunnel puts on its own sockets (`PACKET_MARK`), and that its redirect
/// rule exempts: 0x539, the value of Istio's `scripts/ztunnel-redirect.sh`.
pub const PACKET_MARK: u32 = 1337;
/// Istio's ztunnel's outbound listener (where the in-pod rule redirects the app's connects).
pub const OUTBOUND_PORT: u16 = 15001;
/// Its readiness endpoint (`/healthz/ready`), bound on every address of the pod.
pub const READINESS_PORT: u16 = 15021;
/// Its Prometheus endpoint (`/metrics`).
pub const METRICS_PORT: u16 = 15020;
/// The trust domain of the workloads' SPIFFE identities (Istio's default).
const TRUST_DOMAIN: &str = "cluster.local";

/// One entry of Istio's local workload file (its `LocalWorkload`: a `Workload` plus the
/// service ports, camelCase, unknown fields rejected, so only fields it knows).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct LocalWorkload {
    uid: String,
    name: String,
    namespace: String,
    trust_domain: &'static str,
    service_account: String,
    workload_ips: Vec<String>,
    /// `HBONE`: the peer's ztunnel terminates the tunnel on port 15008.
    protocol: &'static str,
    node: String,
    /// Service name → (service port → target port); required by Istio's format, empty here.
    services: std::collections::BTreeMap<String, ()>,
}

#[derive(Debug, Serialize)]
struct LocalConfig {
    workloads: Vec<LocalWorkload>,
    policies: Vec<()>,
    services: Vec<()>,
}

/// Istio's local workload file for `pods`: each an HBONE workload on its node, with the
/// service account (and so the SPIFFE identity) the topology gives it.
pub fn local_xds_yaml(pods: &[Pod]) -> anyhow::Result<String> {
    let cfg = LocalConfig {
        workloads: pods
            .iter()
            .map(|p| {
                let mut ips = vec![p.ip4.to_string()];
                ips.extend(p.ip6.map(|a| a.to_string()));
                LocalWorkload {
                    uid: format!("Kubernetes//Pod/default/{}", p.name),
                    name: p.name.clone(),
                    namespace: "default".to_owned(),
                    trust_domain: TRUST_DOMAIN,
                    service_account: p.service_account.clone(),
                    workload_ips: ips,
                    protocol: "HBONE",
                    node: p.node.clone(),
                    services: Default::default(),
                }
            })
            .collect(),
        policies: Vec::new(),
        services: Vec::new(),
    };
    serde_norway::to_string(&cfg).context("failed to write Istio's local workload file")
}

/// The environment of the instance in `pod` (Istio's `src/config.rs` names): dedicated mode
/// for this pod's workload, workloads from `xds_file` and no istiod, the fake CA, its mark
/// on its own sockets, and connections to the app from the pod's own address. The worker
/// thread count is left at Istio's default (2 on this machine), as operators run it.
pub fn env(pod: &Pod, xds_file: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("PROXY_MODE", "dedicated".to_owned()),
        (
            "PROXY_WORKLOAD_INFO",
            format!("default/{}/{}", pod.name, pod.service_account),
        ),
        ("LOCAL_XDS_PATH", xds_file.display().to_string()),
        // Empty means none: the local file is the only source of workloads.
        ("XDS_ADDRESS", String::new()),
        ("CA_ADDRESS", String::new()),
        ("FAKE_CA", "true".to_owned()),
        ("PACKET_MARK", PACKET_MARK.to_string()),
        ("ENABLE_ORIG_SRC", "false".to_owned()),
        ("NODE_NAME", pod.node.clone()),
    ]
}

/// The in-pod redirect of Istio's `scripts/ztunnel-redirect.sh` as `iptables` arguments:
/// every TCP connect that does not leave through `lo` and is not Istio's ztunnel's own
/// (its mark) goes to the outbound listener. Inbound needs no rule: the peer's instance
/// dials this pod's port 15008 directly.
pub fn redirect_rule() -> Vec<String> {
    [
        "-w",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "!",
        "-o",
        "lo",
        "-m",
        "mark",
        "!",
        "--mark",
        &format!("{PACKET_MARK:#x}/0xfff"),
        "-j",
        "REDIRECT",
        "--to-ports",
        &OUTBOUND_PORT.to_string(),
    ]
    .map(str::to_owned)
    .to_vec()
}

/// A running instance of Istio's ztunnel in one pod; killed when dropped (the topology
/// kills it too, with the pod's cgroup).
pub struct IstioZtunnel {
    process: PodProcess,
    pub log: PathBuf,
    pod: String,
    netns_path: PathBuf,
}

impl IstioZtunnel {
    /// Installs the redirect rule in `pod`, starts `bin` there with workloads from
    /// `xds_file` and waits until it reports ready.
    pub fn start(
        topo: &mut Topology,
        pod: &Pod,
        bin: &Path,
        xds_file: &Path,
    ) -> anyhow::Result<Self> {
        let out = Command::new("ip")
            .args(["netns", "exec", &pod.netns, "iptables"])
            .args(redirect_rule())
            .output()
            .context(
                "failed to run iptables (Debian's iptables; `cargo xtask setup` installs it)",
            )?;
        if !out.status.success() {
            bail!(
                "iptables redirect for Istio's ztunnel in {}: {}",
                pod.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let (log, logf) = topo.log_file(&format!("istio-ztunnel-{}.log", pod.name))?;
        let mut cmd = Command::new(bin);
        cmd.envs(env(pod, xds_file))
            .stdout(logf.try_clone()?)
            .stderr(logf);
        let what = format!("Istio's ztunnel {} in {}", bin.display(), pod.name);
        let process = topo.spawn_command(pod, cmd, what)?;
        let mut z = Self {
            process,
            log,
            pod: pod.name.clone(),
            netns_path: pod.netns_path.clone(),
        };
        z.wait_ready()?;
        Ok(z)
    }

    /// How many connections this instance accepted over mutual TLS (its
    /// `istio_tcp_connections_opened_total`, reported as destination, with
    /// `connection_security_policy="mutual_tls"`), so the bench can show that scenario I
    /// really tunnelled with mTLS.
    pub fn mtls_connections_accepted(&self) -> anyhow::Result<f64> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, METRICS_PORT));
        let text = http_in_netns(&self.netns_path, addr, "/metrics")
            .with_context(|| format!("metrics of Istio's ztunnel in {}", self.pod))?;
        Ok(mtls_connections_accepted(&text))
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls `/healthz/ready` from inside the pod (generous: never a speed test).
    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, READINESS_PORT));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let last = match http_in_netns(&self.netns_path, addr, "/healthz/ready") {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            if self.process.exited() {
                bail!(
                    "Istio's ztunnel in {} exited before it was ready\nits log:\n{}",
                    self.pod,
                    self.log_text()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "Istio's ztunnel in {} not ready after 60 s ({last:#})\nits log:\n{}",
                    self.pod,
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The sum of `istio_tcp_connections_opened_total` samples reported by the destination
/// over mutual TLS, in Prometheus text.
fn mtls_connections_accepted(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix("istio_tcp_connections_opened_total{"))
        .filter_map(|l| l.rsplit_once("} "))
        .filter(|(labels, _)| {
            labels.contains(r#"reporter="destination""#)
                && labels.contains(r#"connection_security_policy="mutual_tls""#)
        })
        .filter_map(|(_, v)| v.trim().parse::<f64>().ok())
        .sum()
}

/// [`crate::http`] from inside the network namespace at `netns` (on a thread of its own,
/// which alone enters it).
fn http_in_netns(netns: &Path, addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let ns = File::open(netns).with_context(|| format!("failed to open {}", netns.display()))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on a descriptor we hold open; it changes only this thread.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!(
                    "setns into {}: {}",
                    netns.display(),
                    std::io::Error::last_os_error()
                );
            }
            crate::http(addr, "GET", path)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the request thread for {} panicked", netns.display()))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, node: u8, last: u8) -> Pod {
        Pod {
            name: name.to_owned(),
            uid: format!("uid-{name}"),
            netns: format!("t-{name}"),
            netns_path: PathBuf::from(format!("/var/run/netns/t-{name}")),
            cgroup: PathBuf::from("/sys/fs/cgroup/none"),
            ip4: Ipv4Addr::new(10, 200, node, last),
            ip6: None,
            ambient: false,
            node: format!("node{node}"),
            service_account: format!("{name}-sa"),
        }
    }

    #[test]
    fn local_workload_file_lists_each_pod_as_an_hbone_workload_on_its_node() -> anyhow::Result<()> {
        let yaml = local_xds_yaml(&[pod("client", 1, 10), pod("server", 2, 11)])?;
        let v: serde_norway::Value = serde_norway::from_str(&yaml)?;
        let w = v["workloads"].as_sequence().expect("workloads");
        assert_eq!(w.len(), 2, "{yaml}");
        let server = &w[1];
        assert_eq!(server["name"].as_str(), Some("server"));
        assert_eq!(server["namespace"].as_str(), Some("default"));
        assert_eq!(server["trustDomain"].as_str(), Some("cluster.local"));
        assert_eq!(server["serviceAccount"].as_str(), Some("server-sa"));
        assert_eq!(server["protocol"].as_str(), Some("HBONE"));
        assert_eq!(server["node"].as_str(), Some("node2"));
        assert_eq!(server["workloadIps"][0].as_str(), Some("10.200.2.11"));
        assert_eq!(
            server["uid"].as_str(),
            Some("Kubernetes//Pod/default/server")
        );
        // Istio's format requires the services map and rejects fields it does not know.
        assert!(
            server["services"]
                .as_mapping()
                .is_some_and(|m| m.is_empty())
        );
        let keys: Vec<&str> = server
            .as_mapping()
            .expect("a workload is a mapping")
            .keys()
            .filter_map(|k| k.as_str())
            .collect();
        for k in keys {
            assert!(
                [
                    "uid",
                    "name",
                    "namespace",
                    "trustDomain",
                    "serviceAccount",
                    "workloadIps",
                    "protocol",
                    "node",
                    "services"
                ]
                .contains(&k),
                "unexpected field {k}"
            );
        }
        assert_eq!(v["policies"].as_sequence().map(Vec::len), Some(0));
        assert_eq!(v["services"].as_sequence().map(Vec::len), Some(0));
        Ok(())
    }

    #[test]
    fn environment_selects_dedicated_mode_for_the_pod_with_the_fake_ca_and_no_istiod() {
        let e = env(&pod("client", 1, 10), Path::new("/tmp/x/istio.yaml"));
        let get = |k: &str| {
            e.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.as_str())
                .unwrap_or_else(|| panic!("{k} not set"))
        };
        assert_eq!(get("PROXY_MODE"), "dedicated");
        assert_eq!(get("PROXY_WORKLOAD_INFO"), "default/client/client-sa");
        assert_eq!(get("LOCAL_XDS_PATH"), "/tmp/x/istio.yaml");
        assert_eq!(get("XDS_ADDRESS"), "");
        assert_eq!(get("FAKE_CA"), "true");
        assert_eq!(get("PACKET_MARK"), "1337");
        assert_eq!(get("NODE_NAME"), "node1");
        let names: Vec<&str> = e.iter().map(|(n, _)| *n).collect();
        assert!(
            !names.contains(&"ZTUNNEL_WORKER_THREADS"),
            "Istio's default worker count is what operators run"
        );
    }

    #[test]
    fn redirect_rule_exempts_the_proxy_mark_and_loopback() {
        let r = redirect_rule().join(" ");
        assert_eq!(
            r,
            "-w -t nat -A OUTPUT -p tcp ! -o lo -m mark ! --mark 0x539/0xfff \
             -j REDIRECT --to-ports 15001"
        );
    }

    #[test]
    fn only_connections_accepted_over_mutual_tls_count() {
        let text = "\
# HELP istio_tcp_connections_opened The total number of TCP connections opened.
# TYPE istio_tcp_connections_opened counter
istio_tcp_connections_opened_total{reporter=\"destination\",source_principal=\"spiffe://cluster.local/ns/default/sa/client\",connection_security_policy=\"mutual_tls\",source_zone=\"unknown\"} 2164
istio_tcp_connections_opened_total{reporter=\"destination\",connection_security_policy=\"mutual_tls\",destination_zone=\"x\"} 6
istio_tcp_connections_opened_total{reporter=\"destination\",connection_security_policy=\"unknown\"} 100
istio_tcp_connections_opened_total{reporter=\"source\",connection_security_policy=\"mutual_tls\"} 1000
istio_tcp_connections_closed_total{reporter=\"destination\",connection_security_policy=\"mutual_tls\"} 50
";
        assert_eq!(mtls_connections_accepted(text), 2170.0);
        assert_eq!(mtls_connections_accepted(""), 0.0);
    }
}
