//! Moving bytes between an HBONE tunnel and a plain socket (the application's connection
//! on the client side, the connection to the destination pod on the server side).
//!
//! Tunnel → socket takes DATA frames from h2 as they arrived and writes them out without
//! an intermediate buffer. Socket → tunnel reads go into a per-thread 16 KiB scratch
//! buffer and leave as exact copies, so an idle tunnel holds no read buffer at all; once
//! a read fills the scratch, into a 256 KiB buffer of the connection's own, handed to h2
//! without a copy, until traffic gets thin again (Istio's buffers only grow, `HBONE.md`,
//! "Copying"). The scratch is larger than a typical message so that a read of a whole
//! message does not fill it: tokio then knows the socket is drained and does not try
//! another read that would only say `EAGAIN` (a 1 KiB scratch cost one such `recvfrom`
//! every few 1 KiB messages).

use std::{
    cell::RefCell,
    future::Future,
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf as _, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::stream::H2Stream;

/// Bytes moved by [`copy_bidirectional`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transferred {
    /// Received from the peer through the tunnel and written to the socket.
    pub tunnel_to_socket: u64,
    /// Read from the socket and sent to the peer through the tunnel.
    pub socket_to_tunnel: u64,
}

thread_local! {
    /// Where the smallest reads land before they leave as exact copies (see
    /// [`ReadBuffer::poll_read`]): one per worker thread, not one per connection.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; BUFFER_SIZES[0]]);
}

/// The scratch buffer's size, then the connection's own buffer's.
const BUFFER_SIZES: [usize; 2] = [16 * 1024, 256 * 1024];
/// Reads this many times smaller than the current size count as "thin traffic".
const SHRINK_RATIO: usize = 8;
/// Consecutive thin reads before stepping the size down.
const SHRINK_AFTER: u8 = 4;

/// Copies both ways until both sides have finished, passing half-closes along: the
/// peer's END_STREAM shuts down the socket's write side, the socket's EOF sends
/// END_STREAM. An error in either direction ends both; dropping the tunnel afterwards
/// resets it.
///
/// A peer's reset must end the copy even while the socket has nothing to say. While the
/// tunnel → socket direction waits on h2 for data, a reset reaches it there (as EOF or an
/// error). Only while that direction is elsewhere — writing to a socket that does not
/// take the data, or finished after the peer's END_STREAM — does the socket → tunnel
/// direction also watch for the reset on the send half. It does not watch all the time:
/// h2 keeps a single waker per stream for "send capacity or reset", and a task left
/// registered there is woken each time the connection task hands the stream capacity,
/// that is, after every message it sends: a second, useless wakeup of this task per
/// message that also pushed it onto tokio's shared run queue, waking the other worker
/// thread to steal it (ARCHITECTURE.md, "Performance": "Latency").
///
/// A hand-written future, not two `async` blocks joined: every idle tunnel's task holds
/// it for the connection's life, and the joined blocks kept room for each of their
/// awaits (560 bytes, and a heap-allocated lock to split the socket in two); this holds
/// the two directions' states side by side and uses the socket in turn.
pub fn copy_bidirectional<S>(tunnel: &mut H2Stream, socket: S) -> CopyBidirectional<'_, S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    CopyBidirectional {
        tunnel,
        socket,
        down: TunnelToSocket::Receiving,
        up: SocketToTunnel::Reading,
        buf: ReadBuffer::default(),
        moved: Transferred::default(),
        watch_reset: false,
    }
}

/// The future [`copy_bidirectional`] returns.
pub struct CopyBidirectional<'a, S> {
    tunnel: &'a mut H2Stream,
    socket: S,
    down: TunnelToSocket,
    up: SocketToTunnel,
    buf: ReadBuffer,
    moved: Transferred,
    /// The tunnel → socket direction is not waiting on h2, so a reset would not reach
    /// it: the other direction watches for one.
    watch_reset: bool,
}

/// Tunnel → socket.
enum TunnelToSocket {
    /// Waiting on h2 for the next chunk.
    Receiving,
    /// Writing a chunk (what is left of it), then flushing.
    Writing {
        rest: Bytes,
        flushed: bool,
    },
    /// The peer's END_STREAM arrived: shutting down the socket's write side.
    Shutdown,
    Done,
}

/// Socket → tunnel.
enum SocketToTunnel {
    Reading,
    /// Sending a chunk (what is left of it) as flow control allows.
    Sending(Bytes),
    /// The socket's EOF: sending END_STREAM.
    Ending,
    Done,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Future for CopyBidirectional<'_, S> {
    type Output = io::Result<Transferred>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        // Tunnel → socket first: where it stops tells the other direction whether to
        // watch for a reset, in this same poll.
        this.poll_down(cx)?;
        this.poll_up(cx)?;
        if matches!(
            (&this.down, &this.up),
            (TunnelToSocket::Done, SocketToTunnel::Done)
        ) {
            Poll::Ready(Ok(this.moved))
        } else {
            Poll::Pending
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> CopyBidirectional<'_, S> {
    /// Moves the tunnel → socket direction on as far as it goes; an error ends the copy.
    fn poll_down(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        loop {
            match &mut self.down {
                TunnelToSocket::Receiving => match self.tunnel.split_mut().0.poll_chunk(cx)? {
                    Poll::Ready(Some(chunk)) => {
                        self.moved.tunnel_to_socket += chunk.len() as u64;
                        self.down = TunnelToSocket::Writing {
                            rest: chunk,
                            flushed: false,
                        };
                    }
                    Poll::Ready(None) => {
                        // The tunnel's receiving side is done: a reset can only come
                        // through the send half from now on.
                        self.watch_reset = true;
                        self.down = TunnelToSocket::Shutdown;
                    }
                    Poll::Pending => return Ok(()),
                },
                // While the socket does not take the data, a reset would not reach this
                // direction: the other one watches for it.
                TunnelToSocket::Writing { rest, flushed } => {
                    let socket = Pin::new(&mut self.socket);
                    if !rest.is_empty() {
                        match socket.poll_write(cx, rest) {
                            Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                            Poll::Ready(Ok(n)) => rest.advance(n),
                            Poll::Ready(Err(e)) => return Err(e),
                            Poll::Pending => {
                                self.watch_reset = true;
                                return Ok(());
                            }
                        }
                    } else if !*flushed {
                        // A no-op for TCP; pushes out records when the socket is TLS.
                        match socket.poll_flush(cx) {
                            Poll::Ready(Ok(())) => *flushed = true,
                            Poll::Ready(Err(e)) => return Err(e),
                            Poll::Pending => {
                                self.watch_reset = true;
                                return Ok(());
                            }
                        }
                    } else {
                        self.watch_reset = false;
                        self.down = TunnelToSocket::Receiving;
                    }
                }
                TunnelToSocket::Shutdown => match Pin::new(&mut self.socket).poll_shutdown(cx) {
                    Poll::Ready(Ok(())) => self.down = TunnelToSocket::Done,
                    Poll::Ready(Err(e)) => return Err(e),
                    Poll::Pending => return Ok(()),
                },
                TunnelToSocket::Done => return Ok(()),
            }
        }
    }

    /// Moves the socket → tunnel direction on as far as it goes; an error ends the copy.
    fn poll_up(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        loop {
            match &mut self.up {
                SocketToTunnel::Reading => {
                    match self.buf.poll_read(Pin::new(&mut self.socket), cx)? {
                        Poll::Ready(chunk) if chunk.is_empty() => self.up = SocketToTunnel::Ending,
                        Poll::Ready(chunk) => {
                            self.moved.socket_to_tunnel += chunk.len() as u64;
                            self.up = SocketToTunnel::Sending(chunk);
                        }
                        Poll::Pending if self.watch_reset => {
                            match self.tunnel.split_mut().1.poll_peer_reset(cx)? {
                                // Reset by the peer as a normal end.
                                Poll::Ready(()) => self.up = SocketToTunnel::Done,
                                Poll::Pending => return Ok(()),
                            }
                        }
                        Poll::Pending => return Ok(()),
                    }
                }
                SocketToTunnel::Sending(rest) => {
                    match self.tunnel.split_mut().1.poll_send(cx, rest)? {
                        Poll::Ready(()) => self.up = SocketToTunnel::Reading,
                        Poll::Pending => return Ok(()),
                    }
                }
                SocketToTunnel::Ending => match self.tunnel.split_mut().1.poll_end(cx)? {
                    Poll::Ready(()) => self.up = SocketToTunnel::Done,
                    Poll::Pending => return Ok(()),
                },
                SocketToTunnel::Done => return Ok(()),
            }
        }
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

    /// Reads what the socket has: at the smallest size into this thread's scratch buffer,
    /// leaving as an exact copy (so an idle tunnel holds no buffer, and a small read
    /// leaves no 16 KiB allocation behind in the heap), larger into the growing buffer,
    /// handed over without a copy. An empty chunk is EOF.
    fn poll_read<S: AsyncRead>(
        &mut self,
        socket: Pin<&mut S>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<Bytes>> {
        if self.level == 0 {
            return SCRATCH.with_borrow_mut(|scratch| {
                let mut read = ReadBuf::new(scratch);
                ready!(socket.poll_read(cx, &mut read))?;
                let chunk = Bytes::copy_from_slice(read.filled());
                self.adjust(chunk.len(), BUFFER_SIZES[0]);
                Poll::Ready(Ok(chunk))
            });
        }
        let room = self.prepare();
        let n = ready!(tokio_util::io::poll_read_buf(socket, cx, &mut self.bytes))?;
        Poll::Ready(Ok(self.take(n, room)))
    }

    /// Takes the `n` bytes just read out of a buffer that had `room` free, and adjusts
    /// the size of the next read.
    fn take(&mut self, n: usize, room: usize) -> Bytes {
        let shrunk = self.adjust(n, room);
        let chunk = self.bytes.split().freeze();
        if shrunk || self.level == 0 {
            // Drop the large allocation's tail (the smallest reads use the scratch).
            self.bytes = BytesMut::new();
        }
        chunk
    }

    /// Sizes the next read after one of `n` bytes into `room`; whether it shrank.
    fn adjust(&mut self, n: usize, room: usize) -> bool {
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
                return true;
            }
        } else {
            self.thin_reads = 0;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };
    use std::time::Duration;

    use std::future::poll_fn;

    use h2::Reason;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};

    use super::*;
    use crate::hbone::test_wire::stream_pair;

    /// Generous: only a copy that never ends takes this long.
    const ENDS_WITHIN: Duration = Duration::from_secs(20);

    /// Runs the copy for `tunnel` against a socket whose other end (the app's) is
    /// returned with the copy's task, counting how often the copy is polled.
    fn start_copy(
        mut tunnel: H2Stream,
        socket_buffer: usize,
    ) -> (
        DuplexStream,
        tokio::task::JoinHandle<io::Result<Transferred>>,
        Arc<AtomicUsize>,
    ) {
        let (app, proxy_side) = tokio::io::duplex(socket_buffer);
        let polls = Arc::new(AtomicUsize::new(0));
        let counted = polls.clone();
        let task = tokio::spawn(async move {
            let mut copy = std::pin::pin!(copy_bidirectional(&mut tunnel, proxy_side));
            poll_fn(|cx| {
                counted.fetch_add(1, Ordering::Relaxed);
                copy.as_mut().poll(cx)
            })
            .await
        });
        (app, task, polls)
    }

    async fn ended(
        task: tokio::task::JoinHandle<io::Result<Transferred>>,
    ) -> io::Result<Transferred> {
        tokio::time::timeout(ENDS_WITHIN, task)
            .await
            .expect("the copy ended after the peer's reset")
            .expect("copy task")
    }

    #[tokio::test]
    async fn a_peer_reset_ends_the_copy_while_the_socket_is_idle() {
        for (reason, graceful) in [(Reason::CANCEL, true), (Reason::INTERNAL_ERROR, false)] {
            let (mut peer, tunnel, _drivers) = stream_pair(64 * 1024).await;
            let (_app, task, _) = start_copy(tunnel, 64 * 1024);
            peer.split_mut().1.send_reset(reason);
            let result = ended(task).await;
            assert_eq!(result.is_ok(), graceful, "{reason:?}: {result:?}");
        }
    }

    #[tokio::test]
    async fn a_peer_reset_ends_the_copy_while_the_app_does_not_read() {
        let (mut peer, tunnel, _drivers) = stream_pair(64 * 1024).await;
        // The app reads nothing, so the tunnel → socket direction is stuck writing: the
        // reset can only be seen on the send half.
        let (_app, task, _) = start_copy(tunnel, 1024);
        peer.write_all(&[7u8; 32 * 1024])
            .await
            .expect("peer writes");
        tokio::time::sleep(Duration::from_millis(200)).await;
        peer.split_mut().1.send_reset(Reason::INTERNAL_ERROR);
        ended(task)
            .await
            .expect_err("an error reset fails the copy");
    }

    #[tokio::test]
    async fn a_peer_reset_after_its_end_stream_ends_the_copy() {
        let (mut peer, tunnel, _drivers) = stream_pair(64 * 1024).await;
        let (mut app, task, _) = start_copy(tunnel, 64 * 1024);
        peer.write_all(b"last").await.expect("peer writes");
        peer.shutdown().await.expect("peer's END_STREAM");
        let mut got = Vec::new();
        app.read_to_end(&mut got)
            .await
            .expect("the app reads the peer's half-close");
        assert_eq!(got, b"last");
        // The app keeps its side open; the peer gives up on it.
        peer.split_mut().1.send_reset(Reason::INTERNAL_ERROR);
        ended(task)
            .await
            .expect_err("an error reset fails the copy");
    }

    /// A request/response exchange polls the copy once per message: nothing wakes it
    /// besides the data. With the copy always registered for "send capacity or reset",
    /// h2 woke it once more after every message it sent: 3 polls per exchange, not 2.
    #[tokio::test]
    async fn request_response_polls_the_copy_once_per_message() {
        const EXCHANGES: usize = 200;
        let (mut peer, tunnel, _drivers) = stream_pair(64 * 1024).await;
        let (mut app, task, polls) = start_copy(tunnel, 64 * 1024);
        let request = [1u8; 1024];
        let mut buf = [0u8; 1024];
        // One exchange first: the copy's start is not what is measured.
        let mut exchange = async |app: &mut DuplexStream, peer: &mut H2Stream| {
            app.write_all(&request).await.expect("app writes");
            peer.read_exact(&mut buf).await.expect("peer reads");
            peer.write_all(&buf).await.expect("peer answers");
            app.read_exact(&mut buf)
                .await
                .expect("app reads the answer");
        };
        exchange(&mut app, &mut peer).await;
        let before = polls.load(Ordering::Relaxed);
        for _ in 0..EXCHANGES {
            exchange(&mut app, &mut peer).await;
        }
        let per_exchange = (polls.load(Ordering::Relaxed) - before) as f64 / EXCHANGES as f64;
        assert!(
            per_exchange <= 2.5,
            "{per_exchange} polls of the copy per request/response"
        );
        drop(app);
        peer.shutdown().await.expect("peer's END_STREAM");
        ended(task).await.expect("copy ends after both half-closes");
    }

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
        // A read that fills the scratch: the socket likely holds more.
        assert!(!b.adjust(BUFFER_SIZES[0], BUFFER_SIZES[0]));
        assert_eq!(b.level, 1);
        let room = b.prepare();
        assert!(room >= 256 * 1024);
        b.bytes.resize(room, 0);
        b.take(room, room);
        assert_eq!(b.level, 1, "the largest size stays");
        for _ in 0..SHRINK_AFTER {
            b.prepare();
            b.bytes.resize(10, 0);
            b.take(10, 256 * 1024);
        }
        assert_eq!(b.level, 0);
        assert_eq!(b.bytes.capacity(), 0, "back to the scratch");
    }

    #[test]
    fn a_whole_small_message_does_not_fill_the_scratch() {
        // tokio takes a read that filled its buffer as "maybe more", and reads again.
        let mut b = ReadBuffer::default();
        assert!(BUFFER_SIZES[0] > 4 * 1024);
        assert!(!b.adjust(1024, BUFFER_SIZES[0]));
        assert_eq!(b.level, 0);
    }
}
