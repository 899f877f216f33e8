//! Moving bytes between two plain TCP sockets (passthrough to a destination outside the
//! mesh, plaintext into a pod on :15006) without a buffer per connection: a direction
//! reads, when its socket is readable, into a per-worker-thread scratch buffer and writes
//! what it read straight on; only what the other socket does not take at once is kept, in
//! a buffer of exactly that size, until written. An idle connection holds no buffer (the
//! relay it replaced, tokio's `copy_bidirectional_with_sizes`, allocated 2 × 64 KiB per
//! connection up front).

use std::{cell::RefCell, io};

use tokio::net::TcpStream;

/// The scratch buffer's size: as much as one read takes.
const SCRATCH_SIZE: usize = 64 * 1024;

thread_local! {
    /// Where every direction on this worker thread reads into (see the module docs).
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; SCRATCH_SIZE]);
}

/// Copies both ways until both sides are done, shutting down each side's write half
/// when the other side's read half ends. Returns the bytes read from `a` and from `b`;
/// an error in either direction ends both.
pub async fn relay(a: &TcpStream, b: &TcpStream) -> io::Result<(u64, u64)> {
    tokio::try_join!(pump(a, b), pump(b, a))
}

/// What one read did.
enum Step {
    /// `from` had nothing after all (readiness was stale).
    Again,
    /// `from` ended.
    Eof,
    /// `n` bytes read; `rest` is what `to` did not take at once.
    Moved { n: usize, rest: Option<Vec<u8>> },
}

/// `from` → `to` until `from` ends, then shuts down `to`'s write side.
async fn pump(from: &TcpStream, to: &TcpStream) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        // Readiness and `try_read` take no part in tokio's cooperative budget: a direction
        // that always has data would otherwise never let its worker run other tasks.
        tokio::task::coop::consume_budget().await;
        from.readable().await?;
        let step = SCRATCH.with(|cell| -> io::Result<Step> {
            let mut buf = cell.borrow_mut();
            let n = match from.try_read(&mut buf) {
                Ok(0) => return Ok(Step::Eof),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Step::Again),
                Err(e) => return Err(e),
            };
            let mut written = 0;
            while written < n {
                match to.try_write(&buf[written..n]) {
                    Ok(k) => written += k,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
            Ok(Step::Moved {
                n,
                rest: (written < n).then(|| buf[written..n].to_vec()),
            })
        })?;
        match step {
            Step::Again => {}
            Step::Eof => {
                // A peer already gone (ENOTCONN) is the other direction's to report.
                match socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write) {
                    Err(e) if e.kind() != io::ErrorKind::NotConnected => return Err(e),
                    _ => return Ok(total),
                }
            }
            Step::Moved { n, rest } => {
                total += n as u64;
                if let Some(rest) = rest {
                    write_all(to, &rest).await?;
                }
            }
        }
    }
}

async fn write_all(to: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        to.writable().await?;
        match to.try_write(data) {
            Ok(k) => data = &data[k..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// A connected pair over loopback.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
        (c.expect("connect"), s.expect("accept").0)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn relays_both_ways_byte_exact_and_passes_half_closes_along() {
        // client ↔ (a | relay | b) ↔ server
        let (mut client, a) = pair().await;
        let (b, mut server) = pair().await;
        let relayed = tokio::spawn(async move { relay(&a, &b).await });
        // 8 MiB up while the server does not read yet: the relay keeps what the kernel
        // will not take, then drains it as the server reads.
        let up: Vec<u8> = (0..8 << 20).map(|i: u32| (i % 251) as u8).collect();
        let sent = up.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.expect("write");
            client.shutdown().await.expect("half-close");
            client
        });
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let mut got = Vec::new();
        server
            .read_to_end(&mut got)
            .await
            .expect("read to the client's close");
        assert!(
            got == up,
            "{} of {} bytes, byte-exact: {}",
            got.len(),
            up.len(),
            got == up
        );
        // The other way, after the first direction ended.
        server.write_all(b"reply").await.expect("reply");
        server.shutdown().await.expect("server half-close");
        let mut client = writer.await.expect("writer");
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.expect("reply read");
        assert_eq!(back, b"reply");
        let (from_a, from_b) = relayed.await.expect("relay task").expect("relay");
        assert_eq!((from_a, from_b), (8 << 20, 5));
    }
}
