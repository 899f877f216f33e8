//! Network namespaces: opening a pod's netns, running a closure inside it on the current
//! thread (for sockets that must live there), and its cookie.
use std::{
    fs::File,
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
};

use nix::sched::{CloneFlags, setns};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to open network namespace {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to stat network namespace {path}")]
    Stat {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to enter network namespace {path}")]
    Enter {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("failed to run `{command}` in network namespace {path}: {detail}")]
    Command {
        path: PathBuf,
        command: String,
        detail: String,
    },
    #[error("failed to read the cookie of network namespace {path}")]
    Cookie {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// An open network namespace. Holding it keeps the namespace alive.
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
}

impl Netns {
    pub fn open(path: &Path) -> Result<Self, Error> {
        let file = File::open(path).map_err(|source| Error::Open {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self {
            file,
            path: path.to_owned(),
        })
    }

    /// The namespace the calling thread is in now.
    pub fn current() -> Result<Self, Error> {
        Self::open(Path::new("/proc/thread-self/ns/net"))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Another handle on the same namespace (the descriptor duplicated).
    pub fn try_clone(&self) -> Result<Self, Error> {
        Ok(Self {
            file: self.file.try_clone().map_err(|source| Error::Open {
                path: self.path.clone(),
                source,
            })?,
            path: self.path.clone(),
        })
    }

    /// (device, inode) of the namespace: the same for every path that reaches it.
    pub fn id(&self) -> Result<(u64, u64), Error> {
        use std::os::unix::fs::MetadataExt as _;
        let m = self.file.metadata().map_err(|source| Error::Stat {
            path: self.path.clone(),
            source,
        })?;
        Ok((m.dev(), m.ino()))
    }

    /// Runs `f` inside this namespace on the current thread, then returns the thread to
    /// `home`. Sockets created by `f` stay in this namespace for their whole life.
    pub fn run<T>(&self, home: &Netns, f: impl FnOnce() -> T) -> Result<T, Error> {
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| Error::Enter {
            path: self.path.clone(),
            source,
        })?;
        let out = f();
        // Failing to return would leave this thread serving the wrong namespace; nothing
        // can recover from that, so stop loudly.
        #[expect(
            clippy::expect_used,
            reason = "a thread stuck in a pod netns is unrecoverable"
        )]
        setns(home.file.as_fd(), CloneFlags::CLONE_NEWNET)
            .expect("failed to return the thread to ztunnel's own network namespace");
        Ok(out)
    }

    /// Runs `f` inside this namespace on a new thread that never leaves it.
    pub fn run_on_thread<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, Error> {
        std::thread::scope(|s| {
            s.spawn(|| {
                setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| {
                    Error::Enter {
                        path: self.path.clone(),
                        source,
                    }
                })?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Runs a command (e.g. `ip rule …`) with this namespace as its network namespace.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String, Error> {
        self.exec_with_input(program, args, None)
    }

    /// [`Netns::exec`] with `input` on the command's standard input (e.g. a ruleset for
    /// `iptables-restore`).
    pub fn exec_with_input(
        &self,
        program: &str,
        args: &[&str],
        input: Option<&[u8]>,
    ) -> Result<String, Error> {
        use std::{io::Write as _, os::unix::process::CommandExt as _, process::Stdio};
        let command = format!("{program} {}", args.join(" "));
        let fd = self.file.as_raw_fd();
        let mut cmd = std::process::Command::new(program);
        cmd.args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: only setns (async-signal-safe) on a descriptor opened before fork.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let failed = |detail: String| Error::Command {
            path: self.path.clone(),
            command: command.clone(),
            detail,
        };
        let mut child = cmd.spawn().map_err(|e| failed(e.to_string()))?;
        // stdin is dropped once written: the command sees the end of its input. A failed
        // write (the command exited early) is reported after the command is reaped.
        let wrote = match (input, child.stdin.take()) {
            (Some(input), Some(mut stdin)) => stdin.write_all(input),
            _ => Ok(()),
        };
        let out = child
            .wait_with_output()
            .map_err(|e| failed(e.to_string()))?;
        if !out.status.success() {
            return Err(failed(
                String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            ));
        }
        wrote.map_err(|e| failed(format!("writing its input: {e}")))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Writes a per-namespace sysctl such as `net/ipv4/tcp_fwmark_accept`, returning the
    /// previous value. `/proc/sys/net` shows the namespace of the thread that opens it.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<String, Error> {
        let path = PathBuf::from("/proc/sys").join(key);
        let err = |e: std::io::Error| Error::Command {
            path: self.path.clone(),
            command: format!("sysctl {key}={value}"),
            detail: e.to_string(),
        };
        self.run_on_thread(|| -> std::io::Result<String> {
            let old = std::fs::read_to_string(&path)?;
            std::fs::write(&path, value)?;
            Ok(old.trim().to_owned())
        })?
        .map_err(err)
    }

    /// The kernel's cookie for this namespace (`SO_NETNS_COOKIE`, Linux >= 5.14); the
    /// eBPF programs key per-pod state by it.
    pub fn cookie(&self, home: &Netns) -> Result<u64, Error> {
        let cookie_err = |source| Error::Cookie {
            path: self.path.clone(),
            source,
        };
        let sock = self
            .run(home, || {
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)
            })?
            .map_err(cookie_err)?;
        let mut cookie: u64 = 0;
        let mut len = size_of::<u64>() as libc::socklen_t;
        // SAFETY: valid socket fd, and a buffer of the size we pass.
        let rc = unsafe {
            libc::getsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_NETNS_COOKIE,
                (&raw mut cookie).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(cookie_err(std::io::Error::last_os_error()));
        }
        Ok(cookie)
    }
}

/// The cookie of the netns a socket lives in (`SO_NETNS_COOKIE`); `None` on kernels
/// without it (before 5.14).
pub fn socket_cookie(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<Option<u64>> {
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid socket descriptor and a buffer of the size passed.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        return Ok(Some(cookie));
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENOPROTOOPT) {
        Ok(None)
    } else {
        Err(e)
    }
}
