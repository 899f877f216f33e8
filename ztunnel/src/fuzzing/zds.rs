//! What istio-cni sends over ZDS: a sequence of `WorkloadRequest`s, each decoded and
//! handled as on the real connection ([`answer`]), against an [`IstioSource`] whose
//! enrolment loop answers every change at once, as `app`'s does, without enrolling.
//!
//! Input: [`super::records`]; the body is the message, the tag says how many fds came
//! with it (bits 0–1, from `/dev/null`: there is no real netns) and which netns they
//! stand for (bits 2–3; netns 3 fails to be read). Checked: every request is answered
//! within [`super::DEADLINE`] (well below the 60 s enrolment wait), since enrolment
//! always answers at once.
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::path::PathBuf;

use prost::Message as _;
use tokio::sync::watch;

use crate::identity::Identity;
use crate::istio::proto::zds::{
    AddWorkload, DelWorkload, KeepWorkload, SnapshotSent, WorkloadInfo, WorkloadRequest,
    workload_request::Payload,
};
use crate::istio::source::{Base, EnrolResults, IstioSource};
use crate::istio::zds::{NetnsFacts, answer};
use crate::state::LocalConfig;

const NODE: &str = "node1";

pub fn run(data: &[u8]) {
    replay(data);
}

/// Each request's answer.
fn replay(data: &[u8]) -> Vec<Result<(), String>> {
    super::runtime().block_on(async {
        let base = Base {
            node: NODE.to_owned(),
            trust_domain: "cluster.local".to_owned(),
            cluster: "Kubernetes".to_owned(),
        };
        let (tx, configs) = watch::channel(IstioSource::empty(&base));
        let (results_tx, results) = watch::channel(BTreeMap::new());
        let source = IstioSource::new(base, tx, results);
        tokio::spawn(enrolment(configs, results_tx));
        let mut seen = BTreeSet::new();
        let mut answers = Vec::new();
        for (i, (tag, body)) in super::records(data).enumerate() {
            let fds = (0..tag & 0b11).map(|_| dev_null()).collect();
            let netns = (tag >> 2) & 0b11;
            let answer = answer(body, fds, &source, &mut seen, move |fd, _uid, key| {
                fake_netns(fd, key, netns)
            });
            match tokio::time::timeout(super::DEADLINE, answer).await {
                Ok(answer) => answers.push(answer),
                Err(_) => panic!(
                    "zds request {i} unanswered after {:?} although enrolment answers at once",
                    super::DEADLINE
                ),
            }
        }
        answers
    })
}

fn dev_null() -> OwnedFd {
    std::fs::File::open("/dev/null")
        .expect("/dev/null opens")
        .into()
}

/// The netns `n` stands for: pod address 10.0.0.(n+1); netns 3 cannot be read.
fn fake_netns(fd: &OwnedFd, key: &str, n: u8) -> Result<NetnsFacts, String> {
    if n == 3 {
        return Err(format!(
            "pod {key}: no process runs in the netns, so its cgroup is unknown"
        ));
    }
    Ok(NetnsFacts {
        netns: PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd())),
        netns_id: (0, u64::from(n)),
        cgroup: PathBuf::from(format!("/sys/fs/cgroup/kubepods/pod-fuzz-{n}")),
        addresses: vec![IpAddr::from([10, 0, 0, n + 1])],
    })
}

/// `app`'s enrolment loop without the enrolling: after each config change, every local
/// pod that should be enrolled is, if its identity is valid.
pub(crate) async fn enrolment(
    mut configs: watch::Receiver<LocalConfig>,
    results: watch::Sender<EnrolResults>,
) {
    loop {
        let done: EnrolResults = configs
            .borrow_and_update()
            .local_enrolled(NODE)
            .into_iter()
            .map(|(key, pod)| {
                let enrolled = pod.identity.parse::<Identity>().map(drop);
                (key, enrolled.map_err(|e| e.to_string()))
            })
            .collect();
        results.send_replace(done);
        if configs.changed().await.is_err() {
            return;
        }
    }
}

fn message(payload: Payload) -> Vec<u8> {
    WorkloadRequest {
        payload: Some(payload),
    }
    .encode_to_vec()
}

fn add(uid: &str, name: &str) -> Vec<u8> {
    message(Payload::Add(AddWorkload {
        uid: uid.into(),
        workload_info: Some(WorkloadInfo {
            name: name.into(),
            namespace: "shop".into(),
            service_account: "web".into(),
        }),
    }))
}

fn keep(uid: &str) -> Vec<u8> {
    message(Payload::Keep(KeepWorkload { uid: uid.into() }))
}

fn del(uid: &str) -> Vec<u8> {
    message(Payload::Del(DelWorkload { uid: uid.into() }))
}

fn snapshot() -> Vec<u8> {
    message(Payload::SnapshotSent(SnapshotSent {}))
}

/// A record with `fds` fds standing for netns `netns`.
fn rec(fds: u8, netns: u8, body: &[u8]) -> Vec<u8> {
    super::record(fds | netns << 2, body)
}

pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (
            "add-snapshot-del",
            [
                rec(1, 0, &add("uid-a", "web-0")),
                rec(1, 1, &add("uid-b", "web-1")),
                rec(0, 0, &snapshot()),
                rec(0, 0, &del("uid-a")),
            ]
            .concat(),
        ),
        (
            "reconnect",
            [
                rec(1, 0, &add("uid-a", "web-0")),
                rec(0, 0, &snapshot()),
                // The next connection: the same pod again, then a new netns for it.
                rec(1, 0, &add("uid-a", "web-0")),
                rec(0, 0, &keep("uid-a")),
                rec(1, 1, &add("uid-a", "web-0")),
                rec(0, 0, &snapshot()),
            ]
            .concat(),
        ),
        (
            "refused",
            [
                rec(0, 0, &keep("nobody")),
                rec(0, 0, &del("nobody")),
                rec(0, 0, &add("uid-a", "web-0")),
                rec(2, 0, &add("uid-a", "web-0")),
                rec(1, 0, &add("", "web-0")),
                rec(1, 3, &add("uid-a", "web-0")),
                rec(0, 0, &WorkloadRequest { payload: None }.encode_to_vec()),
                rec(0, 0, b"\xff\xff\xff"),
            ]
            .concat(),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    fn answers(seed: &[u8]) -> Vec<bool> {
        replay(seed).iter().map(Result::is_ok).collect()
    }

    #[test]
    fn seeds_enrol_release_and_refuse_as_istio_cni_expects() {
        let seeds: BTreeMap<_, _> = seeds().into_iter().collect();
        assert_eq!(answers(&seeds["add-snapshot-del"]), [true; 4]);
        assert_eq!(answers(&seeds["reconnect"]), [true; 6]);
        assert_eq!(answers(&seeds["refused"]), [false; 8]);
        for seed in seeds.values() {
            run(seed);
        }
    }
}
