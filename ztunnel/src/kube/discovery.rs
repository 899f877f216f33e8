//! Finds a local pod's cgroup and network namespace from its UID, on the node itself.
//!
//! The kubelet names every pod's cgroup after the pod UID: `pod<uid>` under the cgroupfs
//! driver (`kubepods/burstable/pod1b2c…-…`), and `kubepods-<qos>-pod<uid with _>.slice`
//! under the systemd driver. A walk of the cgroup tree finds that directory; any process in
//! it (or in a container cgroup below it) shares the pod's network namespace, so
//! `<host proc>/<pid>/ns/net` names it. Processes in the host's network namespace are skipped:
//! CRI-O's `conmon` monitors sit in the pod's slice (`crio-conmon-<id>.scope`) but run on
//! the host network. The lowest remaining pid is taken (the sandbox's pause process, which
//! lives as long as the pod, is normally the oldest).
use std::{
    collections::{BTreeMap, BTreeSet},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use super::convert::Placement;

/// How deep below the cgroup root pod directories may sit (kind and k3s nest kubepods
/// under `kubelet.slice/kubelet-kubepods.slice`, which is depth 4 with QoS slices).
const MAX_DEPTH: usize = 6;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no cgroup for pod uid {uid} under {root} yet")]
    NoCgroup { uid: String, root: PathBuf },
    #[error("no process outside the host network namespace in pod cgroup {cgroup} yet")]
    NoProcess { cgroup: PathBuf },
}

/// Looks pods up under one cgroup v2 tree and one procfs.
#[derive(Debug, Clone)]
pub struct Discovery {
    cgroup_root: PathBuf,
    proc_root: PathBuf,
    /// (device, inode) of the host's network namespace: `<proc>/1/ns/net`.
    host_netns: Option<(u64, u64)>,
}

impl Discovery {
    /// The host's network namespace is taken from `<proc_root>/1/ns/net` (reading it needs
    /// CAP_SYS_PTRACE, as every pod's does).
    pub fn new(cgroup_root: PathBuf, proc_root: PathBuf) -> Self {
        let host = proc_root.join("1/ns/net");
        let host_netns = ns_id(&host);
        if host_netns.is_none() {
            tracing::warn!(path = %host.display(), "cannot read the host's network namespace; processes on the host network in a pod's cgroup are not told apart");
        }
        Self {
            cgroup_root,
            proc_root,
            host_netns,
        }
    }

    /// Uses `netns` (a namespace file) as the host network namespace instead.
    pub fn with_host_netns(mut self, netns: &Path) -> Self {
        self.host_netns = ns_id(netns);
        self
    }

    /// Finds the pods with these UIDs; pods not found (yet) are reported as errors.
    pub fn locate(&self, uids: &BTreeSet<String>) -> BTreeMap<String, Result<Placement, Error>> {
        let cgroups = find_pod_cgroups(&self.cgroup_root, uids);
        uids.iter()
            .map(|uid| {
                let found = match cgroups.get(uid) {
                    None => Err(Error::NoCgroup {
                        uid: uid.clone(),
                        root: self.cgroup_root.clone(),
                    }),
                    Some(cg) => self.netns_in(cg).map(|netns| Placement {
                        netns,
                        cgroup: cg.clone(),
                    }),
                };
                (uid.clone(), found)
            })
            .collect()
    }

    /// Whether an earlier placement still holds: its cgroup exists and its process is still
    /// in it and in the same network namespace as when found.
    pub fn still_valid(&self, p: &Placement) -> bool {
        let Some(pid) = p
            .netns
            .strip_prefix(&self.proc_root)
            .ok()
            .and_then(|rest| rest.iter().next())
            .and_then(|pid| pid.to_str()?.parse::<u32>().ok())
        else {
            return false;
        };
        p.cgroup.is_dir() && ns_id(&p.netns).is_some_and(|id| Some(id) != self.host_netns) && {
            let mut pids = BTreeSet::new();
            collect_pids(&p.cgroup, 0, &mut pids);
            pids.contains(&pid)
        }
    }

    /// `<proc>/<lowest pid>/ns/net` over the pod cgroup and its container cgroups.
    fn netns_in(&self, pod_cgroup: &Path) -> Result<PathBuf, Error> {
        let mut pids = BTreeSet::new();
        collect_pids(pod_cgroup, 0, &mut pids);
        pids.into_iter()
            .map(|pid| self.proc_root.join(pid.to_string()).join("ns/net"))
            .find(|ns| ns_id(ns).is_some_and(|id| Some(id) != self.host_netns))
            .ok_or_else(|| Error::NoProcess {
                cgroup: pod_cgroup.to_owned(),
            })
    }
}

/// The kubelet's pod cgroups (named after the pod UID, in either driver's layout) under
/// `root`, for the UIDs asked for; a pod's own directory is not searched further.
pub fn find_pod_cgroups(root: &Path, uids: &BTreeSet<String>) -> BTreeMap<String, PathBuf> {
    let mut found = BTreeMap::new();
    if !uids.is_empty() {
        walk(root, 0, uids, &mut found);
    }
    found
}

fn walk(dir: &Path, depth: usize, uids: &BTreeSet<String>, found: &mut BTreeMap<String, PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(uid) = pod_uid(name) {
            if uids.contains(&uid) {
                found.insert(uid, e.path());
            }
            // A pod's own directory holds only its containers.
            continue;
        }
        if depth + 1 < MAX_DEPTH {
            walk(&e.path(), depth + 1, uids, found);
        }
    }
}

/// The cgroup under `root` whose `cgroup.procs` lists `pid` (pids as this process's pid
/// namespace sees them), searched breadth-first.
pub fn cgroup_of(root: &Path, pid: u32) -> Option<PathBuf> {
    let mut level = vec![root.to_owned()];
    for _ in 0..=MAX_DEPTH + 2 {
        let mut next = Vec::new();
        for dir in level {
            if pids_in(&dir).contains(&pid) {
                return Some(dir);
            }
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            next.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
        level = next;
    }
    None
}

fn collect_pids(dir: &Path, depth: usize, pids: &mut BTreeSet<u32>) {
    pids.extend(pids_in(dir));
    if depth >= 2 {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        // CRI-O's monitor runs in the host network namespace; skip it outright.
        if e.file_type().is_ok_and(|t| t.is_dir())
            && !name.to_string_lossy().starts_with("crio-conmon-")
        {
            collect_pids(&e.path(), depth + 1, pids);
        }
    }
}

fn pids_in(cgroup: &Path) -> BTreeSet<u32> {
    std::fs::read_to_string(cgroup.join("cgroup.procs"))
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

fn ns_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// The pod UID in a kubelet cgroup directory name: `pod<uid>` (cgroupfs driver) or
/// `…-pod<uid with '_' for '-'>.slice` (systemd driver). Returned with dashes.
pub fn pod_uid(name: &str) -> Option<String> {
    let mut rest = name;
    while let Some(i) = rest.find("pod") {
        let candidate = rest.get(i + 3..i + 3 + 36);
        if let Some(c) = candidate
            && is_uid(c)
        {
            let tail = &rest[i + 3 + 36..];
            // The UID must end the name or be followed by the systemd unit suffix.
            if tail.is_empty() || tail == ".slice" {
                return Some(c.replace('_', "-"));
            }
        }
        rest = &rest[i + 3..];
    }
    None
}

fn is_uid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-' || *c == b'_',
            _ => c.is_ascii_hexdigit(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_uid_from_each_driver_layout() {
        let uid = "1b2c3d4e-0000-4111-8222-333344445555";
        for (name, want) in [
            (format!("pod{uid}"), Some(uid)),
            (
                format!("kubepods-burstable-pod{}.slice", uid.replace('-', "_")),
                Some(uid),
            ),
            (
                format!("kubepods-pod{}.slice", uid.replace('-', "_")),
                Some(uid),
            ),
            ("kubepods-burstable.slice".to_owned(), None),
            (format!("pod{uid}x"), None),
            ("cri-containerd-0123abcd.scope".to_owned(), None),
            ("podzzzzzzzz-0000-4111-8222-333344445555".to_owned(), None),
        ] {
            assert_eq!(pod_uid(&name).as_deref(), want, "{name}");
        }
    }
}
