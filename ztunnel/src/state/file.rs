//! Following the workload file. A version is only what was completely written: editors,
//! `cp`, `kubectl cp` and ConfigMap syncs truncate the file and then write it, so every
//! change event is followed by a quiet period ([`QUIET`] without another event) and the
//! file is read only when its size and modification time are the same before and after
//! that period and the read. An empty or unreadable file is never a version (warned
//! about, counted in `ztunnel_config_rejected_total`); neither is an invalid one. In all
//! three cases the last good version stays in force.
use std::{
    path::{Path, PathBuf},
    sync::{Arc, mpsc},
    time::{Duration, SystemTime},
};

use notify::Watcher as _;

use super::{Error, LocalConfig};
use crate::metrics::Metrics;

/// How long the file must stay unchanged before it is read.
pub const QUIET: Duration = Duration::from_millis(200);

/// Why a file version was not taken (the `reason` label of
/// `ztunnel_config_rejected_total`).
pub mod rejected {
    pub const EMPTY: &str = "empty";
    pub const UNREADABLE: &str = "unreadable";
    pub const INVALID: &str = "invalid";
}

/// Watches the file while it lives; dropping it stops the watch (and its reader thread).
pub struct FileWatch {
    _watcher: notify::RecommendedWatcher,
}

/// Size and modification time: what tells whether the file is still being written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
}

fn stamp(path: &Path) -> std::io::Result<Stamp> {
    let m = std::fs::metadata(path)?;
    Ok(Stamp {
        len: m.len(),
        modified: m.modified().ok(),
    })
}

/// The outcome of one attempt to read a settled file.
#[derive(Debug)]
enum Read {
    /// The file changed during the quiet period or the read: wait again.
    Changed,
    Done(Result<String, std::io::Error>),
}

/// Reads the file if it kept `before` through the quiet period and the read.
fn read_if_stable(path: &Path, before: &std::io::Result<Stamp>) -> Read {
    let now = match (before, stamp(path)) {
        (Ok(a), Ok(b)) if *a == b => b,
        (Err(_), Err(e)) => return Read::Done(Err(e)),
        _ => return Read::Changed,
    };
    let text = std::fs::read_to_string(path);
    match stamp(path) {
        Ok(after) if after == now => Read::Done(text),
        _ => Read::Changed,
    }
}

/// Waits until the file has been quiet for `quiet` and reads it. `None` when the watch
/// ended.
fn settled_text(
    path: &Path,
    events: &mpsc::Receiver<()>,
    quiet: Duration,
) -> Option<Result<String, std::io::Error>> {
    loop {
        let before = stamp(path);
        loop {
            match events.recv_timeout(quiet) {
                Ok(()) => continue,
                Err(mpsc::RecvTimeoutError::Timeout) => break,
                Err(mpsc::RecvTimeoutError::Disconnected) => return None,
            }
        }
        match read_if_stable(path, &before) {
            Read::Changed => {
                tracing::debug!(path = %path.display(), "workload file still changing; waiting");
            }
            Read::Done(text) => return Some(text),
        }
    }
}

/// Reads the file for start-up, once it has been quiet for [`QUIET`].
pub fn load_settled(path: &Path, node: &str) -> Result<LocalConfig, Error> {
    let (_tx, events) = mpsc::channel();
    let text = settled_text(path, &events, QUIET).unwrap_or_else(|| std::fs::read_to_string(path));
    let text = text.map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })?;
    LocalConfig::parse(path, &text, node)
}

/// What one settled read means for the config in force: a new version, or the reason it
/// was not taken.
fn judge(
    path: &Path,
    node: &str,
    text: Result<String, std::io::Error>,
) -> Result<LocalConfig, (&'static str, Error)> {
    let text = text.map_err(|source| {
        (
            rejected::UNREADABLE,
            Error::Read {
                path: path.to_owned(),
                source,
            },
        )
    })?;
    LocalConfig::parse(path, &text, node).map_err(|e| match e {
        Error::Empty { .. } => (rejected::EMPTY, e),
        e => (rejected::INVALID, e),
    })
}

/// Watches `path` and sends each settled, valid version on `tx`.
pub fn watch(
    path: PathBuf,
    node: String,
    tx: tokio::sync::watch::Sender<LocalConfig>,
    metrics: Arc<Metrics>,
) -> notify::Result<FileWatch> {
    watch_with(path, node, tx, metrics, QUIET)
}

fn watch_with(
    path: PathBuf,
    node: String,
    tx: tokio::sync::watch::Sender<LocalConfig>,
    metrics: Arc<Metrics>,
    quiet: Duration,
) -> notify::Result<FileWatch> {
    let dir = path
        .parent()
        .map(Path::to_owned)
        .unwrap_or_else(|| PathBuf::from("."));
    let file_name = path.file_name().map(ToOwned::to_owned);
    let (events_tx, events) = mpsc::channel();
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        let Ok(ev) = ev else { return };
        if matches!(ev.kind, notify::EventKind::Access(_))
            || !ev
                .paths
                .iter()
                .any(|p| p.file_name() == file_name.as_deref())
        {
            return;
        }
        let _ = events_tx.send(());
    })?;
    watcher.watch(&dir, notify::RecursiveMode::NonRecursive)?;
    // The thread ends when the watcher (and with it the event sender) is dropped.
    std::thread::Builder::new()
        .name("workload-file".to_owned())
        .spawn(move || {
            while events.recv().is_ok() {
                let Some(text) = settled_text(&path, &events, quiet) else {
                    return;
                };
                match judge(&path, &node, text) {
                    Ok(cfg) => {
                        tx.send_if_modified(|cur| {
                            if *cur == cfg {
                                false
                            } else {
                                tracing::info!(path = %path.display(), workloads = cfg.workloads.len(), "workload file reloaded");
                                *cur = cfg;
                                true
                            }
                        });
                    }
                    Err((reason, e)) => {
                        metrics.config_rejected("file", reason);
                        if reason == rejected::INVALID {
                            tracing::error!(error = %e, "workload file rejected; keeping the last good version");
                        } else {
                            tracing::warn!(error = %crate::proxy::error_chain(&e), "workload file not taken; keeping the last good version");
                        }
                    }
                }
            }
        })
        .map_err(notify::Error::io)?;
    Ok(FileWatch { _watcher: watcher })
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    const ONE: &str =
        "workloads:\n  - name: a\n    namespace: x\n    node: n\n    addresses: [10.0.0.1]\n";

    fn rejected(m: &Metrics, reason: &str) -> bool {
        m.encode().contains(&format!(
            "ztunnel_config_rejected_total{{source=\"file\",reason=\"{reason}\"}} 1"
        ))
    }

    fn wait(what: &str, cond: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !cond() {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn empty_and_blank_files_are_not_versions() {
        for text in ["", "\n", "  \n# only a comment\n"] {
            let err = LocalConfig::parse(Path::new("/w.yaml"), text, "n").expect_err("empty");
            assert!(matches!(err, Error::Empty { .. }), "{text:?}: {err}");
            let msg = err.to_string();
            assert!(
                msg.contains("/w.yaml") && msg.contains("workloads: []"),
                "{msg}"
            );
        }
        let cfg = LocalConfig::parse(Path::new("/w.yaml"), "workloads: []\n", "n")
            .expect("an explicit empty config is one");
        assert!(cfg.workloads.is_empty());
    }

    #[test]
    fn a_file_changing_during_the_quiet_period_is_not_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w.yaml");
        std::fs::write(&path, ONE).expect("write");
        let before = stamp(&path);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(b"# more\n"))
            .expect("append");
        assert!(matches!(read_if_stable(&path, &before), Read::Changed));
        let before = stamp(&path);
        match read_if_stable(&path, &before) {
            Read::Done(Ok(text)) => assert!(text.ends_with("# more\n")),
            other => panic!("stable file not read: {other:?}"),
        }
        // Deleted meanwhile: changed; gone for good: unreadable.
        std::fs::remove_file(&path).expect("remove");
        assert!(matches!(read_if_stable(&path, &before), Read::Changed));
        let before = stamp(&path);
        assert!(matches!(read_if_stable(&path, &before), Read::Done(Err(_))));
    }

    /// Truncate-then-write in place, with a pause shorter than the quiet period in the
    /// middle, yields one version: the whole file. An empty file and a missing one keep
    /// the last good version and are counted.
    #[test]
    fn in_place_rewrites_yield_only_whole_versions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w.yaml");
        std::fs::write(&path, ONE).expect("write");
        let initial = LocalConfig::parse(&path, ONE, "node1").expect("valid");
        let (tx, mut rx) = tokio::sync::watch::channel(initial.clone());
        let metrics = Metrics::new();
        let quiet = Duration::from_millis(300);
        let _w =
            watch_with(path.clone(), "node1".into(), tx, metrics.clone(), quiet).expect("watch");
        let two =
            format!("{ONE}  - name: b\n    namespace: x\n    node: n\n    addresses: [10.0.0.2]\n");
        {
            let mut f = std::fs::File::create(&path).expect("truncate");
            let (head, tail) = two.split_at(two.len() / 2);
            f.write_all(head.as_bytes()).expect("head");
            f.flush().expect("flush");
            std::thread::sleep(quiet / 3);
            f.write_all(tail.as_bytes()).expect("tail");
        }
        wait("the two-workload version", || {
            rx.borrow().workloads.len() == 2
        });
        assert!(rx.has_changed().expect("open"));
        rx.mark_unchanged();

        std::fs::File::create(&path).expect("truncate to nothing");
        wait("the empty file to be counted", || {
            rejected(&metrics, rejected::EMPTY)
        });
        std::fs::remove_file(&path).expect("remove");
        wait("the missing file to be counted", || {
            rejected(&metrics, rejected::UNREADABLE)
        });
        std::fs::write(&path, "workloads: [\n").expect("write");
        wait("the invalid file to be counted", || {
            rejected(&metrics, rejected::INVALID)
        });
        assert!(
            !rx.has_changed().expect("open"),
            "a rejected file changed the config"
        );
        assert_eq!(rx.borrow().workloads.len(), 2);

        std::fs::write(&path, "workloads: []\n").expect("write");
        wait("the explicit empty version", || {
            rx.borrow().workloads.is_empty()
        });
    }
}
