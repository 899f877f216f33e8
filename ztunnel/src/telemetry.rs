//! Logging setup: `tracing` with a filter from `RUST_LOG` (default `info`), text or JSON,
//! and a handle to change the filter at runtime (the admin port's `/logging`).
//!
//! Lines are formatted where they are logged but written to stderr by a thread of their
//! own, so a connection's access line never waits on the write (or on a log collector
//! that stopped reading the pipe). The queue between them holds [`LOG_QUEUE_LINES`]; when
//! it is full, lines are dropped and counted (`ztunnel_log_lines_dropped_total`) rather
//! than stalling the data path, as Istio's ztunnel does.
use std::sync::{Mutex, OnceLock};

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};

use tracing_subscriber::{EnvFilter, Registry, fmt, layer::SubscriberExt as _, reload};

use crate::config::LogFormat;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid log level {spec:?} (use e.g. `info`, `debug`, `ztunnel::proxy=debug,info`)")]
    Parse {
        spec: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("failed to apply log level {spec:?}")]
    Reload {
        spec: String,
        #[source]
        source: reload::Error,
    },
}

/// Changes the log filter of the running process.
pub struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
    current: Mutex<String>,
}

impl LogControl {
    /// The filter in force, as a directive string.
    pub fn level(&self) -> String {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set(&self, spec: &str) -> Result<(), Error> {
        let filter = EnvFilter::try_new(spec).map_err(|source| Error::Parse {
            spec: spec.to_owned(),
            source,
        })?;
        self.handle.reload(filter).map_err(|source| Error::Reload {
            spec: spec.to_owned(),
            source,
        })?;
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = spec.to_owned();
        Ok(())
    }
}

/// Lines that may wait for the writer thread (about 10 MiB of typical access lines).
pub const LOG_QUEUE_LINES: usize = 65_536;

static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// Log lines dropped because the queue to the writer thread was full.
pub fn dropped_lines() -> u64 {
    DROPPED.get().map_or(0, |c| c.dropped_lines() as u64)
}

/// Installs the global subscriber. Access lines (target `access`) share the format. Keep
/// the returned guard until the process ends: dropping it writes out what is queued.
pub fn init(format: LogFormat) -> (LogControl, WorkerGuard) {
    let spec = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned());
    let filter = EnvFilter::try_new(&spec).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let (writer, guard) = NonBlockingBuilder::default()
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .lossy(true)
        .thread_name("ztunnel-log")
        .finish(std::io::stderr());
    let _ = DROPPED.set(writer.error_counter());
    let json = format == LogFormat::Json;
    let text_layer = (!json).then(|| fmt::layer().with_ansi(false).with_writer(writer.clone()));
    let json_layer = json.then(|| fmt::layer().json().with_writer(writer));
    let subscriber = tracing_subscriber::registry()
        .with(filter)
        .with(text_layer)
        .with(json_layer);
    // Only fails if a global subscriber exists already (a second init): keep that one.
    let _ = tracing::subscriber::set_global_default(subscriber);
    let control = LogControl {
        handle,
        current: Mutex::new(spec),
    };
    (control, guard)
}
