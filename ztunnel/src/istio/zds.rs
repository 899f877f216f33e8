//! ZDS client: istio-cni's unix SOCK_SEQPACKET socket (one protobuf message per packet).
//! On each connection ztunnel says hello, then answers every request with an `Ack`
//! (an error text is a rejection): `add` carries exactly one netns fd (SCM_RIGHTS) and is
//! acked after the enrolment's result; `keep` marks a pod as still wanted; `del`
//! unenrols; `snapshot_sent` unenrols every pod not named since the connection began.
//! Reconnects with backoff; pods stay enrolled meanwhile, until the next snapshot.
//!
//! The pod's cgroup (where the connect hooks attach) is the one the kubelet named after
//! the pod's UID (`pod<uid>` with the cgroupfs driver, `kubepods[-<qos>]-pod<uid>.slice`
//! with systemd), and it must hold a process of the netns istio-cni handed over. Nothing
//! is derived from whatever processes share the netns: a stray `nsenter` or `ip netns
//! exec` from a host shell would otherwise widen it to a `kubepods` cgroup or the root.
//! The enrolment then checks the cgroup is no broader than the pod (`cgroup` module).
use std::{
    collections::BTreeSet,
    io::IoSliceMut,
    net::IpAddr,
    os::{
        fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use nix::sys::socket::{self, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr};
use prost::Message as _;
use tokio::io::{Interest, unix::AsyncFd};

use super::{
    proto::zds::{
        Ack, Version, WorkloadRequest, WorkloadResponse, ZdsHello, workload_request::Payload,
        workload_response,
    },
    source::{IstioSource, ZdsPod},
};
use crate::netns::Netns;

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Istio's messages are far smaller; a longer one is truncated and rejected.
const MAX_MESSAGE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to connect to istio-cni at {}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("zds socket {op} failed")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("istio-cni closed the connection")]
    Closed,
    #[error("zds message does not decode")]
    Decode {
        #[source]
        source: prost::DecodeError,
    },
    #[error("zds message longer than {MAX_MESSAGE} bytes")]
    Truncated,
}

fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { op, source }
}

struct Conn {
    fd: AsyncFd<OwnedFd>,
}

impl Conn {
    fn connect(path: &Path) -> Result<Self, Error> {
        let err = |source| Error::Connect {
            path: path.to_owned(),
            source,
        };
        let fd = socket::socket(
            socket::AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(err)?;
        let addr = UnixAddr::new(path).map_err(err)?;
        // A unix connect completes at once (or fails); no EINPROGRESS to wait for.
        socket::connect(fd.as_raw_fd(), &addr).map_err(err)?;
        // SAFETY: the OwnedFd is moved into the AsyncFd, so it stays open and keeps its
        // number until the AsyncFd is dropped.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| Error::Io {
            op: "register",
            source: e.into(),
        })?;
        Ok(Self { fd })
    }

    async fn send(&self, msg: &[u8]) -> Result<(), Error> {
        self.fd
            .async_io(Interest::WRITABLE, |fd| {
                socket::send(fd.as_raw_fd(), msg, MsgFlags::MSG_NOSIGNAL)
                    .map(drop)
                    .map_err(std::io::Error::from)
            })
            .await
            .map_err(io("send"))
    }

    /// One message and the fds that came with it.
    async fn recv(&self) -> Result<(Vec<u8>, Vec<OwnedFd>), Error> {
        self.fd
            .async_io(Interest::READABLE, |fd| {
                let mut buf = vec![0u8; MAX_MESSAGE];
                let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 4]);
                let mut iov = [IoSliceMut::new(&mut buf)];
                let msg = socket::recvmsg::<()>(
                    fd.as_raw_fd(),
                    &mut iov,
                    Some(&mut cmsg),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                )
                .map_err(std::io::Error::from)?;
                let mut fds = Vec::new();
                for c in msg.cmsgs().map_err(std::io::Error::from)? {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        // SAFETY: SCM_RIGHTS installed these fds in this process just now;
                        // nothing else owns them.
                        fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
                    }
                }
                let truncated = msg.flags.contains(MsgFlags::MSG_TRUNC);
                let n = msg.bytes;
                buf.truncate(n);
                Ok((buf, fds, truncated))
            })
            .await
            .map_err(io("recv"))
            .and_then(|(buf, fds, truncated)| {
                if truncated {
                    Err(Error::Truncated)
                } else if buf.is_empty() && fds.is_empty() {
                    // A zero-length read on SOCK_SEQPACKET is the peer's close.
                    Err(Error::Closed)
                } else {
                    Ok((buf, fds))
                }
            })
    }

    async fn ack(&self, error: Option<String>) -> Result<(), Error> {
        let resp = WorkloadResponse {
            payload: Some(workload_response::Payload::Ack(Ack {
                error: error.unwrap_or_default(),
            })),
        };
        self.send(&resp.encode_to_vec()).await
    }
}

/// Runs the ZDS client forever, reconnecting with backoff.
pub async fn run(path: PathBuf, source: Arc<IstioSource>) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let mut served = false;
        let err = serve_once(&path, &source, &mut served).await;
        source.set_zds_connected(false, Some(err.to_string()));
        if served {
            backoff = BACKOFF_MIN;
        }
        tracing::warn!(error = %err, retry_in_ms = backoff.as_millis() as u64, "zds connection to istio-cni ended; reconnecting");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn serve_once(path: &Path, source: &IstioSource, served: &mut bool) -> Error {
    let conn = match Conn::connect(path) {
        Ok(c) => c,
        Err(e) => return e,
    };
    let hello = ZdsHello {
        version: Version::V1 as i32,
    };
    if let Err(e) = conn.send(&hello.encode_to_vec()).await {
        return e;
    }
    source.set_zds_connected(true, None);
    tracing::info!(socket = %path.display(), "connected to istio-cni");
    *served = true;
    let mut seen = BTreeSet::new();
    loop {
        let (buf, fds) = match conn.recv().await {
            Ok(m) => m,
            Err(e) => return e,
        };
        let answer = answer(&buf, fds, source, &mut seen, netns_facts).await;
        if let Err(e) = &answer {
            tracing::error!(error = %e, "zds request rejected");
        }
        if let Err(e) = conn.ack(answer.err()).await {
            return e;
        }
    }
}

/// What enrolment needs from a pod's netns besides the ZDS message.
pub(crate) struct NetnsFacts {
    /// Where to reach it: `/proc/self/fd/<n>`.
    pub netns: PathBuf,
    /// (device, inode): the same netns sent again is the same pod.
    pub netns_id: (u64, u64),
    pub cgroup: PathBuf,
    pub addresses: Vec<IpAddr>,
}

/// Decodes and handles one request from istio-cni; the error is the text its `Ack` carries.
/// `inspect` reads the netns an `add` hands over ([`netns_facts`]; the fuzz harness passes
/// its own, having no real netns to give).
pub(crate) async fn answer<I>(
    buf: &[u8],
    fds: Vec<OwnedFd>,
    source: &IstioSource,
    seen: &mut BTreeSet<String>,
    inspect: I,
) -> Result<(), String>
where
    I: FnOnce(&OwnedFd, &str, &str) -> Result<NetnsFacts, String> + Send + 'static,
{
    match WorkloadRequest::decode(buf) {
        Err(source) => Err(Error::Decode { source }.to_string()),
        Ok(req) => handle(req, fds, source, seen, inspect).await,
    }
}

async fn handle<I>(
    req: WorkloadRequest,
    mut fds: Vec<OwnedFd>,
    source: &IstioSource,
    seen: &mut BTreeSet<String>,
    inspect: I,
) -> Result<(), String>
where
    I: FnOnce(&OwnedFd, &str, &str) -> Result<NetnsFacts, String> + Send + 'static,
{
    match req.payload {
        Some(Payload::Add(add)) => {
            if fds.len() != 1 {
                return Err(format!(
                    "add for {} carried {} fds; exactly one netns fd is expected",
                    add.uid,
                    fds.len()
                ));
            }
            let fd = fds.remove(0);
            let info = add
                .workload_info
                .ok_or_else(|| format!("add for {} has no workload info", add.uid))?;
            if add.uid.is_empty() || info.name.is_empty() || info.namespace.is_empty() {
                return Err(format!(
                    "add for {:?}: uid, name and namespace must not be empty",
                    add.uid
                ));
            }
            seen.insert(add.uid.clone());
            let key = format!("{}/{}", info.namespace, info.name);
            let uid = add.uid.clone();
            let (facts, fd) = tokio::task::spawn_blocking(move || (inspect(&fd, &uid, &key), fd))
                .await
                .map_err(|e| format!("pod {}: {e}", add.uid))?;
            let facts = facts?;
            let pod = ZdsPod {
                uid: add.uid,
                name: info.name,
                namespace: info.namespace,
                service_account: if info.service_account.is_empty() {
                    "default".to_owned()
                } else {
                    info.service_account
                },
                fd,
                netns: facts.netns,
                netns_id: facts.netns_id,
                cgroup: facts.cgroup,
                addresses: facts.addresses,
            };
            tracing::info!(pod = %pod.key(), uid = %pod.uid, netns = %pod.netns.display(), cgroup = %pod.cgroup.display(), "zds add");
            source.zds_add(pod).await
        }
        Some(Payload::Keep(keep)) => {
            if !source.zds_has(&keep.uid) {
                return Err(format!("keep for unknown pod {}", keep.uid));
            }
            seen.insert(keep.uid);
            Ok(())
        }
        Some(Payload::Del(del)) => {
            seen.remove(&del.uid);
            if source.zds_del(&del.uid).await {
                Ok(())
            } else {
                Err(format!("delete for unknown pod {}", del.uid))
            }
        }
        Some(Payload::SnapshotSent(_)) => {
            source.zds_reconcile(seen).await;
            Ok(())
        }
        None => Err("request with no payload (unknown message type?)".to_owned()),
    }
}

/// Reads a pod's [`NetnsFacts`] from the netns fd istio-cni passed; `uid` finds its
/// cgroup, `key` (`namespace/name`) names the pod in errors.
fn netns_facts(fd: &OwnedFd, uid: &str, key: &str) -> Result<NetnsFacts, String> {
    let meta = std::fs::File::from(
        fd.try_clone()
            .map_err(|e| format!("pod {key}: dup netns fd: {e}"))?,
    )
    .metadata()
    .map_err(|e| format!("pod {key}: stat netns fd: {e}"))?;
    let netns_id = (meta.dev(), meta.ino());
    let netns = PathBuf::from(format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd()));
    let cgroup = pod_cgroup(uid, netns_id).map_err(|e| format!("pod {key}: {e}"))?;
    let addresses = pod_addresses(&netns).map_err(|e| format!("pod {key}: {e}"))?;
    Ok(NetnsFacts {
        netns,
        netns_id,
        cgroup,
        addresses,
    })
}

/// The kubelet's cgroup for pod `uid`, which must hold a process of the pod's netns.
fn pod_cgroup(uid: &str, netns_id: (u64, u64)) -> Result<PathBuf, String> {
    let root = crate::ebpf::mount_point("cgroup2").ok_or("no cgroup2 mount found")?;
    let found = crate::kube::discovery::find_pod_cgroups(&root, &BTreeSet::from([uid.to_owned()]));
    let cgroup = found.get(uid).ok_or_else(|| {
        format!(
            "no cgroup named after pod uid {uid} (pod<uid> or kubepods-…-pod<uid>.slice) under {}",
            root.display()
        )
    })?;
    if !crate::cgroup::holds_netns(cgroup, netns_id) {
        return Err(format!(
            "cgroup {} of pod uid {uid} holds no process of the network namespace istio-cni handed over",
            cgroup.display()
        ));
    }
    Ok(cgroup.clone())
}

/// The netns's global addresses (loopback and IPv6 link-local left out).
fn pod_addresses(netns: &Path) -> Result<Vec<IpAddr>, String> {
    let ns = Netns::open(netns).map_err(|e| e.to_string())?;
    let home = Netns::current().map_err(|e| e.to_string())?;
    let addrs = ns
        .run(&home, nix::ifaddrs::getifaddrs)
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("list addresses: {e}"))?;
    let mut out: Vec<IpAddr> = addrs
        .filter_map(|a| {
            let sa = a.address?;
            let ip = if let Some(v4) = sa.as_sockaddr_in() {
                IpAddr::V4(v4.ip())
            } else {
                IpAddr::V6(sa.as_sockaddr_in6()?.ip())
            };
            let link_local = matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local());
            (!ip.is_loopback() && !link_local).then_some(ip)
        })
        .collect();
    out.sort();
    out.dedup();
    if out.is_empty() {
        return Err("the netns has no address".to_owned());
    }
    Ok(out)
}
