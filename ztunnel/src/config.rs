//! ztunnel's configuration: flags and environment, parsed once at start-up (clap),
//! validated, logged, and shown on the admin port.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

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

    /// The unix socket through which an upgrade hands the pods' listening sockets from
    /// the running ztunnel to its successor (`--handover-socket`): every ztunnel serves it
    /// once it has taken over, and a starting one asks whoever serves it first. Both
    /// must see the same path (the DaemonSet mounts `/var/run/ztunnel` from the host).
    #[arg(
        long,
        env = "ZTUNNEL_HANDOVER_SOCKET",
        default_value = "/var/run/ztunnel/handover.sock"
    )]
    pub handover_socket: PathBuf,

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

    /// How long a drain (SIGTERM, `POST /quitquitquit`, a successor taking over) lets
    /// established connections run before it closes what is left (outcome `drain
    /// timeout` in the access log), e.g. `25s`; Istio's `CONNECTION_TERMINATION_DEADLINE`.
    /// Without it, derived from `--termination-grace-period-seconds` as Istio's ztunnel
    /// does (5 s less when over 10 s, else 1 s less, at least 1 s), else 5 s. At most 1h;
    /// `0s` closes everything at once.
    #[arg(long, env = "CONNECTION_TERMINATION_DEADLINE", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Option<Duration>,

    /// The pod's `terminationGracePeriodSeconds` (Istio's
    /// `TERMINATION_GRACE_PERIOD_SECONDS`; the DaemonSet sets both to the same number):
    /// the kubelet kills ztunnel this long after SIGTERM, so the drain must end sooner.
    #[arg(long, env = "TERMINATION_GRACE_PERIOD_SECONDS")]
    pub termination_grace_period_seconds: Option<u64>,

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

    /// Answer enrolled pods' DNS on their `:15053` (service hostnames from the store, the
    /// rest forwarded upstream). On by default, as Istio's ztunnel runs its DNS proxy
    /// unless the pod's `DNS_CAPTURE` metadata says `false`.
    #[arg(long, env = "ZTUNNEL_DNS_CAPTURE", default_value_t = true, action = clap::ArgAction::Set)]
    pub dns_capture: bool,

    /// The resolver config whose `nameserver`s the DNS proxy forwards to (the node's,
    /// through ztunnel's own pod).
    #[arg(
        long,
        env = "ZTUNNEL_DNS_RESOLV_CONF",
        default_value = "/etc/resolv.conf"
    )]
    pub dns_resolv_conf: PathBuf,

    /// How long a forwarded DNS query waits for the upstreams (all of them, each an equal
    /// share) before the pod gets SERVFAIL; shorter than a resolver's own 5 s, so that the
    /// pod hears the failure rather than timing out.
    #[arg(long, env = "ZTUNNEL_DNS_UPSTREAM_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub dns_upstream_timeout: Duration,

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

    /// Threads that run the proxy (Istio's `ZTUNNEL_WORKER_THREADS`): a number, a share of
    /// the cores ztunnel may use (`25%`, rounded up), or `0` for all of them. Without it,
    /// a quarter of those cores and at least 2, as Istio's ztunnel does; the cores ztunnel
    /// may use are the machine's within its cgroup's CPU quota.
    #[arg(long, env = "ZTUNNEL_WORKER_THREADS")]
    pub worker_threads: Option<WorkerThreads>,

    /// Timeouts and caps on the data path.
    #[command(flatten)]
    pub limits: Limits,
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

/// One `--worker-threads` value.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(into = "String")]
pub enum WorkerThreads {
    Count(usize),
    /// A share of the cores, in (0, 100].
    Percent(f64),
    AllCores,
}

/// The most worker threads `--worker-threads` may ask for.
const MAX_WORKER_THREADS: usize = 1024;

impl WorkerThreads {
    /// Threads for a process that may use `cores` cores.
    pub fn resolve(self, cores: usize) -> usize {
        match self {
            Self::Count(n) => n,
            Self::Percent(p) => ((cores as f64 * p / 100.0).ceil() as usize).max(1),
            Self::AllCores => cores.max(1),
        }
    }

    /// Istio's default: a quarter of the cores, at least 2.
    pub fn default_for(cores: usize) -> usize {
        cores.div_ceil(4).max(2)
    }
}

impl std::str::FromStr for WorkerThreads {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Some(p) = s.strip_suffix('%') {
            let p: f64 = p
                .trim()
                .parse()
                .map_err(|e| format!("{s:?}: not a percentage ({e})"))?;
            if !(p > 0.0 && p <= 100.0) {
                return Err(format!(
                    "{s:?}: a percentage must be above 0 and at most 100"
                ));
            }
            return Ok(Self::Percent(p));
        }
        match s.parse::<usize>() {
            Ok(0) => Ok(Self::AllCores),
            Ok(n) if n <= MAX_WORKER_THREADS => Ok(Self::Count(n)),
            Ok(n) => Err(format!("{n}: at most {MAX_WORKER_THREADS} threads")),
            Err(e) => Err(format!(
                "{s:?}: a number of threads, a percentage such as `25%`, or 0 ({e})"
            )),
        }
    }
}

impl From<WorkerThreads> for String {
    fn from(w: WorkerThreads) -> String {
        match w {
            WorkerThreads::Count(n) => n.to_string(),
            WorkerThreads::Percent(p) => format!("{p}%"),
            WorkerThreads::AllCores => "0".to_owned(),
        }
    }
}

/// Timeouts of each step of the data path and the per-listener connection cap
/// (ARCHITECTURE.md, "Limits and timeouts", says where each default comes from). Every
/// timeout ends only the connection (or stream) it belongs to, and counts in
/// `ztunnel_timeouts_total{step}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Args, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    /// TCP connects from a pod's netns: to a plain destination, to a peer's :15008 and to
    /// the app inside the pod (Istio's ztunnel: 10 s, `CONNECTION_TIMEOUT`).
    #[arg(long, env = "ZTUNNEL_TCP_CONNECT_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub tcp_connect_timeout: Duration,

    /// From accepting a connection on a pod's :15008 to the end of its TLS handshake; a
    /// client that has not finished by then is disconnected.
    #[arg(long, env = "ZTUNNEL_TLS_ACCEPT_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub tls_accept_timeout: Duration,

    /// The HTTP/2 handshake (the client's connection preface) on a pod's :15008, after TLS.
    #[arg(long, env = "ZTUNNEL_H2_ACCEPT_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub h2_accept_timeout: Duration,

    /// The client TLS handshake of an outbound HBONE connection.
    #[arg(long, env = "ZTUNNEL_TLS_CONNECT_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub tls_connect_timeout: Duration,

    /// A whole outbound HBONE dial (certificate, TCP, TLS, HTTP/2), shared by the streams
    /// waiting for it.
    #[arg(long, env = "ZTUNNEL_HBONE_DIAL_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub hbone_dial_timeout: Duration,

    /// From sending an HBONE CONNECT to its response headers; longer than the peer's
    /// connect to its app, so the peer's own answer (503) comes first.
    #[arg(long, env = "ZTUNNEL_CONNECT_RESPONSE_TIMEOUT", default_value = "15s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub connect_response_timeout: Duration,

    /// Connections one listener (a pod's :15001, :15006 or :15008, per address family)
    /// holds at once; at the cap it stops accepting and new connections wait in the
    /// kernel's backlog.
    #[arg(
        long,
        env = "ZTUNNEL_MAX_CONNECTIONS_PER_LISTENER",
        default_value_t = 16384
    )]
    pub max_connections_per_listener: usize,
}

impl Limits {
    /// The timeout of `step`.
    pub fn timeout(&self, step: crate::limits::Step) -> Duration {
        use crate::limits::Step;
        match step {
            Step::TcpConnect => self.tcp_connect_timeout,
            Step::TlsAccept => self.tls_accept_timeout,
            Step::H2Accept => self.h2_accept_timeout,
            Step::TlsConnect => self.tls_connect_timeout,
            Step::HboneDial => self.hbone_dial_timeout,
            Step::ConnectResponse => self.connect_response_timeout,
        }
    }

    fn validate(&self, problems: &mut Vec<String>) {
        for step in crate::limits::Step::ALL {
            let t = self.timeout(step);
            if t.is_zero() {
                problems.push(format!(
                    "{} 0s: must be longer than zero (every {step} would fail)",
                    step.flag()
                ));
            } else if t > MAX_TIMEOUT {
                problems.push(format!(
                    "{} {}: must be at most {} (a longer wait is no bound)",
                    step.flag(),
                    humantime::format_duration(t),
                    humantime::format_duration(MAX_TIMEOUT)
                ));
            }
        }
        if self.max_connections_per_listener == 0 {
            problems.push(
                "--max-connections-per-listener 0: must be at least 1 (no connection would be accepted)"
                    .to_owned(),
            );
        } else if self.max_connections_per_listener > MAX_CONNECTIONS_PER_LISTENER {
            problems.push(format!(
                "--max-connections-per-listener {}: must be at most {MAX_CONNECTIONS_PER_LISTENER}",
                self.max_connections_per_listener
            ));
        }
    }
}

/// Upper bound for every data-path timeout.
const MAX_TIMEOUT: Duration = Duration::from_secs(3600);
/// Upper bound for the per-listener cap: the kernel's own limit on open descriptors
/// (`fs.nr_open` defaults to 2^20), which no listener could reach anyway.
const MAX_CONNECTIONS_PER_LISTENER: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration:\n{}", .problems.join("\n"))]
    Invalid { problems: Vec<String> },
}

/// The pairs of `ports` that one process cannot listen on together: the same port on
/// the same address, or on any address where one of them is the unspecified one (which
/// takes the port on every address of the host). The second would wait forever for a
/// "predecessor" to free the port while its clients reached the first one's server.
fn port_clashes(ports: &[(&str, SocketAddr)]) -> Vec<String> {
    let mut clashes = Vec::new();
    for (i, (a_flag, a)) in ports.iter().enumerate() {
        for (b_flag, b) in &ports[i + 1..] {
            let overlap = a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified();
            if a.port() != 0 && a.port() == b.port() && overlap {
                clashes.push(format!(
                    "{a_flag} {a} and {b_flag} {b}: the same port; each needs its own"
                ));
            }
        }
    }
    clashes
}

impl Config {
    /// The CA in use (`--ca`, or the source's default).
    pub fn ca(&self) -> Ca {
        self.ca.unwrap_or(match self.source {
            Source::Istio => Ca::Istio,
            Source::File | Source::Kube => Ca::Builtin,
        })
    }

    /// The drain timeout in force: `--drain-timeout`, or the one derived from the grace
    /// period ([`crate::drain::timeout`]).
    pub fn resolved_drain_timeout(&self) -> Duration {
        crate::drain::timeout(self.drain_timeout, self.termination_grace_period_seconds)
    }

    /// The proxy's worker threads: `--worker-threads`, or Istio's default, for the cores
    /// this process may use.
    pub fn resolved_worker_threads(&self) -> usize {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        self.worker_threads
            .map_or(WorkerThreads::default_for(cores), |w| w.resolve(cores))
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
        problems.extend(port_clashes(&[
            ("--admin-addr", self.admin_addr),
            ("--metrics-addr", self.metrics_addr),
            ("--readiness-addr", self.readiness_addr),
        ]));
        if self.source == Source::File && self.workloads.is_none() {
            problems.push("--workloads: required with --source file".to_owned());
        }
        if self.node.trim().is_empty() {
            problems.push("--node: must not be empty".to_owned());
        }
        if self.dns_upstream_timeout.is_zero()
            || self.dns_upstream_timeout > crate::dns::MAX_UPSTREAM_TIMEOUT
        {
            problems.push(format!(
                "--dns-upstream-timeout {}: must be longer than zero and at most {}",
                humantime::format_duration(self.dns_upstream_timeout),
                humantime::format_duration(crate::dns::MAX_UPSTREAM_TIMEOUT)
            ));
        }
        if !self.bpf_pin_dir.is_absolute() {
            problems.push(format!(
                "--bpf-pin-dir {}: must be an absolute path",
                self.bpf_pin_dir.display()
            ));
        }
        if !self.handover_socket.is_absolute() {
            problems.push(format!(
                "--handover-socket {}: must be an absolute path",
                self.handover_socket.display()
            ));
        }
        // sockaddr_un's sun_path holds 108 bytes, the terminating NUL included; the
        // socket is first bound at a temporary name 16 bytes longer (crate::handover).
        if self.handover_socket.as_os_str().len() > crate::handover::MAX_PATH {
            problems.push(format!(
                "--handover-socket {}: longer than {} bytes (a unix socket path)",
                self.handover_socket.display(),
                crate::handover::MAX_PATH
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
        if let Some(t) = self.drain_timeout {
            if t > MAX_TIMEOUT {
                problems.push(format!(
                    "--drain-timeout {}: must be at most {}",
                    humantime::format_duration(t),
                    humantime::format_duration(MAX_TIMEOUT)
                ));
            }
            if let Some(grace) = self.termination_grace_period_seconds
                && grace > 0
                && t >= Duration::from_secs(grace)
            {
                problems.push(format!(
                    "--drain-timeout {}: must be shorter than --termination-grace-period-seconds {grace} (the kubelet kills ztunnel when the grace period ends, mid-drain); leave it out to derive it",
                    humantime::format_duration(t)
                ));
            }
        }
        self.limits.validate(&mut problems);
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
    fn two_servers_on_one_port_are_refused() {
        let base = ["--workloads", "/w.yaml", "--node", "n1"];
        let with = |extra: &[&str]| {
            let mut args = base.to_vec();
            args.extend_from_slice(extra);
            parse(&args).validate()
        };
        let err = with(&["--metrics-addr", "127.0.0.1:15000"])
            .expect_err("admin and metrics on one port")
            .to_string();
        assert!(
            err.contains(
                "--admin-addr 127.0.0.1:15000 and --metrics-addr 127.0.0.1:15000: the same port"
            ),
            "{err}"
        );
        // 0.0.0.0 takes the port on loopback too.
        let err = with(&["--readiness-addr", "0.0.0.0:15000"])
            .expect_err("readiness on every address of admin's port")
            .to_string();
        assert!(
            err.contains("--admin-addr 127.0.0.1:15000 and --readiness-addr 0.0.0.0:15000"),
            "{err}"
        );
        let err = with(&["--readiness-addr", "[::]:15020"])
            .expect_err("[::] takes the v4 port too")
            .to_string();
        assert!(
            err.contains("--metrics-addr 0.0.0.0:15020 and --readiness-addr [::]:15020"),
            "{err}"
        );
        // Different addresses on one port, and ports the kernel picks, are fine.
        with(&["--metrics-addr", "127.0.0.2:15000"]).expect("another address");
        with(&["--metrics-addr", "[::1]:15000"]).expect("another family's loopback");
        with(&[
            "--admin-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
            "--readiness-addr",
            "127.0.0.1:0",
        ])
        .expect("port 0 is any port");
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
    fn limit_defaults_are_istio_like() {
        let l = parse(&["--workloads", "/w.yaml", "--node", "n1"]).limits;
        let s = Duration::from_secs;
        assert_eq!(
            l,
            Limits {
                tcp_connect_timeout: s(10),
                tls_accept_timeout: s(10),
                h2_accept_timeout: s(10),
                tls_connect_timeout: s(10),
                hbone_dial_timeout: s(30),
                connect_response_timeout: s(15),
                max_connections_per_listener: 16384,
            }
        );
        // The HBONE layer's own defaults (its unit tests run with them) are the same.
        assert_eq!(crate::hbone::HANDSHAKE_TIMEOUT, l.h2_accept_timeout);
        assert_eq!(crate::hbone::DIAL_TIMEOUT, l.hbone_dial_timeout);
        assert_eq!(crate::hbone::RESPONSE_TIMEOUT, l.connect_response_timeout);
        // The config dump shows them under "limits", durations as text.
        let dump = serde_json::to_value(parse(&["--workloads", "/w.yaml", "--node", "n1"]))
            .expect("serializable");
        assert_eq!(dump["limits"]["tlsAcceptTimeout"], "10s");
        assert_eq!(dump["limits"]["maxConnectionsPerListener"], 16384);
    }

    #[test]
    fn limits_parse_from_flags_and_bad_ones_are_named() {
        let c = parse(&[
            "--workloads",
            "/w.yaml",
            "--node",
            "n1",
            "--tls-accept-timeout",
            "1500ms",
            "--max-connections-per-listener",
            "100",
        ]);
        assert_eq!(c.limits.tls_accept_timeout, Duration::from_millis(1500));
        assert_eq!(c.limits.max_connections_per_listener, 100);
        c.validate().expect("valid limits");

        let err = parse(&[
            "--workloads",
            "/w.yaml",
            "--node",
            "n1",
            "--tcp-connect-timeout",
            "0s",
            "--connect-response-timeout",
            "2h",
            "--max-connections-per-listener",
            "0",
        ])
        .validate()
        .expect_err("invalid limits")
        .to_string();
        for needle in [
            "--tcp-connect-timeout 0s: must be longer than zero",
            "--connect-response-timeout 2h: must be at most 1h",
            "--max-connections-per-listener 0: must be at least 1",
        ] {
            assert!(err.contains(needle), "missing {needle:?} in {err}");
        }
        let bad = Cli::try_parse_from(["ztunnel", "--node", "n1", "--h2-accept-timeout", "soon"]);
        assert!(bad.is_err(), "an unparseable duration is refused");
    }

    #[test]
    fn worker_threads_as_istio_counts_them() {
        let w = |s: &str| s.parse::<WorkerThreads>();
        assert_eq!(w("4").map(|w| w.resolve(64)), Ok(4));
        assert_eq!(w("0").map(|w| w.resolve(64)), Ok(64), "0: every core");
        assert_eq!(w("25%").map(|w| w.resolve(6)), Ok(2), "rounded up");
        assert_eq!(w("10%").map(|w| w.resolve(2)), Ok(1), "at least one");
        assert_eq!(w("100%").map(|w| w.resolve(8)), Ok(8));
        for bad in ["0%", "101%", "-1", "many", "x%", "4096"] {
            let err = w(bad).expect_err(bad);
            assert!(err.contains(bad.trim_end_matches('%')), "{bad}: {err}");
        }
        // Istio's default: a quarter of the cores, never below 2.
        assert_eq!(WorkerThreads::default_for(1), 2);
        assert_eq!(WorkerThreads::default_for(2), 2);
        assert_eq!(WorkerThreads::default_for(16), 4);
        assert_eq!(WorkerThreads::default_for(18), 5);
        // From the flag and the environment variable Istio's chart sets; dumped as given.
        let c = parse(&[
            "--workloads",
            "/w.yaml",
            "--node",
            "n1",
            "--worker-threads",
            "3",
        ]);
        assert_eq!(c.resolved_worker_threads(), 3);
        let dump = serde_json::to_value(&c).expect("serializable");
        assert_eq!(dump["workerThreads"], "3");
        let bad = Cli::try_parse_from(["ztunnel", "--node", "n1", "--worker-threads", "half"]);
        assert!(bad.is_err(), "an unparseable count is refused");
    }

    #[test]
    fn drain_timeout_comes_from_the_flag_or_the_grace_period() {
        let base = ["--workloads", "/w.yaml", "--node", "n1"];
        let with = |extra: &[&str]| {
            let args: Vec<&str> = base.iter().chain(extra).copied().collect();
            parse(&args)
        };
        let s = Duration::from_secs;
        assert_eq!(with(&[]).resolved_drain_timeout(), s(5), "Istio's default");
        let c = with(&["--termination-grace-period-seconds", "30"]);
        assert_eq!(c.resolved_drain_timeout(), s(25));
        c.validate().expect("derived from the grace period");
        let c = with(&[
            "--termination-grace-period-seconds",
            "30",
            "--drain-timeout",
            "20s",
        ]);
        assert_eq!(c.resolved_drain_timeout(), s(20));
        c.validate().expect("shorter than the grace period");
        // The config dump shows both as given.
        let dump = serde_json::to_value(&c).expect("serializable");
        assert_eq!(dump["drainTimeout"], "20s");
        assert_eq!(dump["terminationGracePeriodSeconds"], 30);

        let err = with(&[
            "--termination-grace-period-seconds",
            "30",
            "--drain-timeout",
            "30s",
        ])
        .validate()
        .expect_err("as long as the grace period")
        .to_string();
        assert!(
            err.contains(
                "--drain-timeout 30s: must be shorter than --termination-grace-period-seconds 30"
            ),
            "{err}"
        );
        let err = with(&["--drain-timeout", "2h"])
            .validate()
            .expect_err("unbounded")
            .to_string();
        assert!(
            err.contains("--drain-timeout 2h: must be at most 1h"),
            "{err}"
        );
        with(&["--drain-timeout", "0s"])
            .validate()
            .expect("0s closes everything at once");
        let bad = Cli::try_parse_from(["ztunnel", "--node", "n1", "--drain-timeout", "later"]);
        assert!(bad.is_err(), "an unparseable duration is refused");
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
