//! Moving bytes between an HBONE tunnel and a plain socket (the application's connection
//! on the client side, the connection to the destination pod on the server side).
//!
//! Tunnel → socket takes DATA frames from h2 as they arrived and writes them out without
//! an intermediate buffer. Socket → tunnel reads into a buffer that grows 1 KiB → 16 KiB
//! → 256 KiB while reads keep filling it and shrinks back when traffic gets thin (Istio's
//! buffers only grow, `HBONE.md`, "Copying"); what was read is handed to h2 without a
//! copy. At the smallest size reads land in a per-thread scratch buffer and leave as exact
//! copies: an idle tunnel holds no read buffer at all.

use std::{
    cell::RefCell,
    future::poll_fn,
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};

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
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut socket_read, mut socket_write) = tokio::io::split(socket);
    let (recv, send) = tunnel.split_mut();

    let tunnel_to_socket = async {
        let mut total = 0u64;
        while let Some(chunk) = recv.chunk().await? {
            total += chunk.len() as u64;
            socket_write.write_all(&chunk).await?;
            // A no-op for TCP; pushes out records when the socket is TLS.
            socket_write.flush().await?;
        }
        socket_write.shutdown().await?;
        Ok::<_, io::Error>(total)
    };

    let socket_to_tunnel = async {
        let mut total = 0u64;
        let mut buf = ReadBuffer::default();
        loop {
            let read = poll_fn(|cx| buf.poll_read(Pin::new(&mut socket_read), cx));
            // The peer resetting the tunnel must end this direction even while the
            // socket has nothing to say.
            let chunk = tokio::select! {
                read = read => read?,
                reset = peer_reset(send) => return reset.map(|()| total),
            };
            if chunk.is_empty() {
                break;
            }
            total += chunk.len() as u64;
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

    /// Reads what the socket has: at the smallest size into this thread's scratch buffer,
    /// leaving as an exact copy (so an idle tunnel holds no buffer, and a small read
    /// leaves no 1 KiB allocation behind in the heap), larger into the growing buffer,
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
