//! [`H2Stream`]: one HBONE tunnel (an HTTP/2 CONNECT stream after its 200) as a byte
//! stream, with HTTP/2 flow control mapped onto `AsyncRead`/`AsyncWrite`.
//!
//! - Reading hands out DATA as it arrives and gives the window back only once the bytes
//!   were taken by the reader, so a slow reader slows the peer down.
//! - Writing asks h2 for send capacity first and only hands it as much as was granted, so
//!   h2 never buffers more than the flow-control window allows.
//! - `poll_shutdown` ends our half (END_STREAM); the peer's END_STREAM reads as EOF, and
//!   so does RST_STREAM with CANCEL or NO_ERROR (`HBONE.md`, "HTTP/2").
//! - Dropping a stream that is not finished both ways resets it with CANCEL.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Kept alive as long as the stream, e.g. to count the stream against its connection.
pub(crate) type Guard = Box<dyn Send + Sync>;

/// An HBONE tunnel. Used by both sides: the server wraps the stream it answered with
/// 200, the pool hands one out for each successful CONNECT.
pub struct H2Stream {
    recv: RecvHalf,
    send: SendHalf,
    _guard: Option<Guard>,
}

impl H2Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        H2Stream {
            recv: RecvHalf {
                recv,
                chunk: Bytes::new(),
                eof: false,
            },
            send: SendHalf { send, ended: false },
            _guard: None,
        }
    }

    pub(crate) fn with_guard(mut self, guard: Guard) -> Self {
        self._guard = Some(guard);
        self
    }

    /// The HTTP/2 stream id, for logs.
    pub fn stream_id(&self) -> u32 {
        self.send.send.stream_id().as_u32()
    }

    /// Both directions at once, so one task can read and write concurrently.
    pub fn split_mut(&mut self) -> (&mut RecvHalf, &mut SendHalf) {
        (&mut self.recv, &mut self.send)
    }
}

impl Drop for H2Stream {
    fn drop(&mut self) {
        if !(self.recv.eof && self.send.ended) {
            // Tells the peer we are gone instead of leaving its half open; h2 ignores
            // this if the stream is already closed.
            self.send.send.send_reset(Reason::CANCEL);
        }
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.recv).poll_read(cx, buf)
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.send).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.send).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.send).poll_shutdown(cx)
    }
}

/// The receiving half of an [`H2Stream`].
pub struct RecvHalf {
    recv: RecvStream,
    /// Received but not yet consumed; its window has not been released yet.
    chunk: Bytes,
    eof: bool,
}

impl RecvHalf {
    /// Makes sure `chunk` holds data; `false` at end of stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        while self.chunk.is_empty() {
            if self.eof {
                return Poll::Ready(Ok(false));
            }
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => self.chunk = data,
                None => self.eof = true,
                Some(Err(e)) if is_graceful_reset(&e) => self.eof = true,
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
            }
        }
        Poll::Ready(Ok(true))
    }

    fn release(&mut self, n: usize) -> io::Result<()> {
        self.recv
            .flow_control()
            .release_capacity(n)
            .map_err(h2_to_io)
    }

    /// The next piece of data as received, without copying; `None` at end of stream.
    pub fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        if !ready!(self.poll_fill(cx))? {
            return Poll::Ready(Ok(None));
        }
        let chunk = std::mem::take(&mut self.chunk);
        self.release(chunk.len())?;
        Poll::Ready(Ok(Some(chunk)))
    }
}

impl AsyncRead for RecvHalf {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if buf.remaining() == 0 || !ready!(self.poll_fill(cx))? {
            return Poll::Ready(Ok(()));
        }
        let n = buf.remaining().min(self.chunk.len());
        buf.put_slice(&self.chunk[..n]);
        self.chunk.advance(n);
        Poll::Ready(self.release(n))
    }
}

/// The sending half of an [`H2Stream`].
pub struct SendHalf {
    send: SendStream<Bytes>,
    /// END_STREAM was sent (or the stream can no longer send).
    ended: bool,
}

impl SendHalf {
    /// Waits until h2 grants send capacity and returns how much of `want` may be sent.
    fn poll_capacity(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        if self.ended {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "hbone stream was already shut down for writing",
            )));
        }
        // h2 holds capacity in a u32 and never grants more than the connection window.
        let want = want.min(super::CONNECTION_WINDOW as usize);
        // Capacity requests are totals, not increments, so asking again is harmless.
        self.send.reserve_capacity(want);
        loop {
            let granted = self.send.capacity();
            if granted > 0 {
                return Poll::Ready(Ok(granted.min(want)));
            }
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                None => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "hbone stream was closed by the peer",
                    )));
                }
            }
        }
    }

    /// Sends `data` without copying it, in pieces as large as flow control allows (taking
    /// them off its front); ready once all of it is sent.
    pub fn poll_send(&mut self, cx: &mut Context<'_>, data: &mut Bytes) -> Poll<io::Result<()>> {
        while !data.is_empty() {
            let n = ready!(self.poll_capacity(cx, data.len()))?;
            self.send
                .send_data(data.split_to(n), false)
                .map_err(h2_to_io)?;
        }
        Poll::Ready(Ok(()))
    }

    /// Sends END_STREAM: we will write no more, the peer may still send.
    pub fn poll_end(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.ended {
            return Poll::Ready(Ok(()));
        }
        self.ended = true;
        let Err(e) = self.send.send_data(Bytes::new(), true) else {
            return Poll::Ready(Ok(()));
        };
        // The stream can no longer send; only a reset the peer meant as a normal end is
        // not an error.
        match self.send.poll_reset(cx) {
            Poll::Ready(Ok(reason)) if is_graceful(reason) => Poll::Ready(Ok(())),
            Poll::Ready(Ok(reason)) => Poll::Ready(Err(h2_to_io(reason.into()))),
            Poll::Ready(Err(e)) => Poll::Ready(Err(h2_to_io(e))),
            Poll::Pending => Poll::Ready(Err(h2_to_io(e))),
        }
    }

    /// Resolves when the peer resets the stream; never while it is open. Lets a copy
    /// that is waiting on the other side notice the tunnel is gone.
    pub async fn reset(&mut self) -> Result<Reason, h2::Error> {
        poll_fn(|cx| self.send.poll_reset(cx)).await
    }

    /// Resets the stream with `reason`, as a peer would.
    #[cfg(test)]
    pub(crate) fn send_reset(&mut self, reason: Reason) {
        self.send.send_reset(reason);
    }

    /// Ready when the peer has reset the stream: `Ok` for a normal end (CANCEL or
    /// NO_ERROR), the error otherwise. Pending registers the task in h2's one waker slot
    /// for "send capacity or reset" (see `copy::copy_bidirectional` for what that costs).
    pub fn poll_peer_reset(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(match ready!(self.send.poll_reset(cx)) {
            Ok(reason) if is_graceful(reason) => Ok(()),
            Ok(reason) => Err(h2_to_io(reason.into())),
            Err(e) => Err(h2_to_io(e)),
        })
    }
}

impl AsyncWrite for SendHalf {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = ready!(self.poll_capacity(cx, buf.len()))?;
        self.send
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(h2_to_io)?;
        Poll::Ready(Ok(n))
    }

    /// The connection task writes out whatever h2 has buffered; nothing to wait for here.
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_end(cx)
    }
}

fn is_graceful(reason: Reason) -> bool {
    reason == Reason::NO_ERROR || reason == Reason::CANCEL
}

/// RST_STREAM with CANCEL or NO_ERROR is the peer ending the stream, not failing it.
fn is_graceful_reset(e: &h2::Error) -> bool {
    e.is_reset() && e.reason().is_some_and(is_graceful)
}

pub(crate) fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        match e.into_io() {
            Some(io) => io,
            None => io::Error::other("hbone connection failed"),
        }
    } else {
        io::Error::other(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair() -> (H2Stream, H2Stream, Vec<tokio::task::JoinHandle<()>>) {
        crate::hbone::test_wire::stream_pair(64 * 1024).await
    }

    #[tokio::test]
    async fn half_close_reads_as_eof_and_other_side_keeps_writing() {
        let (mut c, mut s, _drivers) = pair().await;
        c.write_all(b"ping").await.expect("write");
        c.shutdown().await.expect("shutdown");
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.expect("read to eof");
        assert_eq!(got, b"ping");
        s.write_all(b"pong")
            .await
            .expect("write after peer half-close");
        s.shutdown().await.expect("shutdown");
        let mut got = Vec::new();
        c.read_to_end(&mut got).await.expect("read to eof");
        assert_eq!(got, b"pong");
    }

    #[tokio::test]
    async fn writes_beyond_the_window_wait_for_the_reader() {
        let (mut c, mut s, _drivers) = pair().await;
        // Larger than h2's default 64 KiB windows used by `pair`, so it only completes
        // if the reader's releases reopen the window.
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let expected = data.clone();
        let writer = tokio::spawn(async move {
            c.write_all(&data).await.expect("write");
            c.shutdown().await.expect("shutdown");
            c
        });
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.expect("read");
        assert!(got == expected, "data differs");
        let _c = writer.await.expect("writer");
    }

    #[tokio::test]
    async fn reset_with_cancel_or_no_error_reads_as_eof() {
        for reason in [Reason::CANCEL, Reason::NO_ERROR] {
            let (mut c, mut s, _drivers) = pair().await;
            c.write_all(b"last words").await.expect("write");
            // Let the data go out before the reset overtakes it in h2's queue.
            let mut one = [0u8; 10];
            s.read_exact(&mut one).await.expect("read data");
            c.send.send.send_reset(reason);
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).await.expect("reset reads as eof");
            assert!(rest.is_empty());
        }
    }

    #[tokio::test]
    async fn reset_with_an_error_code_is_an_error() {
        let (c, mut s, _drivers) = pair().await;
        let mut c = c;
        c.send.send.send_reset(Reason::INTERNAL_ERROR);
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.expect_err("error reset");
    }

    #[tokio::test]
    async fn dropping_an_unfinished_stream_resets_it() {
        let (c, mut s, _drivers) = pair().await;
        drop(c);
        let mut buf = Vec::new();
        // CANCEL reads as EOF on the other side...
        s.read_to_end(&mut buf).await.expect("eof");
        // ...and the send half learns the stream is gone.
        let reason = s.send.reset().await.expect("reset reason");
        assert_eq!(reason, Reason::CANCEL);
    }
}
