//! `ztunnel waypoint` run as a waypoint pod's process (tests and the demo).
use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::bail;
use ztunnel::netns::Netns;

use crate::{Pod, PodProcess, Topology, ztunnel_bin};

/// A running waypoint; killed when dropped.
pub struct Waypoint {
    proc: PodProcess,
    pub log: PathBuf,
    pub pod: Pod,
}

impl Waypoint {
    /// Starts `ztunnel waypoint` in `pod`'s netns as the Gateway `gateway` of namespace
    /// `default` (identity: the pod's service account), following the topology's workload
    /// file and the nodes' built-in CA (start a ztunnel first: it creates the CA); waits
    /// until it serves its metrics.
    pub fn start(t: &mut Topology, pod: &Pod, gateway: &str) -> anyhow::Result<Waypoint> {
        let source = Self::file_source(t);
        Self::start_with(t, pod, gateway, source)
    }

    /// The arguments that point a waypoint at the topology's workload file and CA.
    pub fn file_source(t: &Topology) -> Command {
        let mut cmd = Command::new(ztunnel_bin());
        cmd.arg("--workloads")
            .arg(t.workloads_path())
            .arg("--ca-dir")
            .arg(t.dir.path().join("ca"));
        cmd
    }

    /// [`Waypoint::start`] with `--source kube`: the API server `kubeconfig` points at, the
    /// nodes' CA root in the Secret `ca_secret` (`namespace/name`).
    pub fn start_kube(
        t: &mut Topology,
        pod: &Pod,
        gateway: &str,
        kubeconfig: &std::path::Path,
        ca_secret: &str,
    ) -> anyhow::Result<Waypoint> {
        let mut cmd = Command::new(ztunnel_bin());
        cmd.args(["--source", "kube", "--ca-secret", ca_secret])
            .env("KUBECONFIG", kubeconfig)
            .env_remove("KUBERNETES_SERVICE_HOST");
        Self::start_with(t, pod, gateway, cmd)
    }

    /// `ztunnel waypoint` with `source`'s arguments and environment added.
    pub fn start_with(
        t: &mut Topology,
        pod: &Pod,
        gateway: &str,
        source: Command,
    ) -> anyhow::Result<Waypoint> {
        let (log, logf) = t.log_file(&format!("waypoint-{}.log", pod.name))?;
        let mut cmd = Command::new(ztunnel_bin());
        cmd.args(["waypoint", "--gateway", gateway, "--namespace", "default"])
            .args(["--service-account", &pod.service_account]);
        // The pod's own name unless `source` names another (a misconfigured waypoint).
        if !source.get_args().any(|a| a == "--pod") {
            cmd.args(["--pod", &pod.name]);
        }
        cmd.args(source.get_args())
            .stdout(Stdio::null())
            .stderr(logf);
        for (k, v) in source.get_envs() {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        let proc = t.spawn_command(pod, cmd, format!("ztunnel waypoint in {}", pod.name))?;
        let mut w = Waypoint {
            proc,
            log,
            pod: pod.clone(),
        };
        let end = Instant::now() + Duration::from_secs(30);
        while w.metrics().is_err() {
            if w.proc.exited() || Instant::now() > end {
                bail!("the waypoint did not start: {}", w.log_text());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(w)
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Sends SIGTERM, as the kubelet does to a terminating pod.
    pub fn terminate(&self) {
        if let Ok(pid) = i32::try_from(self.pid()) {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }

    /// Waits (at most `secs`) for the process to exit; whether it did.
    pub fn wait_exit(&mut self, secs: u64) -> bool {
        let end = Instant::now() + Duration::from_secs(secs);
        while !self.proc.exited() {
            if Instant::now() > end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        true
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log once `cond` holds for it, or as it is after 30 s ([`crate::log_when`]).
    pub fn log_when(&self, cond: impl Fn(&str) -> bool) -> String {
        crate::log_when(|| self.log_text(), cond)
    }

    /// `/metrics` of the waypoint (:15020), read from inside its pod.
    pub fn metrics(&self) -> anyhow::Result<String> {
        let ns = Netns::open(&self.pod.netns_path)?;
        let addr = self.pod.addr(15020);
        ns.run(&Netns::current()?, || crate::http(addr, "GET", "/metrics"))?
    }
}
