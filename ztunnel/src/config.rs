//! ztunnel's configuration: flags and environment, parsed once at start-up (clap),
//! validated, logged, and shown on the admin port.
use std::{net::SocketAddr, path::PathBuf};

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Where workloads, services, policies and this node's pods come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The local workload file (`--workloads`), watched for changes.
    File,
    /// The Kubernetes API (Pods, Namespaces, Services), with each local pod's netns and
    /// cgroup found under the node's /proc and cgroup tree.
    Kube,
    /// istiod over delta xDS, and this node's pods from istio-cni over ZDS.
    Istio,
}

/// Who signs workload certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Ca {
    /// ztunnel's own CA (`--ca-dir`, or the `--ca-secret` Secret with `--source kube`).
    Builtin,
    /// Istio's CA (istiod's `IstioCertificateService`).
    Istio,
}

#[derive(Debug, Clone, clap::Args, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Config {
    /// Where workloads and this node's pods come from: `file` (`--workloads`), `kube` (the
    /// Kubernetes API, in-cluster or through KUBECONFIG) or `istio` (istiod and istio-cni).
    #[arg(long, env = "ZTUNNEL_SOURCE", value_enum, default_value = "file")]
    pub source: Source,

    /// The local workload file (the embedded control plane): namespaces, workloads and
    /// this node's pods with their netns and cgroup. Watched for changes. Required with
    /// `--source file`.
    #[arg(long, env = "ZTUNNEL_WORKLOADS")]
    pub workloads: Option<PathBuf>,

    /// The SPIFFE trust domain of pod identities (`--source kube`, and pods istio-cni
    /// hands over before istiod has described them).
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,

    /// `--source kube`: the Secret (`namespace/name`) holding the built-in CA's root, shared
    /// by every node; the first ztunnel creates it, nobody overwrites it.
    #[arg(
        long,
        env = "ZTUNNEL_CA_SECRET",
        default_value = "istio-system/ztunnel-ca-root"
    )]
    pub ca_secret: String,

    /// `--source kube`: the host's /proc, where each pod's network namespace is found from
    /// a process in its cgroup (the DaemonSet runs with hostPID).
    #[arg(long, env = "ZTUNNEL_HOST_PROC", default_value = "/proc")]
    pub host_proc: PathBuf,

    /// Sources whose plaintext connections are the node's kubelet probes: they reach
    /// pods without authorization (STRICT mTLS included), as istio-cni's probe SNAT lets
    /// them past ztunnel in Istio. IP addresses, or `node` for every address of the node's
    /// network namespace (`<host proc>/1/ns/net`, re-read every 30 s). Empty (`""`) for none.
    #[arg(
        long,
        env = "ZTUNNEL_PROBE_SOURCES",
        value_delimiter = ',',
        default_value = "169.254.7.127,fd16:9254:7127:1337:ffff:ffff:ffff:ffff,node"
    )]
    pub probe_sources: Vec<ProbeSourceArg>,

    /// Who signs workload certificates; defaults to `istio` with `--source istio`, else
    /// `builtin`.
    #[arg(long, env = "ZTUNNEL_CA", value_enum)]
    pub ca: Option<Ca>,

    /// istiod, its CA and istio-cni.
    #[command(flatten)]
    #[serde(flatten)]
    pub istio: crate::istio::IstioConfig,

    /// This node's name; only workloads with this `node` are captured.
    #[arg(long, env = "NODE_NAME")]
    pub node: String,

    /// How pod traffic is captured: `auto` picks eBPF when the kernel supports it
    /// (Linux >= 5.15) and iptables otherwise.
    #[arg(long, env = "ZTUNNEL_CAPTURE", value_enum, default_value = "auto")]
    pub capture: crate::capture::Mode,

    /// Where the eBPF programs and maps are pinned (a directory on bpffs).
    #[arg(
        long,
        env = "ZTUNNEL_BPF_PIN_DIR",
        default_value = "/sys/fs/bpf/ztunnel"
    )]
    pub bpf_pin_dir: PathBuf,

    /// Move ztunnel into this cgroup v2 directory at start-up (created if missing). It
    /// must be below the cgroup2 mount (not the mount itself) and must not be an ancestor
    /// of any pod's cgroup. Without it ztunnel stays where it is started, which must not
    /// be the root cgroup.
    #[arg(long, env = "ZTUNNEL_CGROUP")]
    pub cgroup: Option<PathBuf>,

    /// How long a config change that takes something away (a workload, service,
    /// namespace or policy missing from the new version, or a pod relabelled out of the
    /// mesh) must hold before it takes effect, with `--source file` and `--source kube`.
    /// A half-written file or a relist that briefly lacks a pod then unenrols nothing; a
    /// real removal takes effect this much later. Additions and other changes apply at
    /// once. At most 5m; `0s` applies removals at once.
    #[arg(long, env = "ZTUNNEL_CONFIG_SETTLE", default_value = "3s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub config_settle: std::time::Duration,

    /// Where the built-in CA keeps its root key and certificate (created on first run;
    /// every node that should trust each other must share the same root).
    #[arg(long, env = "ZTUNNEL_CA_DIR", default_value = "/var/lib/ztunnel/ca")]
    pub ca_dir: PathBuf,

    /// Lifetime of workload certificates (renewed at half of it), e.g. `24h`, `90m`.
    #[arg(long, env = "ZTUNNEL_CERT_LIFETIME", default_value = "24h", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub cert_lifetime: std::time::Duration,

    /// Start with the same-node sk_msg fast path on (switchable at runtime on the admin port).
    #[arg(long, env = "ZTUNNEL_FAST_PATH", default_value_t = false, action = clap::ArgAction::Set)]
    pub fast_path: bool,

    /// The admin API's address; it must be a loopback address.
    #[arg(long, env = "ZTUNNEL_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,

    /// Where Prometheus scrapes `/metrics` (Istio's port 15020).
    #[arg(long, env = "ZTUNNEL_METRICS_ADDR", default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,

    /// Where the kubelet probes `/healthz/ready` (Istio's port 15021).
    #[arg(long, env = "ZTUNNEL_READINESS_ADDR", default_value = "0.0.0.0:15021")]
    pub readiness_addr: SocketAddr,

    /// Log format.
    #[arg(long, env = "ZTUNNEL_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// The longest `--config-settle`: removals must not wait without bound.
const MAX_CONFIG_SETTLE: std::time::Duration = std::time::Duration::from_secs(300);

/// One `--probe-sources` entry; an empty one (`--probe-sources ""`) stands for none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct ProbeSourceArg(pub Option<crate::probes::ProbeSource>);

impl std::str::FromStr for ProbeSourceArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().is_empty() {
            return Ok(Self(None));
        }
        s.parse().map(|p| Self(Some(p)))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration:\n{}", .problems.join("\n"))]
    Invalid { problems: Vec<String> },
}

impl Config {
    /// The CA in use (`--ca`, or the source's default).
    pub fn ca(&self) -> Ca {
        self.ca.unwrap_or(match self.source {
            Source::Istio => Ca::Istio,
            Source::File | Source::Kube => Ca::Builtin,
        })
    }

    /// The `--probe-sources` entries that name something.
    pub fn probe_sources(&self) -> Vec<crate::probes::ProbeSource> {
        self.probe_sources.iter().filter_map(|p| p.0).collect()
    }

    /// Checks every field and reports all problems together.
    pub fn validate(&self) -> Result<(), Error> {
        let mut problems = Vec::new();
        if !self.admin_addr.ip().is_loopback() {
            problems.push(format!(
                "--admin-addr {}: the admin API serves only loopback addresses",
                self.admin_addr
            ));
        }
        if self.source == Source::File && self.workloads.is_none() {
            problems.push("--workloads: required with --source file".to_owned());
        }
        if self.node.trim().is_empty() {
            problems.push("--node: must not be empty".to_owned());
        }
        if !self.bpf_pin_dir.is_absolute() {
            problems.push(format!(
                "--bpf-pin-dir {}: must be an absolute path",
                self.bpf_pin_dir.display()
            ));
        }
        if self.source == Source::Kube
            && let Some(w) = &self.workloads
        {
            problems.push(format!(
                "--workloads {}: only read with --source file",
                w.display()
            ));
        }
        if self.trust_domain.trim().is_empty() || self.trust_domain.contains('/') {
            problems.push(format!(
                "--trust-domain {:?}: must be a non-empty name without '/'",
                self.trust_domain
            ));
        }
        if self.source == Source::Kube && crate::kube::split_secret_ref(&self.ca_secret).is_none() {
            problems.push(format!(
                "--ca-secret {:?}: must be `namespace/name`",
                self.ca_secret
            ));
        }
        if let Some(cg) = &self.cgroup
            && !cg.is_absolute()
        {
            problems.push(format!(
                "--cgroup {}: must be an absolute path",
                cg.display()
            ));
        }
        if self.config_settle > MAX_CONFIG_SETTLE {
            problems.push(format!(
                "--config-settle {}: must be at most {}",
                humantime::format_duration(self.config_settle),
                humantime::format_duration(MAX_CONFIG_SETTLE)
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::Invalid { problems })
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        config: Config,
    }

    fn parse(args: &[&str]) -> Config {
        Cli::try_parse_from(std::iter::once("ztunnel").chain(args.iter().copied()))
            .expect("flags parse")
            .config
    }

    #[test]
    fn defaults_are_istio_ports_and_pins() {
        let c = parse(&["--workloads", "/w.yaml", "--node", "n1"]);
        assert_eq!(c.admin_addr, "127.0.0.1:15000".parse().expect("addr"));
        assert_eq!(c.bpf_pin_dir, PathBuf::from("/sys/fs/bpf/ztunnel"));
        assert!(!c.fast_path);
        c.validate().expect("defaults are valid");
        assert_eq!(c.source, Source::File);
        assert_eq!(c.ca(), Ca::Builtin);
        assert_eq!(c.config_settle, std::time::Duration::from_secs(3));
    }

    #[test]
    fn config_settle_is_bounded() {
        let c = parse(&[
            "--workloads",
            "/w.yaml",
            "--node",
            "n1",
            "--config-settle",
            "0s",
        ]);
        c.validate().expect("zero applies removals at once");
        let err = parse(&[
            "--workloads",
            "/w.yaml",
            "--node",
            "n1",
            "--config-settle",
            "1h",
        ])
        .validate()
        .expect_err("too long")
        .to_string();
        assert!(
            err.contains("--config-settle 1h: must be at most 5m"),
            "{err}"
        );
    }

    #[test]
    fn istio_source_needs_no_file_and_defaults_to_istio_ca() {
        let c = parse(&["--source", "istio", "--node", "n1"]);
        c.validate().expect("istio mode needs no workload file");
        assert_eq!(c.ca(), Ca::Istio);
        assert_eq!(
            c.istio.zds_socket,
            PathBuf::from("/var/run/ztunnel/ztunnel.sock")
        );
        assert_eq!(c.istio.xds_address, "https://istiod.istio-system.svc:15012");
        let mixed = parse(&["--workloads", "/w.yaml", "--node", "n1", "--ca", "istio"]);
        assert_eq!(mixed.ca(), Ca::Istio);
        let err = parse(&["--node", "n1"]).validate().expect_err("no file");
        assert!(err.to_string().contains("--workloads"), "{err}");
    }

    #[test]
    fn probe_sources_default_to_istios_snat_addresses_and_the_node() {
        use crate::probes::{ISTIO_PROBE_SNAT_V4, ISTIO_PROBE_SNAT_V6, ProbeSource};
        let c = parse(&["--workloads", "/w.yaml", "--node", "n1"]);
        assert_eq!(
            c.probe_sources(),
            vec![
                ProbeSource::Addr(ISTIO_PROBE_SNAT_V4.into()),
                ProbeSource::Addr(ISTIO_PROBE_SNAT_V6.into()),
                ProbeSource::Node,
            ]
        );
        let none = parse(&[
            "--workloads",
            "/w.yaml",
            "--node",
            "n1",
            "--probe-sources",
            "",
        ]);
        assert!(none.probe_sources().is_empty());
        let one = parse(&[
            "--workloads",
            "/w.yaml",
            "--node",
            "n1",
            "--probe-sources",
            "10.1.1.1",
        ]);
        assert_eq!(
            one.probe_sources(),
            vec![ProbeSource::Addr("10.1.1.1".parse().expect("valid"))]
        );
        let cli = Cli::try_parse_from(["ztunnel", "--node", "n1", "--probe-sources", "kubelet"]);
        let err = cli.err().expect("not an address").to_string();
        assert!(err.contains("--probe-sources"), "{err}");
    }

    #[test]
    fn every_invalid_field_is_reported_together() {
        let c = parse(&[
            "--workloads",
            "/w.yaml",
            "--node",
            " ",
            "--admin-addr",
            "0.0.0.0:15000",
            "--bpf-pin-dir",
            "relative",
        ]);
        let err = c.validate().expect_err("invalid").to_string();
        for needle in [
            "--admin-addr 0.0.0.0:15000",
            "--node",
            "--bpf-pin-dir relative",
        ] {
            assert!(err.contains(needle), "missing {needle:?} in {err}");
        }
    }

    #[test]
    fn workloads_file_is_required_only_for_the_file_source() {
        let err = parse(&["--node", "n1"]).validate().expect_err("no file");
        assert!(err.to_string().contains("--workloads: required"), "{err}");
        let c = parse(&["--node", "n1", "--source", "kube"]);
        assert_eq!(c.source, Source::Kube);
        c.validate().expect("kube needs no workload file");
        let err = parse(&["--node", "n1", "--source", "kube", "--ca-secret", "nons"])
            .validate()
            .expect_err("bad secret ref")
            .to_string();
        assert!(err.contains("--ca-secret \"nons\""), "{err}");
        let err = parse(&["--node", "n1", "--source", "kube", "--workloads", "/w.yaml"])
            .validate()
            .expect_err("a file the kube source would ignore")
            .to_string();
        assert!(err.contains("only read with --source file"), "{err}");
    }
}
