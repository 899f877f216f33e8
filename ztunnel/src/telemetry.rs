//! Logging setup: `tracing` with a filter from `RUST_LOG` (default `info`), text or JSON,
//! and a handle to change the filter at runtime (the admin port's `/logging`).
use std::sync::Mutex;

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

/// Installs the global subscriber. Access lines (target `access`) share the format.
pub fn init(format: LogFormat) -> LogControl {
    let spec = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned());
    let filter = EnvFilter::try_new(&spec).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let json = format == LogFormat::Json;
    let text_layer = (!json).then(|| fmt::layer().with_ansi(false).with_writer(std::io::stderr));
    let json_layer = json.then(|| fmt::layer().json().with_writer(std::io::stderr));
    let subscriber = tracing_subscriber::registry()
        .with(filter)
        .with(text_layer)
        .with(json_layer);
    // Only fails if a global subscriber exists already (a second init): keep that one.
    let _ = tracing::subscriber::set_global_default(subscriber);
    LogControl {
        handle,
        current: Mutex::new(spec),
    }
}
