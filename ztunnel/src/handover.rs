//! Zero-downtime upgrade: the running ztunnel hands its pods' listening sockets to the
//! ztunnel that replaces it.
//!
//! Every ztunnel that has taken over its node serves a unix `SOCK_SEQPACKET` socket at
//! `--handover-socket` (one JSON message per packet). A starting ztunnel first connects
//! there; whoever answers is its predecessor. For each pod it enrols, the successor asks
//! for that pod's listening sockets (`take`, by the netns's device and inode), and they
//! come back as `SCM_RIGHTS` — the very sockets, accept queues included, as Envoy's hot
//! restart and HAProxy's seamless reload pass theirs. From then on both processes accept
//! on them and nothing is refused. Once every pod the successor should enrol is enrolled
//! (listeners, capture, certificate), it sends `done`; the predecessor stops accepting,
//! answers `stopped` and drains its own connections, and the successor releases the
//! predecessor's capture links and serves the socket for its own successor.
//!
//! A successor that dies before `done` changes nothing for the predecessor, which keeps
//! serving and waits for the next one; a predecessor that dies leaves the successor the
//! sockets it already took (a socket lives while any process holds it), and the
//! successor binds the rest.
use std::{
    io::{IoSlice, IoSliceMut},
    net::SocketAddr,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    sys::socket::{
        self, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
        SockType, UnixAddr, sockopt,
    },
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// The protocol version; a predecessor refuses another.
pub const VERSION: u32 = 1;
/// Longest `--handover-socket`: `sun_path` holds 107 bytes and a NUL, and the socket is
/// first bound at `<path>.<pid>` (up to 8 more) and then renamed into place.
pub const MAX_PATH: usize = 99;
/// How long either side waits for an answer to a request (the predecessor answers from
/// what it holds; `done` stops its accept loops, a matter of milliseconds).
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a predecessor waits for a successor's next request. A successor still
/// enrolling pings every [`KEEPALIVE`], so only a hung or stopped one hits this.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a successor waits in all for a predecessor that is slow to answer (its
/// connection open) before taking it as gone.
const SLOW_REPLY_LIMIT: Duration = Duration::from_secs(60);
/// A successor that has not sent anything for this long pings.
const KEEPALIVE: Duration = Duration::from_secs(30);
/// How often refusing a successor is logged (each refusal is counted).
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(60);
/// Messages are a few hundred bytes; listeners per pod at most six.
const MAX_MESSAGE: usize = 16 << 10;
const MAX_FDS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to connect to the handover socket {}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("failed to serve the handover socket {}", path.display())]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("handover socket {op} failed")]
    Io {
        op: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("the other ztunnel closed the handover connection")]
    Closed,
    #[error(
        "the predecessor did not answer for {}s with its connection open; taken as gone",
        waited.as_secs()
    )]
    Slow { waited: Duration },
    #[error(
        "a handover message was truncated (longer than {MAX_MESSAGE} bytes or {MAX_FDS} descriptors)"
    )]
    Truncated,
    #[error("handover message does not decode")]
    Decode {
        #[source]
        source: serde_json::Error,
    },
    #[error("the handover peer runs as uid {uid}, not as this ztunnel's {own}")]
    Peer { uid: u32, own: u32 },
    #[error("the predecessor refused the handover: {reason}")]
    Refused { reason: String },
    #[error("unexpected handover message {got}; expected {expected}")]
    Unexpected { got: String, expected: &'static str },
    #[error("listening socket for {addr} handed over for pod {pod} is unusable: {reason}")]
    Listener {
        pod: String,
        addr: SocketAddr,
        reason: String,
    },
}

fn io(op: &'static str) -> impl FnOnce(nix::Error) -> Error {
    move |source| Error::Io { op, source }
}

/// Successor → predecessor.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Request {
    /// `pod`: the successor's pod name (`POD_NAME`), empty outside Kubernetes.
    Hello {
        version: u32,
        pid: u32,
        #[serde(default)]
        pod: String,
    },
    /// The listening sockets of the pod whose netns has this (device, inode).
    Take {
        pod: String,
        netns: (u64, u64),
    },
    Ping,
    /// Every pod is taken over: stop accepting.
    Done,
}

/// Predecessor → successor.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Reply {
    Welcome {
        version: u32,
        pid: u32,
        #[serde(default)]
        pod: String,
    },
    Refused {
        reason: String,
    },
    /// The pod's listening sockets follow as `SCM_RIGHTS`, in this order.
    Listeners {
        addrs: Vec<SocketAddr>,
    },
    NotEnrolled,
    /// `pods`: the pods the predecessor serves (`namespace/name`), for the successor to
    /// check it covers them before it sends `done` (absent from an older predecessor).
    Pong {
        #[serde(default)]
        pods: Option<Vec<String>>,
    },
    /// No listener of the predecessor accepts any more; it drains.
    Stopped {
        pods: usize,
    },
}

fn name<T: std::fmt::Debug>(m: &T) -> String {
    let s = format!("{m:?}");
    s.split([' ', '{']).next().unwrap_or_default().to_owned()
}

fn send(fd: BorrowedFd<'_>, msg: &impl Serialize, fds: &[RawFd]) -> Result<(), Error> {
    let bytes = serde_json::to_vec(msg).map_err(|source| Error::Decode { source })?;
    let cmsgs: Vec<ControlMessage<'_>> = if fds.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(fds)]
    };
    // A socket call with a timeout set fails with EINTR when the process is stopped and
    // resumed (signal(7)), handlers or not: a frozen ztunnel is not a broken connection.
    loop {
        match socket::sendmsg::<()>(
            fd.as_raw_fd(),
            &[IoSlice::new(&bytes)],
            &cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Err(Errno::EINTR) => continue,
            sent => {
                sent.map_err(io("send"))?;
                return Ok(());
            }
        }
    }
}

/// One message and the descriptors that came with it (owned at once, so they are
/// closed whatever happens next).
fn recv<T: DeserializeOwned>(fd: BorrowedFd<'_>) -> Result<(T, Vec<OwnedFd>), Error> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (n, fds, truncated) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        // EINTR: see `send`.
        let msg = loop {
            match socket::recvmsg::<()>(
                fd.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Err(Errno::EINTR) => continue,
                got => break got.map_err(io("recv"))?,
            }
        };
        let mut fds = Vec::new();
        for c in msg.cmsgs().map_err(io("recv"))? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: SCM_RIGHTS installed these descriptors in this process just
                // now; nothing else owns them.
                fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
            }
        }
        let truncated = msg
            .flags
            .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
        (msg.bytes, fds, truncated)
    };
    if truncated {
        return Err(Error::Truncated);
    }
    if n == 0 {
        // A zero-length read on SOCK_SEQPACKET is the peer's close.
        return Err(Error::Closed);
    }
    let msg = serde_json::from_slice(&buf[..n]).map_err(|source| Error::Decode { source })?;
    Ok((msg, fds))
}

fn set_timeouts(fd: &OwnedFd, read: Duration) -> Result<(), Error> {
    let tv = |d: Duration| nix::sys::time::TimeVal::new(d.as_secs() as _, 0);
    socket::setsockopt(fd, sockopt::ReceiveTimeout, &tv(read)).map_err(io("setsockopt"))?;
    socket::setsockopt(fd, sockopt::SendTimeout, &tv(REPLY_TIMEOUT)).map_err(io("setsockopt"))
}

/// Only a process of our own user (root) may hand sockets over or take them.
fn check_peer(fd: &OwnedFd) -> Result<(), Error> {
    let cred = socket::getsockopt(fd, sockopt::PeerCredentials).map_err(io("getsockopt"))?;
    let own = nix::unistd::geteuid().as_raw();
    if cred.uid() != own {
        return Err(Error::Peer {
            uid: cred.uid(),
            own,
        });
    }
    Ok(())
}

fn seqpacket() -> Result<OwnedFd, Error> {
    socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io("socket"))
}

/// The predecessor, seen from the successor: a connection to it while it still serves.
pub struct Predecessor {
    conn: OwnedFd,
    /// Its process id (for logs).
    pub pid: u32,
    /// Its pod name (`POD_NAME`), empty outside Kubernetes.
    pub pod: String,
    last_sent: Instant,
    /// Listening sockets taken so far.
    pub taken: usize,
}

impl std::fmt::Debug for Predecessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Predecessor")
            .field("pid", &self.pid)
            .field("taken", &self.taken)
            .finish()
    }
}

impl Predecessor {
    /// Connects to whoever serves `path`, saying who this ztunnel is (`pod`: its pod
    /// name, empty outside Kubernetes). `Ok(None)`: nobody does (no ztunnel ran here, or
    /// it exited or crashed and left its socket file behind).
    pub fn connect(path: &Path, pod: &str) -> Result<Option<Self>, Error> {
        let fd = seqpacket()?;
        let addr = UnixAddr::new(path).map_err(|source| Error::Connect {
            path: path.to_owned(),
            source,
        })?;
        // Bounds the connect too: a unix connect waits on a full backlog for the send
        // timeout.
        set_timeouts(&fd, REPLY_TIMEOUT)?;
        match socket::connect(fd.as_raw_fd(), &addr) {
            Ok(()) => {}
            Err(Errno::ENOENT | Errno::ECONNREFUSED) => return Ok(None),
            Err(source) => {
                return Err(Error::Connect {
                    path: path.to_owned(),
                    source,
                });
            }
        }
        check_peer(&fd)?;
        send(
            fd.as_fd(),
            &Request::Hello {
                version: VERSION,
                pid: std::process::id(),
                pod: pod.to_owned(),
            },
            &[],
        )?;
        match recv::<Reply>(fd.as_fd())?.0 {
            Reply::Welcome { pid, pod, .. } => Ok(Some(Self {
                conn: fd,
                pid,
                pod,
                last_sent: Instant::now(),
                taken: 0,
            })),
            Reply::Refused { reason } => Err(Error::Refused { reason }),
            other => Err(Error::Unexpected {
                got: name(&other),
                expected: "welcome",
            }),
        }
    }

    /// Sends a request and waits for its answer. A predecessor whose connection stays open
    /// but that does not answer within [`REPLY_TIMEOUT`] is alive and slow (stopped,
    /// starved, its node overloaded), not gone: it is waited for up to
    /// [`SLOW_REPLY_LIMIT`] in all (said once), and only then taken as gone. A closed
    /// connection is gone at once.
    fn ask(&mut self, req: &Request) -> Result<(Reply, Vec<OwnedFd>), Error> {
        send(self.conn.as_fd(), req, &[])?;
        self.last_sent = Instant::now();
        let asked = Instant::now();
        let mut said = false;
        loop {
            match recv(self.conn.as_fd()) {
                Err(Error::Io {
                    op: "recv",
                    source: Errno::EAGAIN,
                }) => {
                    let waited = asked.elapsed();
                    if waited >= SLOW_REPLY_LIMIT {
                        return Err(Error::Slow { waited });
                    }
                    if !std::mem::replace(&mut said, true) {
                        tracing::warn!(
                            predecessor_pid = self.pid,
                            waited_s = waited.as_secs(),
                            limit_s = SLOW_REPLY_LIMIT.as_secs(),
                            "the predecessor is slow to answer (its connection is open); waiting for it"
                        );
                    }
                }
                answer => {
                    if said {
                        tracing::info!(
                            predecessor_pid = self.pid,
                            waited_ms = asked.elapsed().as_millis() as u64,
                            "the predecessor answered"
                        );
                    }
                    return answer;
                }
            }
        }
    }

    /// The listening sockets the predecessor holds for the pod whose netns has
    /// `netns_id` (empty when it has none), each checked: a TCP socket listening at the
    /// address it claims, which is one of `wanted` (the pod's listener addresses), in
    /// the pod's netns (`netns_cookie`, when the kernel can tell).
    pub fn take(
        &mut self,
        pod: &str,
        netns_id: (u64, u64),
        netns_cookie: Option<u64>,
        wanted: &[SocketAddr],
    ) -> Result<Vec<(SocketAddr, std::net::TcpListener)>, Error> {
        let (reply, fds) = self.ask(&Request::Take {
            pod: pod.to_owned(),
            netns: netns_id,
        })?;
        let addrs = match reply {
            Reply::Listeners { addrs } => addrs,
            Reply::NotEnrolled => return Ok(Vec::new()),
            other => {
                return Err(Error::Unexpected {
                    got: name(&other),
                    expected: "listeners",
                });
            }
        };
        if addrs.len() != fds.len() {
            return Err(Error::Unexpected {
                got: format!("{} addresses with {} descriptors", addrs.len(), fds.len()),
                expected: "one descriptor per address",
            });
        }
        let mut out = Vec::with_capacity(addrs.len());
        for (addr, fd) in addrs.into_iter().zip(fds) {
            let bad = |reason: String| Error::Listener {
                pod: pod.to_owned(),
                addr,
                reason,
            };
            let s = socket2::Socket::from(fd);
            let local = s
                .local_addr()
                .map_err(|e| bad(format!("getsockname: {e}")))?
                .as_socket();
            if local != Some(addr) {
                return Err(bad(format!("it is bound to {local:?}")));
            }
            if !wanted.contains(&addr) {
                return Err(bad(
                    "not an address ztunnel listens on in this pod".to_owned()
                ));
            }
            if s.r#type().map_err(|e| bad(format!("SO_TYPE: {e}")))? != socket2::Type::STREAM {
                return Err(bad("not a stream socket".to_owned()));
            }
            if !socket::getsockopt(&s, sockopt::AcceptConn)
                .map_err(|e| bad(format!("SO_ACCEPTCONN: {e}")))?
            {
                return Err(bad("not listening".to_owned()));
            }
            if let Some(want) = netns_cookie {
                match crate::netns::socket_cookie(s.as_fd()) {
                    Ok(Some(have)) if have != want => {
                        return Err(bad(format!(
                            "it lives in netns cookie {have}, the pod's is {want}"
                        )));
                    }
                    Ok(_) => {}
                    Err(e) => return Err(bad(format!("SO_NETNS_COOKIE: {e}"))),
                }
            }
            s.set_nonblocking(true)
                .map_err(|e| bad(format!("O_NONBLOCK: {e}")))?;
            out.push((addr, std::net::TcpListener::from(s)));
        }
        self.taken += out.len();
        Ok(out)
    }

    /// Runs `gone` on a thread of its own as soon as the predecessor's side of the
    /// connection closes (it exited or crashed; or, after `done`, ended the session),
    /// without waiting for the next request. Polls `POLLRDHUP`, which the answers to
    /// requests do not raise.
    pub fn on_close(&self, gone: impl FnOnce() + Send + 'static) -> Result<(), Error> {
        let fd = self.conn.try_clone().map_err(|e| Error::Io {
            op: "dup",
            source: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EBADF)),
        })?;
        std::thread::Builder::new()
            .name("handover-watch".to_owned())
            .spawn(move || {
                loop {
                    let mut fds = [nix::poll::PollFd::new(
                        fd.as_fd(),
                        // Not in nix's set; the kernel's (include/uapi/asm-generic/poll.h).
                        nix::poll::PollFlags::from_bits_retain(libc::POLLRDHUP),
                    )];
                    match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(1000u16)) {
                        Ok(0) | Err(Errno::EINTR) => continue,
                        Ok(_) | Err(_) => break,
                    }
                }
                gone();
            })
            .map(drop)
            .map_err(|e| Error::Io {
                op: "spawn",
                source: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EAGAIN)),
            })
    }

    /// Notices a predecessor that went away (it never speaks unasked: anything to read
    /// is its close), and keeps the connection from the predecessor's idle timeout while
    /// pods are still being enrolled.
    pub fn keepalive(&mut self) -> Result<(), Error> {
        let mut fds = [nix::poll::PollFd::new(
            self.conn.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        if nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO).map_err(io("poll"))? > 0 {
            return Err(Error::Closed);
        }
        if self.last_sent.elapsed() < KEEPALIVE {
            return Ok(());
        }
        self.pods().map(drop)
    }

    /// The pods the predecessor serves now (`None` from a predecessor too old to say).
    pub fn pods(&mut self) -> Result<Option<Vec<String>>, Error> {
        match self.ask(&Request::Ping)?.0 {
            Reply::Pong { pods } => Ok(pods),
            other => Err(Error::Unexpected {
                got: name(&other),
                expected: "pong",
            }),
        }
    }

    /// Tells the predecessor that every pod is taken over and waits until it no longer
    /// accepts. Returns how many pods it held.
    pub fn finish(mut self) -> Result<usize, Error> {
        match self.ask(&Request::Done)?.0 {
            Reply::Stopped { pods } => Ok(pods),
            other => Err(Error::Unexpected {
                got: name(&other),
                expected: "stopped",
            }),
        }
    }
}

/// What a predecessor offers its successor; implemented by the composition root.
pub trait Serving: Send + Sync + 'static {
    /// This ztunnel's pod name (`POD_NAME`), empty outside Kubernetes.
    fn pod(&self) -> String;
    /// Why a successor from pod `pod` may not take over, if it may not: a restarted
    /// container of the pod this ztunnel took over from would take the node back
    /// (a crash loop between an old and a new ztunnel).
    fn refuse(&self, pod: &str) -> Option<String>;
    /// The pods this ztunnel serves (`namespace/name`).
    fn pods(&self) -> Vec<String>;
    /// Duplicates of the listening sockets of the pod enrolled in the netns with this
    /// (device, inode), with their addresses; `None` when no such pod is enrolled here.
    /// From then on the successor owns the pod's shared kernel state (pins, map entries,
    /// return path): should this ztunnel's view drop the pod meanwhile, it lets go of
    /// its own listeners and links only.
    fn listeners(&self, netns_id: (u64, u64)) -> Option<Vec<(SocketAddr, OwnedFd)>>;
    /// The successor went away before taking over: the pods whose sockets it took are
    /// this ztunnel's alone again (see [`Self::listeners`]).
    fn successor_gone(&self);
    /// Stops accepting on every pod listener for good and closes this process's
    /// descriptors of them; returns once no accept loop runs, with the pod count.
    fn stop_accepting(&self) -> usize;
    /// Starts draining this process (the successor now takes every new connection).
    fn drain(&self);
    /// Counts a handover as the predecessor (`complete`, `successor_gone`, `refused`).
    fn count(&self, result: &'static str);
}

/// Starts serving `path` for a successor: binds a fresh socket under a temporary name
/// and renames it over `path` (whoever served it before keeps its own connections), then
/// answers successors one at a time on a thread of its own until one takes over.
pub fn serve(path: &Path, serving: Arc<dyn Serving>) -> Result<(), Error> {
    let err = |source| Error::Listen {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let tmp = PathBuf::from(format!("{}.{}", path.display(), std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let fd = seqpacket()?;
    let addr = UnixAddr::new(&tmp).map_err(|e| err(e.into()))?;
    socket::bind(fd.as_raw_fd(), &addr).map_err(|e| err(e.into()))?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    }
    socket::listen(&fd, Backlog::new(4).map_err(|e| err(e.into()))?).map_err(|e| err(e.into()))?;
    std::fs::rename(&tmp, path).map_err(err)?;
    let path = path.to_owned();
    std::thread::Builder::new()
        .name("handover".to_owned())
        .spawn(move || run(fd, &path, &*serving))
        .map_err(err)?;
    Ok(())
}

/// How one successor's session ended.
enum Session {
    HandedOver { pods: usize },
    Ended(Error),
}

fn run(listener: OwnedFd, path: &Path, serving: &dyn Serving) {
    tracing::info!(socket = %path.display(), "serving the handover socket for a successor");
    // A refused successor (a restarted container of the pod this ztunnel replaced) asks
    // again at each of its reconciles: one line a minute says so, with the count.
    let mut refusals = crate::limits::RateLimit::new(REFUSAL_LOG_EVERY);
    loop {
        let accepted = socket::accept(listener.as_raw_fd());
        let conn = match accepted {
            // SAFETY: accept just returned this descriptor; nothing else owns it.
            Ok(raw) => unsafe { OwnedFd::from_raw_fd(raw) },
            Err(Errno::EINTR | Errno::ECONNABORTED) => continue,
            Err(e) => {
                tracing::error!(socket = %path.display(), error = %e, "accept on the handover socket failed; no successor can take over from this ztunnel");
                return;
            }
        };
        match session(&conn, serving) {
            Session::HandedOver { pods } => {
                // Nobody takes over from a ztunnel that has handed over: a late
                // successor finds no one here and asks the path's new owner.
                drop(listener);
                serving.count("complete");
                tracing::info!(
                    pods,
                    "handed over to the successor; this ztunnel no longer accepts and drains"
                );
                serving.drain();
                return;
            }
            Session::Ended(e @ Error::Refused { .. }) => {
                serving.count("refused");
                if let Some(suppressed) = refusals.allow(Instant::now()) {
                    tracing::warn!(error = %e, suppressed, "refused a successor");
                }
            }
            Session::Ended(e) => {
                serving.count("successor_gone");
                serving.successor_gone();
                tracing::warn!(error = %e, "the successor went away before taking over (it exited or crashed); this ztunnel keeps serving");
            }
        }
    }
}

fn session(conn: &OwnedFd, serving: &dyn Serving) -> Session {
    let step = || -> Result<Option<usize>, Error> {
        check_peer(conn)?;
        set_timeouts(conn, IDLE_TIMEOUT)?;
        let mut welcomed = false;
        loop {
            // Descriptors a successor should not send are closed on the spot.
            let (req, _fds) = recv::<Request>(conn.as_fd())?;
            // Nothing is handed out, and nothing stops, before a hello was accepted.
            if !welcomed && !matches!(req, Request::Hello { .. }) {
                return Err(Error::Unexpected {
                    got: name(&req),
                    expected: "hello",
                });
            }
            match req {
                Request::Hello { version, pid, pod } => {
                    let refused = if version != VERSION {
                        Some(format!(
                            "handover protocol version {version} asked, this ztunnel speaks {VERSION}"
                        ))
                    } else {
                        serving.refuse(&pod)
                    };
                    if let Some(reason) = refused {
                        send(
                            conn.as_fd(),
                            &Reply::Refused {
                                reason: reason.clone(),
                            },
                            &[],
                        )?;
                        return Err(Error::Refused { reason });
                    }
                    welcomed = true;
                    tracing::info!(successor_pid = pid, successor_pod = %pod, "a successor connected to take over");
                    send(
                        conn.as_fd(),
                        &Reply::Welcome {
                            version: VERSION,
                            pid: std::process::id(),
                            pod: serving.pod(),
                        },
                        &[],
                    )?;
                }
                Request::Ping => send(
                    conn.as_fd(),
                    &Reply::Pong {
                        pods: Some(serving.pods()),
                    },
                    &[],
                )?,
                Request::Take { pod, netns } => match serving.listeners(netns) {
                    Some(listeners) => {
                        let addrs: Vec<SocketAddr> = listeners.iter().map(|(a, _)| *a).collect();
                        let fds: Vec<RawFd> =
                            listeners.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
                        tracing::info!(pod = %pod, listeners = addrs.len(), "handing a pod's listening sockets to the successor");
                        send(conn.as_fd(), &Reply::Listeners { addrs }, &fds)?;
                    }
                    None => send(conn.as_fd(), &Reply::NotEnrolled, &[])?,
                },
                Request::Done => {
                    let pods = serving.stop_accepting();
                    // The successor may be gone already; this ztunnel stopped anyway.
                    if let Err(e) = send(conn.as_fd(), &Reply::Stopped { pods }, &[]) {
                        tracing::warn!(error = %e, "the successor left before hearing that this ztunnel stopped accepting");
                    }
                    return Ok(Some(pods));
                }
            }
        }
    };
    match step() {
        Ok(Some(pods)) => Session::HandedOver { pods },
        Ok(None) => Session::Ended(Error::Closed),
        Err(e) => Session::Ended(e),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// A predecessor holding one pod with two listeners on loopback.
    struct Fake {
        netns: (u64, u64),
        listeners: Mutex<Vec<std::net::TcpListener>>,
        stopped: Mutex<Option<usize>>,
        results: Mutex<Vec<&'static str>>,
    }

    impl Serving for Fake {
        fn pod(&self) -> String {
            "ztunnel-old".to_owned()
        }

        fn refuse(&self, pod: &str) -> Option<String> {
            (pod == "ztunnel-crashed").then(|| "it handed over to this one".to_owned())
        }

        fn pods(&self) -> Vec<String> {
            vec!["default/a".to_owned()]
        }

        fn listeners(&self, netns_id: (u64, u64)) -> Option<Vec<(SocketAddr, OwnedFd)>> {
            if netns_id != self.netns {
                return None;
            }
            let l = self.listeners.lock().expect("lock");
            Some(
                l.iter()
                    .map(|l| {
                        let fd = OwnedFd::from(l.try_clone().expect("dup"));
                        (l.local_addr().expect("addr"), fd)
                    })
                    .collect(),
            )
        }

        fn stop_accepting(&self) -> usize {
            self.listeners.lock().expect("lock").clear();
            *self.stopped.lock().expect("lock") = Some(1);
            1
        }

        fn drain(&self) {}

        fn successor_gone(&self) {}

        fn count(&self, result: &'static str) {
            self.results.lock().expect("lock").push(result);
        }
    }

    fn listener() -> std::net::TcpListener {
        std::net::TcpListener::bind(("127.0.0.1", 0)).expect("bind")
    }

    #[test]
    fn a_successor_takes_a_pods_listening_sockets_then_the_predecessor_stops() {
        let (hbone, outbound) = (listener(), listener());
        let addrs = [
            hbone.local_addr().expect("a"),
            outbound.local_addr().expect("a"),
        ];
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("handover.sock");
        let fake = Arc::new(Fake {
            netns: (7, 42),
            listeners: Mutex::new(vec![hbone, outbound]),
            stopped: Mutex::default(),
            results: Mutex::default(),
        });
        serve(&path, fake.clone()).expect("serve");

        let refused = Predecessor::connect(&path, "ztunnel-crashed").expect_err("refused");
        assert!(
            refused.to_string().contains("handed over to this one"),
            "{refused}"
        );
        let mut p = Predecessor::connect(&path, "ztunnel-new")
            .expect("connect")
            .expect("a predecessor answers");
        assert_eq!(p.pid, std::process::id());
        assert_eq!(p.pod, "ztunnel-old");
        // The pods it serves, for the successor to check it covers them.
        assert_eq!(p.pods().expect("pods"), Some(vec!["default/a".to_owned()]));
        assert!(
            p.take("default/x", (7, 43), None, &addrs)
                .expect("take")
                .is_empty()
        );
        // An address the successor does not expect is refused, with the reason.
        let err = p
            .take("default/a", (7, 42), None, &addrs[..1])
            .expect_err("unexpected address");
        assert!(err.to_string().contains(&addrs[1].to_string()), "{err}");
        // A socket from another netns than the pod's is refused.
        let err = p
            .take("default/a", (7, 42), Some(1), &addrs)
            .expect_err("another netns");
        assert!(err.to_string().contains("netns cookie"), "{err}");
        let taken = p.take("default/a", (7, 42), None, &addrs).expect("take");
        let got: Vec<SocketAddr> = taken.iter().map(|(a, _)| *a).collect();
        assert_eq!(got, addrs);
        // The very socket: a connection to it is accepted through the inherited one.
        let _client = std::net::TcpStream::connect(addrs[0]).expect("connect");
        taken[0].1.set_nonblocking(false).expect("blocking");
        taken[0]
            .1
            .accept()
            .expect("accepted on the inherited socket");
        assert_eq!(p.finish().expect("finish"), 1);
        assert_eq!(*fake.stopped.lock().expect("lock"), Some(1));
        // The server thread counts after answering: the refusal is counted by now, the
        // completed handover maybe not yet.
        let deadline = Instant::now() + Duration::from_secs(10);
        while fake.results.lock().expect("lock").len() < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(*fake.results.lock().expect("lock"), ["refused", "complete"]);
        // Nobody takes over from a ztunnel that has handed over.
        assert!(Predecessor::connect(&path, "").expect("connect").is_none());
    }

    #[test]
    fn nothing_is_handed_out_or_stopped_before_a_hello() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("handover.sock");
        let l = listener();
        let addr = l.local_addr().expect("addr");
        let fake = Arc::new(Fake {
            netns: (7, 42),
            listeners: Mutex::new(vec![l]),
            stopped: Mutex::default(),
            results: Mutex::default(),
        });
        serve(&path, fake.clone()).expect("serve");
        for req in [
            Request::Done,
            Request::Take {
                pod: "default/a".to_owned(),
                netns: (7, 42),
            },
        ] {
            let fd = seqpacket().expect("socket");
            socket::connect(fd.as_raw_fd(), &UnixAddr::new(&path).expect("addr")).expect("connect");
            send(fd.as_fd(), &req, &[]).expect("send");
            // The predecessor hangs up without an answer.
            assert!(matches!(recv::<Reply>(fd.as_fd()), Err(Error::Closed)));
        }
        assert_eq!(
            *fake.stopped.lock().expect("lock"),
            None,
            "stopped without a hello"
        );
        // A successor that says hello is still served.
        let mut p = Predecessor::connect(&path, "ztunnel-new")
            .expect("connect")
            .expect("a predecessor answers");
        let taken = p.take("default/a", (7, 42), None, &[addr]).expect("take");
        assert_eq!(taken.len(), 1);
    }

    #[test]
    fn pong_decodes_with_and_without_the_pod_list() {
        // An older predecessor's pong has no list; an older successor ignores it.
        let old: Reply = serde_json::from_str(r#"{"op":"pong"}"#).expect("old pong");
        assert!(matches!(old, Reply::Pong { pods: None }));
        let new = serde_json::to_string(&Reply::Pong {
            pods: Some(vec!["default/a".to_owned()]),
        })
        .expect("encode");
        assert_eq!(new, r#"{"op":"pong","pods":["default/a"]}"#);
        #[derive(Deserialize)]
        #[serde(tag = "op", rename_all = "snake_case")]
        enum OldReply {
            Pong,
        }
        assert!(matches!(
            serde_json::from_str::<OldReply>(&new).expect("an older successor reads it"),
            OldReply::Pong
        ));
    }

    #[test]
    fn no_predecessor_when_nobody_serves_the_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("handover.sock");
        assert!(Predecessor::connect(&path, "").expect("connect").is_none());
        // A socket file left by a ztunnel that crashed.
        let fd = seqpacket().expect("socket");
        socket::bind(fd.as_raw_fd(), &UnixAddr::new(&path).expect("addr")).expect("bind");
        drop(fd);
        assert!(Predecessor::connect(&path, "").expect("connect").is_none());
    }
}
