//! A fake istio-cni: listens on a SOCK_SEQPACKET unix socket as istio-cni's ZDS server
//! does, and hands ztunnel pods' network namespaces (opened from the fixture's
//! `/var/run/netns/<name>`) as SCM_RIGHTS with `add`, plus `keep`, `del` and
//! `snapshot_sent`, returning each ack's error text.
//!
//! Like istio-cni's ztunnel server (istio/istio `cni/pkg/nodeagent/ztunnelserver.go`)
//! it keeps every ztunnel connection it accepted until the ztunnel closes it: adds,
//! keeps and the snapshot go to the latest connection (a new ztunnel during an upgrade
//! gets every pod while the old one still serves), deletes to all of them, and an ack
//! from a connection other than the latest is waited for at most 5 s
//! (`readWriteDeadline`) and not checked.
use std::{
    fs::File,
    io::{IoSlice, IoSliceMut},
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use nix::{
    poll::{PollFd, PollFlags, PollTimeout, poll},
    sys::socket::{
        self, AddressFamily, Backlog, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr,
    },
};
use prost::Message as _;
use ztunnel::istio::proto::zds::{
    AddWorkload, DelWorkload, KeepWorkload, SnapshotSent, WorkloadInfo, WorkloadRequest,
    WorkloadResponse, ZdsHello, workload_request::Payload, workload_response,
};

use crate::Pod;

/// Generous: an ack follows a whole enrolment (listeners, eBPF attach, a certificate).
const WAIT_MS: u16 = 60_000;

/// istio-cni's `readWriteDeadline` for the ack of a message to a connection.
const OTHER_ACK_MS: u16 = 5_000;

pub struct FakeCni {
    pub path: PathBuf,
    listener: OwnedFd,
    /// Every open ztunnel connection, the latest last.
    conns: Vec<OwnedFd>,
}

fn wait_readable(fd: &OwnedFd, what: &str) -> anyhow::Result<()> {
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    // Several waits in a row make up for u16 milliseconds being about a minute.
    for _ in 0..3 {
        if poll(&mut fds, PollTimeout::from(WAIT_MS))? > 0 {
            return Ok(());
        }
    }
    bail!("timed out waiting for {what}")
}

fn send(conn: &OwnedFd, payload: Payload, fd: Option<&File>) -> anyhow::Result<()> {
    let msg = WorkloadRequest {
        payload: Some(payload),
    }
    .encode_to_vec();
    let raw = fd.map(|f| [f.as_raw_fd()]);
    let cmsgs: Vec<ControlMessage<'_>> = raw
        .as_ref()
        .map(|r| vec![ControlMessage::ScmRights(r)])
        .unwrap_or_default();
    socket::sendmsg::<()>(
        conn.as_raw_fd(),
        &[IoSlice::new(&msg)],
        &cmsgs,
        MsgFlags::empty(),
        None,
    )?;
    Ok(())
}

fn ack(buf: &[u8]) -> anyhow::Result<String> {
    match WorkloadResponse::decode(buf)?.payload {
        Some(workload_response::Payload::Ack(a)) => Ok(a.error),
        None => bail!("answer without an ack"),
    }
}

impl FakeCni {
    pub fn listen(path: &Path) -> anyhow::Result<Self> {
        let _ = std::fs::remove_file(path);
        let fd = socket::socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        socket::bind(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
        socket::listen(&fd, Backlog::new(4)?)?;
        Ok(Self {
            path: path.to_owned(),
            listener: fd,
            conns: Vec::new(),
        })
    }

    /// Accepts a ztunnel's connection and checks its hello; it becomes the latest.
    pub fn accept(&mut self) -> anyhow::Result<()> {
        wait_readable(&self.listener, "ztunnel to connect")?;
        let raw = socket::accept(self.listener.as_raw_fd())?;
        // SAFETY: accept just returned this fd; nothing else owns it.
        let conn = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
        let hello = ZdsHello::decode(recv(&conn, "the hello")?.as_slice())?;
        anyhow::ensure!(hello.version == 1, "hello with version {}", hello.version);
        self.conns.push(conn);
        Ok(())
    }

    /// How many ztunnel connections are open (as istio-cni's `ztunnel_connected`).
    /// Connections their ztunnel closed are dropped first.
    pub fn connected(&mut self) -> usize {
        self.conns.retain(|c| {
            let mut fds = [PollFd::new(c.as_fd(), PollFlags::POLLIN)];
            // Readable with nothing pending means closed (ztunnel sends only acks).
            !matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
        });
        self.conns.len()
    }

    /// Closes every connection, as an istio-cni restart does.
    pub fn disconnect(&mut self) {
        self.conns.clear();
    }

    /// Sends to the latest connection and returns its ack's error text.
    fn request(&self, payload: Payload, fd: Option<&File>) -> anyhow::Result<String> {
        let conn = self.conns.last().context("not connected")?;
        send(conn, payload, fd)?;
        ack(&recv(conn, "the ack")?)
    }

    /// Sends `add` with the pod's netns; returns the ack's error text (empty = ok).
    pub fn add(&self, uid: &str, pod: &Pod) -> anyhow::Result<String> {
        let netns = File::open(&pod.netns_path)?;
        self.request(add_payload(uid, pod), Some(&netns))
    }

    /// Sends `add` without any fd (a protocol error ztunnel must reject).
    pub fn add_without_fd(&self, uid: &str, pod: &Pod) -> anyhow::Result<String> {
        self.request(add_payload(uid, pod), None)
    }

    pub fn keep(&self, uid: &str) -> anyhow::Result<String> {
        self.request(
            Payload::Keep(KeepWorkload {
                uid: uid.to_owned(),
            }),
            None,
        )
    }

    /// Sends `del` to every connection (istio-cni's `PodDeleted`); returns the latest's
    /// ack text. The others' acks are waited for 5 s at most and not checked.
    pub fn del(&self, uid: &str) -> anyhow::Result<String> {
        let del = || {
            Payload::Del(DelWorkload {
                uid: uid.to_owned(),
            })
        };
        let (latest, older) = self.conns.split_last().context("not connected")?;
        for conn in older {
            if send(conn, del(), None).is_ok() {
                let mut fds = [PollFd::new(conn.as_fd(), PollFlags::POLLIN)];
                if matches!(poll(&mut fds, PollTimeout::from(OTHER_ACK_MS)), Ok(n) if n > 0) {
                    let _ = recv(conn, "an older connection's ack");
                }
            }
        }
        send(latest, del(), None)?;
        ack(&recv(latest, "the ack")?)
    }

    pub fn snapshot_sent(&self) -> anyhow::Result<String> {
        self.request(Payload::SnapshotSent(SnapshotSent {}), None)
    }
}

fn recv(conn: &OwnedFd, what: &str) -> anyhow::Result<Vec<u8>> {
    wait_readable(conn, what)?;
    let mut buf = vec![0u8; 4096];
    let n = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        socket::recvmsg::<()>(conn.as_raw_fd(), &mut iov, None, MsgFlags::empty())?.bytes
    };
    anyhow::ensure!(
        n > 0,
        "ztunnel closed the zds connection while we waited for {what}"
    );
    buf.truncate(n);
    Ok(buf)
}

impl Drop for FakeCni {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The `add` message for a pod in `default`.
fn add_payload(uid: &str, pod: &Pod) -> Payload {
    Payload::Add(AddWorkload {
        uid: uid.to_owned(),
        workload_info: Some(WorkloadInfo {
            name: pod.name.clone(),
            namespace: "default".to_owned(),
            service_account: pod.service_account.clone(),
        }),
    })
}
