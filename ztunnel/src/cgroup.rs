//! cgroup v2 rules. The capture programs attached to a cgroup cover every process in it
//! and below it, so a pod's capture must attach to the pod's own cgroup and nothing
//! broader: [`check_pod_scope`] refuses, for every source, a cgroup that is the cgroup2
//! root, lies outside the cgroup2 mount, contains ztunnel's own cgroup, contains, equals
//! or lies inside another pod's cgroup, or holds processes of another network namespace.
//! [`join`] moves ztunnel into `--cgroup`, which must be a cgroup below the cgroup2
//! mount.
use std::{
    os::unix::fs::MetadataExt as _,
    path::{Component, Path, PathBuf},
};

/// `statfs` magic of a cgroup v2 filesystem (`CGROUP2_SUPER_MAGIC`, linux/magic.h).
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
/// How deep below a pod's cgroup its processes are looked for (pod → container →
/// a runtime's own sub-cgroups).
const MAX_DEPTH: usize = 4;

/// Why a pod's cgroup is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Broader {
    /// The cgroup2 root: every process on the node.
    Root,
    NotUnderMount {
        root: PathBuf,
    },
    NotACgroup,
    ContainsZtunnel {
        own: PathBuf,
    },
    ContainsPod {
        pod: String,
        cgroup: PathBuf,
    },
    SameAsPod {
        pod: String,
    },
    InsidePod {
        pod: String,
        cgroup: PathBuf,
    },
    ForeignProcess {
        pid: u32,
        comm: String,
        cgroup: PathBuf,
    },
}

impl std::fmt::Display for Broader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Broader::Root => write!(
                f,
                "it is the cgroup2 root, which holds every process on the node"
            ),
            Broader::NotUnderMount { root } => {
                write!(f, "it is not below the cgroup2 mount {}", root.display())
            }
            Broader::NotACgroup => write!(f, "it is not a cgroup v2 directory (no cgroup.procs)"),
            Broader::ContainsZtunnel { own } => write!(
                f,
                "it contains ztunnel's own cgroup {}, so it is not one pod's",
                own.display()
            ),
            Broader::ContainsPod { pod, cgroup } => write!(
                f,
                "it contains pod {pod}'s cgroup {}, so it is not one pod's",
                cgroup.display()
            ),
            Broader::SameAsPod { pod } => write!(f, "it is pod {pod}'s cgroup as well"),
            Broader::InsidePod { pod, cgroup } => write!(
                f,
                "it lies inside pod {pod}'s cgroup {}, whose capture already covers it",
                cgroup.display()
            ),
            Broader::ForeignProcess { pid, comm, cgroup } => write!(
                f,
                "process {pid} ({comm}) in {} belongs to another network namespace, so the cgroup is not only the pod's",
                cgroup.display()
            ),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "refusing to attach capture for pod {pod} to cgroup {}: {reason}; the capture programs would cover processes that are not the pod's",
        cgroup.display()
    )]
    Broader {
        pod: String,
        cgroup: PathBuf,
        reason: Broader,
    },
    #[error(
        "--cgroup {}: not below the cgroup2 mount {}; pass a directory under it, e.g. {}",
        path.display(),
        root.display(),
        root.join("ztunnel").display()
    )]
    OutsideMount { path: PathBuf, root: PathBuf },
    #[error(
        "--cgroup {}: that is the cgroup2 root; ztunnel needs a cgroup of its own below it, e.g. {}",
        path.display(),
        path.join("ztunnel").display()
    )]
    JoinRoot { path: PathBuf },
    #[error("--cgroup {}: {} is not a cgroup v2 directory (the cgroup2 mount is {})", path.display(), dir.display(), root.display())]
    NotACgroup {
        path: PathBuf,
        dir: PathBuf,
        root: PathBuf,
    },
    #[error("--cgroup {}: failed to {action}", path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// `path` without `.` components, `..` resolved lexically: cgroup paths compare as
/// written, without following anything.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

/// Whether `dir` is a cgroup: a directory with `cgroup.procs`, on a cgroup2 filesystem.
fn is_cgroup(dir: &Path) -> bool {
    dir.join("cgroup.procs").is_file()
        && nix::sys::statfs::statfs(dir).is_ok_and(|s| s.filesystem_type().0 == CGROUP2_SUPER_MAGIC)
}

/// Moves this process into `path`, created if missing. `path` must be below the cgroup2
/// mount `root` (a directory made anywhere else is no cgroup, and ztunnel would stay
/// where it was).
pub fn join(path: &Path, root: &Path) -> Result<(), Error> {
    let (path, root) = (normalize(path), normalize(root));
    if path == root {
        return Err(Error::JoinRoot { path });
    }
    if !path.starts_with(&root) {
        return Err(Error::OutsideMount { path, root });
    }
    // The deepest existing directory must already be a cgroup: mkdir below it then makes
    // cgroups, not plain directories.
    let existing = path
        .ancestors()
        .find(|a| a.exists())
        .unwrap_or(&root)
        .to_owned();
    if !is_cgroup(&existing) {
        return Err(Error::NotACgroup {
            path: path.clone(),
            dir: existing,
            root,
        });
    }
    let io = |action, source| Error::Io {
        path: path.clone(),
        action,
        source,
    };
    std::fs::create_dir_all(&path).map_err(|e| io("create the cgroup", e))?;
    if !is_cgroup(&path) {
        return Err(Error::NotACgroup {
            dir: path.clone(),
            path,
            root,
        });
    }
    std::fs::write(path.join("cgroup.procs"), std::process::id().to_string())
        .map_err(|e| io("move ztunnel into it", e))
}

/// What a pod's cgroup is checked against.
#[derive(Debug, Clone)]
pub struct Node {
    /// The cgroup2 mount.
    pub root: PathBuf,
    /// ztunnel's own cgroup.
    pub own: PathBuf,
    /// Every other pod known on the node, with its cgroup and whether it is enrolled.
    /// A pod's cgroup may lie inside no enrolled pod's cgroup, and may contain or equal
    /// no known pod's.
    pub pods: Vec<(String, PathBuf, bool)>,
}

/// Refuses a cgroup for `pod` (`namespace/name`) that is broader than the pod: see the
/// module docs. `netns` is the pod's network namespace as (device, inode); `netns_of`
/// gives a pid's (`None` when the process is gone). CRI-O's `crio-conmon-*` monitors sit
/// in the pod's cgroup on the host network and are not counted.
pub fn check_pod_scope(
    pod: &str,
    cgroup: &Path,
    netns: (u64, u64),
    node: &Node,
    netns_of: impl Fn(u32) -> Option<(u64, u64)>,
) -> Result<(), Error> {
    let refuse = |reason| Error::Broader {
        pod: pod.to_owned(),
        cgroup: cgroup.to_owned(),
        reason,
    };
    let (cg, root) = (normalize(cgroup), normalize(&node.root));
    if cg == root {
        return Err(refuse(Broader::Root));
    }
    if !cg.starts_with(&root) {
        return Err(refuse(Broader::NotUnderMount { root }));
    }
    if !cg.join("cgroup.procs").is_file() {
        return Err(refuse(Broader::NotACgroup));
    }
    let own = normalize(&node.own);
    if own.starts_with(&cg) {
        return Err(refuse(Broader::ContainsZtunnel { own }));
    }
    for (other, other_cg, enrolled) in &node.pods {
        if other == pod {
            continue;
        }
        let o = normalize(other_cg);
        let reason = if o == cg {
            Broader::SameAsPod { pod: other.clone() }
        } else if o.starts_with(&cg) {
            Broader::ContainsPod {
                pod: other.clone(),
                cgroup: o,
            }
        } else if *enrolled && cg.starts_with(&o) {
            Broader::InsidePod {
                pod: other.clone(),
                cgroup: o,
            }
        } else {
            continue;
        };
        return Err(refuse(reason));
    }
    if let Some((pid, dir)) = foreign_process(&cg, 0, netns, &netns_of) {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|c| c.trim().to_owned())
            .unwrap_or_else(|_| "?".to_owned());
        return Err(refuse(Broader::ForeignProcess {
            pid,
            comm,
            cgroup: dir,
        }));
    }
    Ok(())
}

fn foreign_process(
    dir: &Path,
    depth: usize,
    netns: (u64, u64),
    netns_of: &impl Fn(u32) -> Option<(u64, u64)>,
) -> Option<(u32, PathBuf)> {
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
        // A process that exited meanwhile has no namespace left to compare.
        if netns_of(pid).is_some_and(|ns| ns != netns) {
            return Some((pid, dir.to_owned()));
        }
    }
    if depth >= MAX_DEPTH {
        return None;
    }
    let entries = std::fs::read_dir(dir).ok()?;
    for e in entries.flatten() {
        let name = e.file_name();
        if e.file_type().is_ok_and(|t| t.is_dir())
            && !name.to_string_lossy().starts_with("crio-conmon-")
            && let Some(found) = foreign_process(&e.path(), depth + 1, netns, netns_of)
        {
            return Some(found);
        }
    }
    None
}

/// A process's network namespace as (device, inode), from `/proc/<pid>/ns/net`.
pub fn process_netns(pid: u32) -> Option<(u64, u64)> {
    std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Whether any process in `cgroup` (or below it) is in `netns`.
pub fn holds_netns(cgroup: &Path, netns: (u64, u64)) -> bool {
    fn walk(dir: &Path, depth: usize, netns: (u64, u64)) -> bool {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        if procs
            .lines()
            .filter_map(|l| l.trim().parse::<u32>().ok())
            .any(|pid| process_netns(pid) == Some(netns))
        {
            return true;
        }
        depth < MAX_DEPTH
            && std::fs::read_dir(dir).is_ok_and(|entries| {
                entries.flatten().any(|e| {
                    e.file_type().is_ok_and(|t| t.is_dir()) && walk(&e.path(), depth + 1, netns)
                })
            })
    }
    walk(cgroup, 0, netns)
}

#[cfg(test)]
mod tests {
    use super::*;

    const POD_NS: (u64, u64) = (4, 100);
    const OTHER_NS: (u64, u64) = (4, 200);

    /// A fake cgroup tree: `root/kubepods/pod-a/ctr` (pid 10), `root/kubepods/pod-b`
    /// (pid 20), `root/ztunnel`.
    fn tree() -> (tempfile::TempDir, Node) {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().to_owned();
        for (cg, pids) in [
            ("", ""),
            ("kubepods", ""),
            ("kubepods/pod-a", ""),
            ("kubepods/pod-a/ctr", "10\n"),
            ("kubepods/pod-b", "20\n"),
            ("ztunnel", "1\n"),
        ] {
            let d = root.join(cg);
            std::fs::create_dir_all(&d).expect("mkdir");
            std::fs::write(d.join("cgroup.procs"), pids).expect("procs");
        }
        let node = Node {
            own: root.join("ztunnel"),
            pods: vec![
                ("ns/a".into(), root.join("kubepods/pod-a"), true),
                ("ns/b".into(), root.join("kubepods/pod-b"), true),
            ],
            root,
        };
        (dir, node)
    }

    fn netns_of(pid: u32) -> Option<(u64, u64)> {
        match pid {
            10 => Some(POD_NS),
            20 | 30 => Some(OTHER_NS),
            _ => None,
        }
    }

    fn check(node: &Node, cgroup: &Path) -> Result<(), String> {
        check_pod_scope("ns/a", cgroup, POD_NS, node, netns_of).map_err(|e| e.to_string())
    }

    #[test]
    fn the_pods_own_cgroup_is_accepted() {
        let (_d, node) = tree();
        check(&node, &node.root.join("kubepods/pod-a")).expect("own cgroup");
        // Its container's cgroup is no broader either.
        check(&node, &node.root.join("kubepods/pod-a/ctr")).expect("container cgroup");
    }

    #[test]
    fn broader_cgroups_are_refused_with_pod_cgroup_and_reason() {
        let (_d, node) = tree();
        let root = node.root.clone();
        for (cgroup, want) in [
            (root.clone(), "is the cgroup2 root".to_owned()),
            (
                root.join("kubepods"),
                format!(
                    "contains pod ns/b's cgroup {}",
                    root.join("kubepods/pod-b").display()
                ),
            ),
            (
                root.join("kubepods/pod-b"),
                "is pod ns/b's cgroup as well".to_owned(),
            ),
            (
                root.join("kubepods/./pod-b/../.."),
                "is the cgroup2 root".to_owned(),
            ),
            (
                PathBuf::from("/tmp/elsewhere"),
                format!("not below the cgroup2 mount {}", root.display()),
            ),
            (root.join("missing"), "not a cgroup v2 directory".to_owned()),
        ] {
            let err = check(&node, &cgroup).expect_err("broader");
            assert!(
                err.contains("pod ns/a") && err.contains(&cgroup.display().to_string()),
                "{err}"
            );
            assert!(err.contains(&want), "{cgroup:?}: want {want:?} in {err}");
        }
        // ztunnel's own cgroup below the pod's.
        let mut n = node.clone();
        n.own = root.join("kubepods/pod-a/ztunnel");
        let err = check(&n, &root.join("kubepods/pod-a")).expect_err("contains ztunnel");
        assert!(err.contains("contains ztunnel's own cgroup"), "{err}");
        // Inside an enrolled pod's cgroup; a pod merely configured there (and refused
        // for it) does not take others down with it.
        let mut n = node.clone();
        n.pods[1].1 = root.join("kubepods");
        let err = check(&n, &root.join("kubepods/pod-a")).expect_err("inside b");
        assert!(err.contains("inside pod ns/b's cgroup"), "{err}");
        n.pods[1].2 = false;
        check(&n, &root.join("kubepods/pod-a")).expect("b is not enrolled");
    }

    #[test]
    fn a_process_of_another_netns_in_the_cgroup_is_refused_but_conmon_is_not() {
        let (_d, node) = tree();
        let a = node.root.join("kubepods/pod-a");
        let conmon = a.join("crio-conmon-1234.scope");
        std::fs::create_dir_all(&conmon).expect("mkdir");
        std::fs::write(conmon.join("cgroup.procs"), "30\n").expect("procs");
        check(&node, &a).expect("conmon runs on the host network");
        std::fs::write(a.join("cgroup.procs"), "30\n").expect("procs");
        let err = check(&node, &a).expect_err("stray process");
        assert!(
            err.contains("process 30") && err.contains("another network namespace"),
            "{err}"
        );
    }

    #[test]
    fn cgroup_flag_must_be_a_cgroup_below_the_mount() {
        let root = Path::new("/sys/fs/cgroup");
        let err = join(Path::new("/tmp/zt-cgroup-test"), root).expect_err("outside");
        let msg = err.to_string();
        assert!(
            msg.contains(
                "--cgroup /tmp/zt-cgroup-test: not below the cgroup2 mount /sys/fs/cgroup"
            ) && msg.contains("/sys/fs/cgroup/ztunnel"),
            "{msg}"
        );
        assert!(
            !Path::new("/tmp/zt-cgroup-test").exists(),
            "nothing created"
        );
        let err = join(Path::new("/sys/fs/cgroup/"), root)
            .expect_err("root")
            .to_string();
        assert!(err.contains("that is the cgroup2 root"), "{err}");
        let err = join(Path::new("/sys/fs/cgroup/a/../.."), root)
            .expect_err("escapes")
            .to_string();
        assert!(err.contains("not below the cgroup2 mount"), "{err}");
        // Below a "mount" that is a plain directory: nothing is created.
        let dir = tempfile::tempdir().expect("tempdir");
        let want = dir.path().join("zt");
        let err = join(&want, dir.path())
            .expect_err("not cgroupfs")
            .to_string();
        assert!(err.contains("is not a cgroup v2 directory"), "{err}");
        assert!(!want.exists());
    }
}
