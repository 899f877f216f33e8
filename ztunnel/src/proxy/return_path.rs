//! Source-address preservation inside a pod, without iptables. ztunnel connects to the
//! app from the client's own address (`IP_TRANSPARENT`) with mark [`MARK`]. With
//! `net.ipv4.tcp_fwmark_accept=1` the app's accepted socket inherits the SYN's mark, and
//! a policy rule sends everything carrying it to a table whose only route is `local
//! default dev lo`: the app's replies to the (non-local) client address come back to
//! ztunnel's socket instead of leaving through `eth0`. `fwmark_reflect=1` does the same
//! for the kernel's own replies (a RST from a closed port), so a refused connect is seen
//! at once instead of timing out. The numbers follow Istio's in-pod mode (mark
//! 0x111/0xfff).
//!
//! The return path belongs to the pod, not to a ztunnel process: installing it is
//! idempotent and never leaves a moment without it (a predecessor's connections, and its
//! successor's, rely on the same rule), and only a pod that leaves the mesh takes it out.
//! Every proxied inbound connection needs it for as long as it is open, also after its
//! pod was unenrolled: each holds a [`Lease`], as do the pod's listeners. When the pod
//! leaves the mesh ([`Lease::leave_mesh`]), the last lease to go takes the return path
//! out; otherwise (a failed enrolment, ztunnel exiting or handing over) the last lease
//! leaves it installed. A pod enrolled again while a lease of its netns is held shares
//! it; one enrolled while the removal runs waits for it.
//!
//! On exit ([`Registry::keep_installed`]) every return path stays, even for a pod that
//! left the mesh with connections still open: ztunnel is going, and the next one relies on
//! what the pod has.
use std::{
    collections::HashMap,
    sync::{
        Arc, Condvar, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use crate::netns::{self, Netns};

/// Mark of ztunnel's connections to the app that carry the client's address.
pub const MARK: u32 = 0x111;
const MASK: u32 = 0xfff;
const TABLE: &str = "133";
const PREF: &str = "32764";

/// How long enrolling a pod waits for its netns's previous return path to be removed.
const REMOVAL_WAIT: Duration = Duration::from_secs(30);

/// The return paths in use, by netns (device, inode).
#[derive(Default)]
pub struct Registry {
    paths: Mutex<HashMap<(u64, u64), Entry>>,
    removed: Condvar,
    /// Set on exit: the last lease to go no longer takes the return path out.
    kept: AtomicBool,
}

enum Entry {
    Active {
        netns: Arc<Netns>,
        path: ReturnPath,
        leases: usize,
        /// The pod left the mesh: the last lease takes the return path out.
        leaving: bool,
    },
    /// The last lease went; the removal runs on the blocking pool.
    Removing,
}

/// Keeps a netns's return path installed while it lives.
pub struct Lease {
    registry: Arc<Registry>,
    id: (u64, u64),
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("netns", &self.id).finish()
    }
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, HashMap<(u64, u64), Entry>> {
        self.paths.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A lease on `netns`'s return path, installing it unless it is installed already.
    pub fn lease(self: &Arc<Self>, netns: &Netns, v6: bool) -> Result<Lease, netns::Error> {
        let id = netns.id()?;
        let deadline = Instant::now() + REMOVAL_WAIT;
        let mut paths = self.lock();
        while matches!(paths.get(&id), Some(Entry::Removing)) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(netns::Error::Command {
                    path: netns.path().to_owned(),
                    command: "ip rule del (return path)".to_owned(),
                    detail: format!(
                        "the previous return path is still being removed after {REMOVAL_WAIT:?}"
                    ),
                });
            }
            paths = self
                .removed
                .wait_timeout(paths, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        match paths.get_mut(&id) {
            Some(Entry::Active {
                netns: held,
                path,
                leases,
                leaving,
            }) => {
                if v6 && !path.v6 {
                    install_family(held, true)?;
                    path.v6 = true;
                }
                *leases += 1;
                // Enrolled again: the pod is back in the mesh.
                *leaving = false;
            }
            _ => {
                let path = install(netns, v6)?;
                paths.insert(
                    id,
                    Entry::Active {
                        netns: Arc::new(netns.try_clone()?),
                        path,
                        leases: 1,
                        leaving: false,
                    },
                );
            }
        }
        Ok(Lease {
            registry: self.clone(),
            id,
        })
    }

    /// From now on no return path is removed, whatever leases go: ztunnel is exiting and
    /// the pods' return paths stay for the next ztunnel (a successor may already use
    /// them). Removals already running finish.
    pub fn keep_installed(&self) {
        // Under the lock a dropping lease takes its decision under: each removal is
        // decided either before this (and runs) or after (and never starts).
        let _paths = self.lock();
        self.kept.store(true, Ordering::SeqCst);
    }

    /// How many netns have a return path installed (or being removed).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Lease {
    /// The pod leaves the mesh: once every other lease on its netns (inbound connections
    /// proxied before) is gone too, the return path is taken out.
    pub fn leave_mesh(self) {
        if let Some(Entry::Active { leaving, .. }) = self.registry.lock().get_mut(&self.id) {
            *leaving = true;
        }
    }
}

impl Clone for Lease {
    fn clone(&self) -> Self {
        if let Some(Entry::Active { leases, .. }) = self.registry.lock().get_mut(&self.id) {
            *leases += 1;
        }
        Self {
            registry: self.registry.clone(),
            id: self.id,
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut paths = self.registry.lock();
        let (last, leaving) = match paths.get_mut(&self.id) {
            Some(Entry::Active {
                leases, leaving, ..
            }) => {
                *leases -= 1;
                (*leases == 0, *leaving)
            }
            _ => (false, false),
        };
        // Read under the lock (see `keep_installed`).
        if !last || self.registry.kept.load(Ordering::SeqCst) {
            return;
        }
        if !leaving {
            // A failed enrolment, or ztunnel exiting or handing over: the pod is still
            // in the mesh and its return path stays for whoever serves it next.
            paths.remove(&self.id);
            tracing::debug!(netns = ?self.id, "return path left installed for the pod");
            return;
        }
        let Some(Entry::Active { netns, path, .. }) = paths.insert(self.id, Entry::Removing) else {
            return;
        };
        drop(paths);
        let (registry, id) = (self.registry.clone(), self.id);
        let done = move || {
            remove(&netns, path);
            registry.lock().remove(&id);
            registry.removed.notify_all();
        };
        // `ip` and the sysctl writes block: not on a runtime worker, where the last
        // connection usually ends.
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(done)),
            Err(_) => done(),
        }
    }
}

/// What [`install`] changed, so [`remove`] can put it back.
#[derive(Debug)]
pub struct ReturnPath {
    /// (sysctl, value before install)
    old_sysctls: Vec<(&'static str, String)>,
    v6: bool,
}

const SYSCTLS: [&str; 3] = [
    "net/ipv4/tcp_fwmark_accept",
    "net/ipv4/fwmark_reflect",
    "net/ipv6/fwmark_reflect",
];

fn rule_args(v6: bool, op: &str) -> Vec<String> {
    let fam = if v6 { "-6" } else { "-4" };
    [
        fam,
        "rule",
        op,
        "fwmark",
        &format!("{MARK:#x}/{MASK:#x}"),
        "pref",
        PREF,
        "lookup",
        TABLE,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

fn ip(netns: &Netns, args: &[String]) -> Result<String, netns::Error> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    netns.exec("ip", &args)
}

/// Installs the sysctl, rule and route in the pod's netns (idempotent).
fn install(netns: &Netns, v6: bool) -> Result<ReturnPath, netns::Error> {
    let mut old_sysctls = Vec::new();
    for key in SYSCTLS {
        // IPv6 may be disabled in the pod; its sysctl is then absent and not needed.
        match netns.sysctl(key, "1") {
            Ok(old) => old_sysctls.push((key, old)),
            Err(e) if key.starts_with("net/ipv6") => tracing::debug!(error = %e, "no IPv6 sysctl"),
            Err(e) => return Err(e),
        }
    }
    install_family(netns, false)?;
    if v6 {
        install_family(netns, true)?;
    }
    Ok(ReturnPath { old_sysctls, v6 })
}

fn install_family(netns: &Netns, v6: bool) -> Result<(), netns::Error> {
    // The rule may be there already (a previous or a still running ztunnel's): the
    // kernel refuses a duplicate (EEXIST), and it stays in place meanwhile. Deleting it
    // first would leave a moment in which replies to proxied connections go out of eth0.
    match ip(netns, &rule_args(v6, "add")) {
        Ok(_) => {}
        Err(netns::Error::Command { detail, .. }) if detail.contains("File exists") => {}
        Err(e) => return Err(e),
    }
    let default = if v6 { "::/0" } else { "0.0.0.0/0" };
    let fam = if v6 { "-6" } else { "-4" };
    ip(
        netns,
        &[
            fam, "route", "replace", "local", default, "dev", "lo", "table", TABLE,
        ]
        .map(str::to_owned),
    )?;
    Ok(())
}

/// Takes the rule, route and sysctl out again (errors are logged: the netns may be gone).
fn remove(netns: &Netns, rp: ReturnPath) {
    let mut families = vec![false];
    if rp.v6 {
        families.push(true);
    }
    for v6 in families {
        let fam = if v6 { "-6" } else { "-4" };
        for args in [
            rule_args(v6, "del"),
            [fam, "route", "flush", "table", TABLE]
                .map(str::to_owned)
                .to_vec(),
        ] {
            if let Err(e) = ip(netns, &args) {
                tracing::debug!(error = %e, "return path cleanup");
            }
        }
    }
    for (key, old) in &rp.old_sysctls {
        if let Err(e) = netns.sysctl(key, old) {
            tracing::debug!(error = %e, "return path cleanup");
        }
    }
}
