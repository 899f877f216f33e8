//! Moving bytes between an HBONE tunnel and a plain socket (the application's connection
//! on the client side, the connection to the destination pod on the server side).
//!
//! Tunnel → socket takes DATA frames from h2 as they arrived and writes them out without
//! an intermediate buffer. Socket → tunnel reads into a buffer that grows 1 KiB → 16 KiB
//! → 256 KiB while reads keep filling it and shrinks back when traffic gets thin (Istio's
//! buffers only grow, `HBONE.md`, "Copying"); what was read is handed to h2 without a
//! copy. At the smallest size the buffer is given up after each read and taken again
//! only once the socket is readable: an idle tunnel holds no read buffer at all.

use std::{
    future::poll_fn,
    io,
    pin::Pin,
    sync::Mutex,
    task::{Context, Poll},
};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};

use super::stream::H2Stream;

/// Bytes moved by [`copy_bidirectional`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transferred {
    /// Received from the peer through the tunnel and written to the socket.
    pub tunnel_to_socket: u64,
    /// Read from the socket and sent to the peer through the tunnel.
    pub socket_to_tunnel: u64,
}

/// A socket that can say it has something to read before a buffer is handed to it.
pub trait ReadReady {
    /// Ready once a read would find data, EOF or an error (it may be spurious: the read
    /// then waits as usual).
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl ReadReady for tokio::net::TcpStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        tokio::net::TcpStream::poll_read_ready(self, cx)
    }
}

impl<T: ReadReady> ReadReady for &mut T {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        (**self).poll_read_ready(cx)
    }
}

/// In-memory pipes (tests) have no readiness of their own: the read is just tried.
impl ReadReady for tokio::io::DuplexStream {
    fn poll_read_ready(&self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

const BUFFER_SIZES: [usize; 3] = [1024, 16 * 1024, 256 * 1024];
/// Reads this many times smaller than the current size count as "thin traffic".
const SHRINK_RATIO: usize = 8;
/// Consecutive thin reads before stepping the size down.
const SHRINK_AFTER: u8 = 4;

/// Copies both ways until both sides have finished, passing half-closes along: the
/// peer's END_STREAM shuts down the socket's write side, the socket's EOF sends
/// END_STREAM. An error in either direction ends both; dropping the tunnel afterwards
/// resets it.
pub async fn copy_bidirectional<S>(tunnel: &mut H2Stream, socket: S) -> io::Result<Transferred>
where
    S: AsyncRead + AsyncWrite + ReadReady + Unpin,
{
    // Both directions poll the one socket from this task, each under the (never
    // contended) lock for the length of a poll: no split halves hiding its readiness.
    let socket = Mutex::new(socket);
    let (recv, send) = tunnel.split_mut();

    let tunnel_to_socket = async {
        let mut total = 0u64;
        while let Some(chunk) = recv.chunk().await? {
            total += chunk.len() as u64;
            let mut written = 0;
            while written < chunk.len() {
                let n =
                    poll_fn(|cx| locked(&socket, cx, |s, cx| s.poll_write(cx, &chunk[written..])))
                        .await?;
                if n == 0 {
                    return Err(io::ErrorKind::WriteZero.into());
                }
                written += n;
            }
            // A no-op for TCP; pushes out records when the socket is TLS.
            poll_fn(|cx| locked(&socket, cx, |s, cx| s.poll_flush(cx))).await?;
        }
        poll_fn(|cx| locked(&socket, cx, |s, cx| s.poll_shutdown(cx))).await?;
        Ok::<_, io::Error>(total)
    };

    let socket_to_tunnel = async {
        let mut total = 0u64;
        let mut buf = ReadBuffer::default();
        loop {
            if buf.bytes.capacity() == 0 {
                let ready = poll_fn(|cx| {
                    let s = socket.lock().unwrap_or_else(|p| p.into_inner());
                    s.poll_read_ready(cx)
                });
                // The peer resetting the tunnel must end this direction even while the
                // socket has nothing to say.
                tokio::select! {
                    ready = ready => ready?,
                    reset = peer_reset(send) => return reset.map(|()| total),
                }
            }
            let spare = buf.prepare();
            let read = poll_fn(|cx| {
                locked(&socket, cx, |s, cx| {
                    tokio_util::io::poll_read_buf(s, cx, &mut buf.bytes)
                })
            });
            let n = tokio::select! {
                read = read => read?,
                reset = peer_reset(send) => return reset.map(|()| total),
            };
            if n == 0 {
                break;
            }
            total += n as u64;
            let chunk = buf.take(n, spare);
            send.send_bytes(chunk).await?;
        }
        send.end().await?;
        Ok(total)
    };

    let (tunnel_to_socket, socket_to_tunnel) =
        tokio::try_join!(tunnel_to_socket, socket_to_tunnel)?;
    Ok(Transferred {
        tunnel_to_socket,
        socket_to_tunnel,
    })
}

/// Polls the socket under its lock (see [`copy_bidirectional`]).
fn locked<S: Unpin, T>(
    socket: &Mutex<S>,
    cx: &mut Context<'_>,
    f: impl FnOnce(Pin<&mut S>, &mut Context<'_>) -> Poll<T>,
) -> Poll<T> {
    let mut s = socket.lock().unwrap_or_else(|p| p.into_inner());
    f(Pin::new(&mut *s), cx)
}

/// Waits for the peer to reset the tunnel: `Ok` for a plain cancel, the error otherwise.
async fn peer_reset(send: &mut super::stream::SendHalf) -> io::Result<()> {
    match send.reset().await {
        Ok(reason) if reason == h2::Reason::NO_ERROR || reason == h2::Reason::CANCEL => Ok(()),
        Ok(reason) => Err(super::stream::h2_to_io(reason.into())),
        Err(e) => Err(super::stream::h2_to_io(e)),
    }
}

/// The socket → tunnel read buffer and its sizing policy.
#[derive(Default)]
struct ReadBuffer {
    bytes: BytesMut,
    level: usize,
    thin_reads: u8,
}

impl ReadBuffer {
    /// Makes room for the next read and returns how much room there is.
    fn prepare(&mut self) -> usize {
        let want = BUFFER_SIZES[self.level];
        if self.bytes.capacity() < want {
            // Reuses the allocation when h2 has already written out the last chunk.
            self.bytes.reserve(want);
        }
        self.bytes.capacity() - self.bytes.len()
    }

    /// Takes the `n` bytes just read out of a buffer that had `room` free, and adjusts
    /// the size of the next read.
    fn take(&mut self, n: usize, room: usize) -> bytes::Bytes {
        let size = BUFFER_SIZES[self.level];
        if n >= room && self.level + 1 < BUFFER_SIZES.len() {
            // The socket had at least as much as we could take: bigger reads mean fewer
            // syscalls per megabyte.
            self.level += 1;
            self.thin_reads = 0;
        } else if n * SHRINK_RATIO < size && self.level > 0 {
            self.thin_reads += 1;
            if self.thin_reads >= SHRINK_AFTER {
                self.level -= 1;
                self.thin_reads = 0;
                let chunk = self.bytes.split().freeze();
                // Drop the large allocation's tail so an idle tunnel keeps little memory.
                self.bytes = BytesMut::new();
                return chunk;
            }
        } else {
            self.thin_reads = 0;
        }
        if self.level == 0 {
            // Smallest size: the read is all h2 gets, and nothing stays allocated here
            // until the socket is readable again.
            return std::mem::take(&mut self.bytes).freeze();
        }
        self.bytes.split().freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_the_smallest_size_nothing_stays_allocated_between_reads() {
        let mut b = ReadBuffer::default();
        assert_eq!(b.bytes.capacity(), 0, "nothing before the first read");
        let room = b.prepare();
        b.bytes.extend_from_slice(b"hello");
        let chunk = b.take(5, room);
        assert_eq!(&chunk[..], b"hello");
        assert_eq!(b.bytes.capacity(), 0, "the buffer went with the chunk");
        assert_eq!(b.level, 0);
    }

    #[test]
    fn buffer_grows_on_full_reads_and_shrinks_on_thin_ones() {
        let mut b = ReadBuffer::default();
        assert!(b.prepare() >= 1024);
        b.bytes.resize(1024, 0);
        b.take(1024, 1024);
        assert!(b.prepare() >= 16 * 1024);
        let room = b.prepare();
        b.bytes.resize(room, 0);
        b.take(room, room);
        assert!(b.prepare() >= 256 * 1024);
        for _ in 0..SHRINK_AFTER {
            b.prepare();
            b.bytes.resize(10, 0);
            b.take(10, 256 * 1024);
        }
        assert_eq!(b.level, 1);
        assert!(b.bytes.capacity() < 256 * 1024);
    }
}
