//! The certificate manager: one cached certificate per identity, fetched once however many
//! callers ask at the same time, and renewed in the background at half-life.
//!
//! Each identity has a worker task that owns the fetching and publishes the result on a
//! `watch` channel; callers only read that channel. Renewal replaces the published
//! certificate; nothing that already holds the old `Arc` (a TLS config, hence every connection
//! made with it) is touched, so renewal only affects connections made afterwards.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use rand::Rng;
use tokio::sync::watch;
use tokio::task::AbortHandle;

use super::{CertificateSource, Error, Identity, WorkloadCertificate};

/// First retry delay after a failed fetch; doubles up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(60);
/// Floor between two successful fetches, so a CA that hands out certificates already past
/// their half-life (or a skewed clock) cannot turn renewal into a busy loop.
const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(1);

/// What the manager has for one identity, as published to subscribers.
#[derive(Clone, Debug)]
pub enum CertificateState {
    /// The first fetch has not finished yet.
    Pending,
    /// The current certificate. Renewal publishes a new one; failed renewals keep this one
    /// until it expires.
    Available(Arc<WorkloadCertificate>),
    /// The last fetch failed and there is no unexpired certificate; the worker keeps retrying.
    Unavailable(Arc<Error>),
}

/// One line of the admin certificate dump.
#[derive(Clone, Debug)]
pub struct CertificateSnapshot {
    pub identity: Identity,
    /// `pending`, `available` or `unavailable`.
    pub state: &'static str,
    pub not_before: Option<SystemTime>,
    pub not_after: Option<SystemTime>,
    /// Leaf and intermediates as PEM; empty without a certificate.
    pub chain_pem: String,
    /// Leaf and intermediates (DER); empty without a certificate.
    pub chain: Vec<rustls_pki_types::CertificateDer<'static>>,
    /// The trust anchors that came with the certificate (DER).
    pub roots: Vec<rustls_pki_types::CertificateDer<'static>>,
    /// Why the last fetch failed, while no certificate is usable.
    pub error: Option<String>,
}

/// Caches and renews workload certificates from one [`CertificateSource`]. Cheap to clone;
/// the renewal workers stop when the last clone is dropped.
#[derive(Clone)]
pub struct CertificateManager {
    inner: Arc<Inner>,
}

struct Inner {
    source: Arc<dyn CertificateSource>,
    entries: Mutex<HashMap<Identity, Entry>>,
}

struct Entry {
    state: watch::Receiver<CertificateState>,
    worker: AbortHandle,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let entries = self
            .entries
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        for entry in entries.values() {
            entry.worker.abort();
        }
    }
}

impl CertificateManager {
    pub fn new(source: Arc<dyn CertificateSource>) -> Self {
        Self {
            inner: Arc::new(Inner {
                source,
                entries: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The current certificate for `id`, fetching it first if this is the first ask.
    /// Concurrent first asks share one fetch (and one error, if it fails).
    pub async fn get(&self, id: &Identity) -> Result<Arc<WorkloadCertificate>, Error> {
        let mut state = self.watch(id);
        loop {
            let current = state.borrow_and_update().clone();
            match current {
                CertificateState::Pending => {
                    if state.changed().await.is_err() {
                        return Err(Error::Forgotten {
                            identity: id.clone(),
                        });
                    }
                }
                CertificateState::Available(cert) => {
                    let now = SystemTime::now();
                    return match now.duration_since(cert.not_after) {
                        Ok(expired_for) => Err(Error::Expired {
                            identity: id.clone(),
                            expired_for,
                        }),
                        Err(_) => Ok(cert),
                    };
                }
                CertificateState::Unavailable(source) => {
                    return Err(Error::Unavailable {
                        identity: id.clone(),
                        source,
                    });
                }
            }
        }
    }

    /// Watches `id`'s certificate (starting its fetch if needed): every renewal publishes a
    /// new [`CertificateState::Available`], which is the cue to rebuild TLS configs. The
    /// current value counts as unseen, so a first `changed()` may return at once; the channel
    /// closes when the identity is forgotten.
    pub async fn subscribe(&self, id: &Identity) -> watch::Receiver<CertificateState> {
        self.watch(id)
    }

    /// Stops renewing `id` and drops the cached certificate. Holders of the certificate keep
    /// it; the next [`CertificateManager::get`] fetches afresh. Returns whether it was known.
    pub fn forget(&self, id: &Identity) -> bool {
        let removed = self.entries().remove(id);
        if let Some(entry) = &removed {
            entry.worker.abort();
        }
        removed.is_some()
    }

    /// Every known identity with its certificate, sorted by identity.
    pub fn snapshot(&self) -> Vec<CertificateSnapshot> {
        let mut out: Vec<CertificateSnapshot> = self
            .entries()
            .iter()
            .map(|(id, entry)| snapshot(id, &entry.state.borrow()))
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<Identity, Entry>> {
        // Every critical section is a single map operation, so a panic elsewhere cannot
        // leave the map half-updated: keep going with it.
        self.inner
            .entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn watch(&self, id: &Identity) -> watch::Receiver<CertificateState> {
        let mut entries = self.entries();
        if let Some(entry) = entries.get(id)
            && !entry.worker.is_finished()
        {
            return entry.state.clone();
        }
        // New identity, or its worker died (a panicking source): start a fresh worker.
        let (tx, rx) = watch::channel(CertificateState::Pending);
        let worker = tokio::spawn(renew(self.inner.source.clone(), id.clone(), tx));
        entries.insert(
            id.clone(),
            Entry {
                state: rx.clone(),
                worker: worker.abort_handle(),
            },
        );
        rx
    }
}

fn snapshot(id: &Identity, state: &CertificateState) -> CertificateSnapshot {
    let mut out = CertificateSnapshot {
        identity: id.clone(),
        state: "pending",
        not_before: None,
        not_after: None,
        chain_pem: String::new(),
        chain: Vec::new(),
        roots: Vec::new(),
        error: None,
    };
    match state {
        CertificateState::Pending => {}
        CertificateState::Available(cert) => {
            out.state = "available";
            out.not_before = Some(cert.not_before);
            out.not_after = Some(cert.not_after);
            out.chain_pem = cert.chain_pem();
            out.chain.clone_from(&cert.chain);
            out.roots.clone_from(&cert.roots);
        }
        CertificateState::Unavailable(error) => {
            out.state = "unavailable";
            out.error = Some(error_chain(error.as_ref()));
        }
    }
    out
}

/// The worker for one identity: fetch, publish, sleep until half-life, repeat.
async fn renew(
    source: Arc<dyn CertificateSource>,
    id: Identity,
    state: watch::Sender<CertificateState>,
) {
    let mut backoff = RETRY_MIN;
    loop {
        match source.fetch(&id).await {
            Ok(cert) => {
                let refresh_at = cert.refresh_at();
                tracing::info!(
                    identity = %id,
                    expires_in_s = cert.expiry_seconds(SystemTime::now()),
                    "workload certificate issued"
                );
                state.send_replace(CertificateState::Available(Arc::new(cert)));
                backoff = RETRY_MIN;
                let wait = refresh_at
                    .duration_since(SystemTime::now())
                    .unwrap_or_default()
                    .max(MIN_REFRESH_INTERVAL);
                tokio::time::sleep(wait).await;
            }
            Err(error) => {
                let now = SystemTime::now();
                // Keep serving the current certificate while it is valid; retry no later than
                // its expiry so an outage that outlives it is reported promptly.
                let valid_for = match &*state.borrow() {
                    CertificateState::Available(cert) => cert.not_after.duration_since(now).ok(),
                    _ => None,
                };
                let wait = jittered(backoff).min(valid_for.unwrap_or(Duration::MAX));
                tracing::warn!(
                    identity = %id,
                    error = %error_chain(&error),
                    retry_in_ms = wait.as_millis(),
                    keeping_current = valid_for.is_some(),
                    "failed to fetch workload certificate"
                );
                if valid_for.is_none() {
                    state.send_replace(CertificateState::Unavailable(Arc::new(error)));
                }
                tokio::time::sleep(wait).await;
                backoff = (backoff * 2).min(RETRY_MAX);
            }
        }
    }
}

/// ±10 % so many identities failing together do not retry against the CA in lockstep.
fn jittered(d: Duration) -> Duration {
    d.mul_f64(rand::rng().random_range(0.9..1.1))
}

/// `outer: cause: root cause`, since log lines only show the top error's own message.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        out.push_str(": ");
        out.push_str(&e.to_string());
        cause = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::task::JoinSet;
    use tokio::time::timeout;

    use super::super::{BuiltinCa, CertificateFuture};
    use super::*;

    /// Counts fetches, optionally slows them down and fails the first `fail_first`.
    struct TestSource {
        ca: BuiltinCa,
        delay: Duration,
        fail_first: usize,
        fetches: AtomicUsize,
    }

    impl TestSource {
        fn new(
            lifetime: Duration,
            delay: Duration,
            fail_first: usize,
        ) -> (tempfile::TempDir, Arc<Self>) {
            let dir = tempfile::tempdir().expect("tempdir");
            let ca = BuiltinCa::load_or_create(dir.path(), "td", lifetime).expect("ca");
            let source = Arc::new(Self {
                ca,
                delay,
                fail_first,
                fetches: AtomicUsize::new(0),
            });
            (dir, source)
        }

        fn fetches(&self) -> usize {
            self.fetches.load(Ordering::SeqCst)
        }
    }

    impl CertificateSource for TestSource {
        fn fetch<'a>(&'a self, id: &'a Identity) -> CertificateFuture<'a> {
            Box::pin(async move {
                let n = self.fetches.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(self.delay).await;
                if n < self.fail_first {
                    return Err(Error::InvalidLifetime {
                        lifetime: Duration::ZERO,
                    });
                }
                self.ca.issue(id)
            })
        }
    }

    fn id(sa: &str) -> Identity {
        Identity::new("td", "default", sa)
    }

    #[tokio::test]
    async fn concurrent_gets_share_one_fetch() {
        let (_dir, source) =
            TestSource::new(Duration::from_secs(3600), Duration::from_millis(200), 0);
        let manager = CertificateManager::new(source.clone());
        let mut gets = JoinSet::new();
        for _ in 0..8 {
            let manager = manager.clone();
            gets.spawn(async move { manager.get(&id("app")).await });
        }
        let certs: Vec<_> = gets
            .join_all()
            .await
            .into_iter()
            .map(|r| r.expect("get"))
            .collect();
        assert_eq!(source.fetches(), 1);
        assert!(certs.iter().all(|c| Arc::ptr_eq(c, &certs[0])));

        // Cached afterwards; another identity gets its own fetch.
        let again = manager.get(&id("app")).await.expect("cached get");
        assert!(Arc::ptr_eq(&again, &certs[0]));
        let other = manager.get(&id("other")).await.expect("other get");
        assert_eq!(other.identity, id("other"));
        assert_eq!(source.fetches(), 2);
    }

    #[tokio::test]
    async fn certificate_is_renewed_at_half_life_and_old_one_stays_intact() {
        let (_dir, source) = TestSource::new(Duration::from_secs(2), Duration::ZERO, 0);
        let manager = CertificateManager::new(source.clone());
        let old = manager.get(&id("app")).await.expect("get");
        let old_chain = old.chain.clone();
        let mut updates = manager.subscribe(&id("app")).await;
        updates.borrow_and_update();

        let started = tokio::time::Instant::now();
        timeout(Duration::from_secs(3), updates.changed())
            .await
            .expect("renewed within 3 s")
            .expect("still subscribed");
        // Half-life is ~1 s; anything short of the 2 s lifetime means renewal came first.
        assert!(
            started.elapsed() < Duration::from_millis(1900),
            "{:?}",
            started.elapsed()
        );
        let CertificateState::Available(new) = updates.borrow().clone() else {
            panic!("renewal did not publish a certificate");
        };
        assert_ne!(new.chain, old_chain);
        assert!(new.not_after > old.not_after);
        // The old certificate is untouched for whoever still holds it.
        assert_eq!(old.chain, old_chain);
        assert!(Arc::ptr_eq(
            &manager.get(&id("app")).await.expect("get"),
            &new
        ));
        assert_eq!(source.fetches(), 2);
    }

    #[tokio::test]
    async fn failed_fetch_is_reported_then_retried() {
        let (_dir, source) = TestSource::new(Duration::from_secs(3600), Duration::ZERO, 1);
        let manager = CertificateManager::new(source.clone());
        let err = manager
            .get(&id("app"))
            .await
            .expect_err("first fetch fails");
        assert!(matches!(err, Error::Unavailable { .. }), "{err}");
        assert!(
            err.to_string().contains("spiffe://td/ns/default/sa/app"),
            "{err}"
        );
        let snap = manager.snapshot();
        assert_eq!(snap[0].state, "unavailable");
        assert!(
            snap[0]
                .error
                .as_deref()
                .unwrap_or_default()
                .contains("lifetime")
        );

        let mut updates = manager.subscribe(&id("app")).await;
        timeout(
            Duration::from_secs(3),
            updates.wait_for(|s| matches!(s, CertificateState::Available(_))),
        )
        .await
        .expect("retried within 3 s")
        .expect("still subscribed");
        manager.get(&id("app")).await.expect("get after retry");
        assert_eq!(source.fetches(), 2);
    }

    #[tokio::test]
    async fn forget_stops_renewal_and_snapshot_lists_certificates() {
        let (_dir, source) = TestSource::new(Duration::from_secs(3600), Duration::ZERO, 0);
        let manager = CertificateManager::new(source.clone());
        let cert = manager.get(&id("b")).await.expect("get b");
        manager.get(&id("a")).await.expect("get a");

        let snap = manager.snapshot();
        assert_eq!(snap.len(), 2);
        assert_eq!(snap[0].identity, id("a"));
        assert_eq!(snap[1].identity, id("b"));
        assert_eq!(snap[1].state, "available");
        assert_eq!(snap[1].not_after, Some(cert.not_after));
        assert!(
            snap[1]
                .chain_pem
                .starts_with("-----BEGIN CERTIFICATE-----\n")
        );

        let mut updates = manager.subscribe(&id("b")).await;
        updates.borrow_and_update();
        assert!(manager.forget(&id("b")));
        assert!(!manager.forget(&id("b")));
        assert!(
            updates.changed().await.is_err(),
            "forgotten identity closes its channel"
        );
        assert_eq!(manager.snapshot().len(), 1);
        // The forgotten certificate is still usable by its holder; a new get fetches again.
        assert_eq!(cert.identity, id("b"));
        let fresh = manager.get(&id("b")).await.expect("get b again");
        assert!(!Arc::ptr_eq(&fresh, &cert));
        assert_eq!(source.fetches(), 3);
    }

    #[test]
    fn error_chain_includes_causes() {
        let err = Error::Unavailable {
            identity: id("app"),
            source: Arc::new(Error::EmptyChain),
        };
        let text = error_chain(&err);
        assert!(text.starts_with("certificate for spiffe://td/ns/default/sa/app is unavailable: "));
        assert!(text.ends_with("leaf certificate is missing"), "{text}");
    }
}
