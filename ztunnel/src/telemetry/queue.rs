//! The queue between the threads that format log lines and the thread that writes them.
//!
//! Bounded by a count, not by a preallocated ring: `tracing-appender`'s writer (used
//! before) allocates and touches its whole bounded channel up front, 32 bytes a slot,
//! 2 MiB for 65,536 lines held by every idle ztunnel. Here the lines travel over an
//! unbounded channel, which takes memory in small blocks as lines arrive and frees them
//! as they leave, and a counter keeps the number queued at most the limit; a line that
//! would go over it is dropped and counted, never waited for.

use std::{
    io::{self, Write},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    thread,
    time::Duration,
};

/// How long dropping the [`Flush`] guard waits for the writer thread to write out what
/// is queued (a stuck stderr must not hold up the exit).
const FLUSH_TIMEOUT: Duration = Duration::from_secs(1);

enum Msg {
    Line(Vec<u8>),
    /// Write out everything before this, flush, answer and stop.
    Shutdown(mpsc::Sender<()>),
}

/// The sending side: a `MakeWriter` for the formatting layers. Each `write` is one line
/// (the `fmt` layer writes a formatted event at once).
#[derive(Clone)]
pub struct LogQueue {
    tx: mpsc::Sender<Msg>,
    counts: Arc<Counts>,
    limit: usize,
}

struct Counts {
    queued: AtomicUsize,
    dropped: AtomicUsize,
}

/// Keep until the process ends: dropping it writes out what is queued (waiting at most
/// [`FLUSH_TIMEOUT`]) and stops the writer thread.
pub struct Flush {
    tx: mpsc::Sender<Msg>,
}

impl LogQueue {
    /// Starts the writer thread `name`, writing to `out` at most `limit` queued lines.
    pub fn start<W: Write + Send + 'static>(
        out: W,
        limit: usize,
        name: &str,
    ) -> io::Result<(LogQueue, Flush)> {
        let (tx, rx) = mpsc::channel();
        let counts = Arc::new(Counts {
            queued: AtomicUsize::new(0),
            dropped: AtomicUsize::new(0),
        });
        let c = counts.clone();
        thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || write_lines(out, rx, &c))?;
        let flush = Flush { tx: tx.clone() };
        Ok((LogQueue { tx, counts, limit }, flush))
    }

    /// Lines dropped because the queue was full (or the writer thread had stopped).
    pub fn dropped_lines(&self) -> u64 {
        self.counts.dropped.load(Ordering::Relaxed) as u64
    }

    fn push(&self, line: &[u8]) {
        // Counted before it is sent, so the count never reads below what is queued and
        // the queue never holds more than `limit`.
        if self.counts.queued.fetch_add(1, Ordering::AcqRel) >= self.limit {
            self.counts.queued.fetch_sub(1, Ordering::AcqRel);
            self.counts.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if self.tx.send(Msg::Line(line.to_vec())).is_err() {
            self.counts.queued.fetch_sub(1, Ordering::AcqRel);
            self.counts.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// What the writer thread buffers before writing (more goes out at once).
const WRITE_BUFFER: usize = 16 * 1024;

/// The writer thread: writes lines in order, and flushes whenever the queue runs empty,
/// so what queued up while a write was under way goes out in one write, and a lone line
/// at once (tests and operators read the log right after what it reports). A failed
/// write loses those lines, as `tracing-appender` did (there is nowhere to report it).
fn write_lines<W: Write>(out: W, rx: mpsc::Receiver<Msg>, counts: &Counts) {
    let mut out = io::BufWriter::with_capacity(WRITE_BUFFER, out);
    let mut next = rx.recv();
    loop {
        match next {
            Ok(Msg::Line(line)) => {
                counts.queued.fetch_sub(1, Ordering::AcqRel);
                let _ = out.write_all(&line);
            }
            Ok(Msg::Shutdown(done)) => {
                let _ = out.flush();
                // Closed before the answer: a line logged after the flush is dropped and
                // counted, not queued for no one.
                drop(rx);
                let _ = done.send(());
                return;
            }
            // Every sender is gone: nothing more can come.
            Err(_) => {
                let _ = out.flush();
                return;
            }
        }
        next = match try_take(&rx) {
            Some(m) => m,
            None => {
                let _ = out.flush();
                wait_briefly(&rx).unwrap_or_else(|| rx.recv())
            }
        };
    }
}

/// Before the writer thread sleeps, it waits a few microseconds for the next line as
/// crossbeam's receivers do (what Istio's log writer uses; std's channel parks at once):
/// spins, then a few `yield`s, which let a sender on the same CPU run. A line that comes
/// meanwhile costs its sender no wakeup of the writer.
fn wait_briefly(rx: &mpsc::Receiver<Msg>) -> Option<Result<Msg, mpsc::RecvError>> {
    const SPIN_STEPS: u32 = 6;
    const YIELDS: u32 = 4;
    for step in 0..=SPIN_STEPS + YIELDS {
        if step <= SPIN_STEPS {
            for _ in 0..1u32 << step {
                std::hint::spin_loop();
            }
        } else {
            thread::yield_now();
        }
        if let Some(m) = try_take(rx) {
            return Some(m);
        }
    }
    None
}

/// What `recv` would return, if it would not block (`None`: the queue is empty).
fn try_take(rx: &mpsc::Receiver<Msg>) -> Option<Result<Msg, mpsc::RecvError>> {
    match rx.try_recv() {
        Ok(m) => Some(Ok(m)),
        Err(mpsc::TryRecvError::Empty) => None,
        Err(mpsc::TryRecvError::Disconnected) => Some(Err(mpsc::RecvError)),
    }
}

impl Write for &LogQueue {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogQueue {
    type Writer = &'a LogQueue;

    fn make_writer(&'a self) -> Self::Writer {
        self
    }
}

impl Drop for Flush {
    fn drop(&mut self) {
        let (done, wait) = mpsc::channel();
        if self.tx.send(Msg::Shutdown(done)).is_ok() {
            let _ = wait.recv_timeout(FLUSH_TIMEOUT);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Mutex, mpsc::Receiver};
    use std::time::Instant;

    use super::*;

    /// An output that says when a write starts and finishes it only when let through.
    struct Gate {
        written: Arc<Mutex<Vec<u8>>>,
        entered: mpsc::Sender<()>,
        open: Receiver<()>,
    }

    impl Write for Gate {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            let _ = self.entered.send(());
            self.open
                .recv_timeout(Duration::from_secs(10))
                .map_err(|_| io::Error::other("gate never opened"))?;
            self.written.lock().expect("written").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// The output, what it wrote, its "write started" signals, and what lets a write finish.
    type Gated = (Gate, Arc<Mutex<Vec<u8>>>, Receiver<()>, mpsc::Sender<()>);

    fn gated() -> Gated {
        let written = Arc::new(Mutex::new(Vec::new()));
        let (entered, entered_rx) = mpsc::channel();
        let (open_tx, open) = mpsc::channel();
        let gate = Gate {
            written: written.clone(),
            entered,
            open,
        };
        (gate, written, entered_rx, open_tx)
    }

    /// A queue, its flush guard, and what [`gated`] gives but the gate.
    type Blocked = (
        LogQueue,
        Flush,
        Arc<Mutex<Vec<u8>>>,
        Receiver<()>,
        mpsc::Sender<()>,
    );

    /// A queue of at most `limit` lines whose writer has taken `first` and is blocked
    /// writing it (so the queue is empty).
    fn blocked_on(first: &[u8], limit: usize) -> Blocked {
        let (gate, written, entered, open) = gated();
        let (q, flush) = LogQueue::start(gate, limit, "test-log").expect("start");
        (&q).write_all(first).expect("write");
        entered
            .recv_timeout(Duration::from_secs(10))
            .expect("the writer took the first line");
        (q, flush, written, entered, open)
    }

    #[test]
    fn the_brief_wait_takes_a_queued_line_sees_a_closed_channel_and_gives_up_when_empty() {
        let (tx, rx) = mpsc::channel();
        // Nothing comes: it gives up, and the caller sleeps in `recv`.
        assert!(wait_briefly(&rx).is_none());
        tx.send(Msg::Line(b"a\n".to_vec())).expect("send");
        match wait_briefly(&rx) {
            Some(Ok(Msg::Line(l))) => assert_eq!(l, b"a\n"),
            _ => panic!("the queued line"),
        }
        drop(tx);
        assert!(matches!(wait_briefly(&rx), Some(Err(mpsc::RecvError))));
    }

    #[test]
    fn a_full_queue_drops_and_counts_and_the_rest_is_written_in_order() {
        let (q, flush, written, _entered, open) = blocked_on(b"0\n", 4);
        for i in 1..=7 {
            (&q).write_all(format!("{i}\n").as_bytes()).expect("write");
        }
        assert_eq!(q.dropped_lines(), 3, "4 queued, 3 over the limit");
        for _ in 0..5 {
            open.send(()).expect("open");
        }
        drop(flush);
        assert_eq!(*written.lock().expect("written"), b"0\n1\n2\n3\n4\n");
        // The queue has room again once written out... but the writer has stopped.
        (&q).write_all(b"late\n").expect("write");
        assert_eq!(q.dropped_lines(), 4, "a line after the flush is dropped");
    }

    #[test]
    fn lines_queued_while_the_output_is_busy_go_out_in_one_write() {
        let (q, flush, written, entered, open) = blocked_on(b"first\n", 100);
        // Queued while the first write is under way.
        for i in 0..10 {
            (&q).write_all(format!("{i}\n").as_bytes()).expect("write");
        }
        open.send(()).expect("open");
        entered
            .recv_timeout(Duration::from_secs(10))
            .expect("a second write");
        open.send(()).expect("open");
        drop(flush);
        assert_eq!(
            *written.lock().expect("written"),
            b"first\n0\n1\n2\n3\n4\n5\n6\n7\n8\n9\n"
        );
        assert!(
            entered.try_recv().is_err(),
            "the ten queued lines took more than one write"
        );
    }

    #[test]
    fn dropping_the_guard_waits_for_a_stuck_writer_at_most_the_timeout() {
        let (_q, flush, written, _entered, _open) = blocked_on(b"stuck\n", 4);
        let t = Instant::now();
        drop(flush);
        let waited = t.elapsed();
        assert!(
            waited >= FLUSH_TIMEOUT && waited < FLUSH_TIMEOUT * 3,
            "waited {waited:?}"
        );
        assert!(written.lock().expect("written").is_empty());
    }
}
