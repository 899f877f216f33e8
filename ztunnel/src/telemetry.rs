//! Logging setup: `tracing` with a filter from `RUST_LOG` (default `info`), text or JSON,
//! and a handle to change the filter at runtime (the admin port's `/logging`).
//!
//! Lines are formatted where they are logged but written to stderr by a thread of their
//! own, so a connection's access line never waits on the write (or on a log collector
//! that stopped reading the pipe). The queue between them holds [`LOG_QUEUE_LINES`]; when
//! it is full, lines are dropped and counted (`ztunnel_log_lines_dropped_total`) rather
//! than stalling the data path, as Istio's ztunnel does.
//!
//! Both formats are Istio ztunnel's, so a log pipeline written for it parses ours:
//! text is `<time>\t<level>\t<scope>[:<span>{<fields>}…]\t<message>\t<k=v …>` (values
//! as Rust's `Debug`: strings quoted), JSON is one object per line with `level`, `time`,
//! `scope`, the message and fields, then each span as an object under its name. The scope
//! is the event's target without `ztunnel::` (`access` for access log lines).

mod queue;

use std::{
    fmt, io,
    sync::{Mutex, OnceLock},
};

pub use queue::Flush;
use queue::LogQueue;

use serde::ser::{SerializeMap as _, Serializer as _};
use tracing::{
    Event, Subscriber,
    field::{Field, Visit},
};
use tracing_subscriber::{
    EnvFilter, Registry,
    fmt::{
        FmtContext, FormatEvent, FormatFields, FormattedFields,
        format::{JsonFields, Writer},
        time::{FormatTime as _, SystemTime},
    },
    layer::SubscriberExt as _,
    registry::LookupSpan,
    reload,
};

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

static QUEUE: OnceLock<LogQueue> = OnceLock::new();

/// Log lines dropped because the queue to the writer thread was full.
pub fn dropped_lines() -> u64 {
    QUEUE.get().map_or(0, LogQueue::dropped_lines)
}

/// Installs the global subscriber. Access lines (target `access`) share the format. Keep
/// the returned guard until the process ends: dropping it writes out what is queued.
pub fn init(format: LogFormat) -> io::Result<(LogControl, Flush)> {
    let spec = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned());
    let filter = EnvFilter::try_new(&spec).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let (writer, guard) = LogQueue::start(std::io::stderr(), LOG_QUEUE_LINES, "ztunnel-log")?;
    let _ = QUEUE.set(writer.clone());
    let json = format == LogFormat::Json;
    let text_layer = (!json).then(|| {
        tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .fmt_fields(IstioText)
            .event_format(IstioText)
            .with_writer(writer.clone())
    });
    let json_layer = json.then(|| {
        tracing_subscriber::fmt::layer()
            .fmt_fields(JsonFields::new())
            .event_format(IstioJson)
            .with_writer(writer)
    });
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
    Ok((control, guard))
}

/// A level as Istio's ztunnel writes it, without allocating per line.
fn level(l: &tracing::Level) -> &'static str {
    match *l {
        tracing::Level::ERROR => "error",
        tracing::Level::WARN => "warn",
        tracing::Level::INFO => "info",
        tracing::Level::DEBUG => "debug",
        tracing::Level::TRACE => "trace",
    }
}

/// The scope of an event: its target without the crate's prefix, as Istio's ztunnel shows it.
fn scope(target: &str) -> &str {
    target.strip_prefix("ztunnel::").unwrap_or(target)
}

/// Istio ztunnel's text layout (see the module's documentation).
pub struct IstioText;

/// Writes an event's or span's fields: the message first, then a tab, then `k=v` pairs
/// separated by spaces.
struct TextVisitor<'w> {
    writer: Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl Visit for TextVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.record_debug(field, &value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() {
            return;
        }
        self.result = match field.name() {
            // `log` crate metadata, already shown as the level and scope.
            name if name.starts_with("log.") => Ok(()),
            "message" => write!(self.writer, "{value:?}\t"),
            name => {
                let sep = if std::mem::take(&mut self.first) {
                    ""
                } else {
                    " "
                };
                write!(self.writer, "{sep}{name}={value:?}")
            }
        };
    }
}

impl<'w> FormatFields<'w> for IstioText {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        writer: Writer<'w>,
        fields: R,
    ) -> fmt::Result {
        let mut v = TextVisitor {
            writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut v);
        v.result
    }
}

impl<S, N> FormatEvent<S, N> for IstioText
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        SystemTime.format_time(&mut writer)?;
        write!(
            writer,
            "\t{}\t{}",
            level(meta.level()),
            scope(meta.target())
        )?;
        if let Some(spans) = ctx.event_scope() {
            for span in spans.from_root() {
                write!(writer, ":{}", span.metadata().name())?;
                let ext = span.extensions();
                if let Some(fields) = ext.get::<FormattedFields<N>>()
                    && !fields.is_empty()
                {
                    write!(writer, "{{{fields}}}")?;
                }
            }
        }
        if event.fields().next().is_some() {
            write!(writer, "\t")?;
        }
        ctx.format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// Istio ztunnel's JSON layout (see the module's documentation).
pub struct IstioJson;

/// Adapts the log writer (`fmt::Write`) for serde_json (`io::Write`).
struct WriteAdapter<'a, 'w>(&'a mut Writer<'w>);

impl io::Write for WriteAdapter<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let s =
            std::str::from_utf8(buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        self.0.write_str(s).map_err(io::Error::other)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Serializes an event's fields into a JSON map, numbers and booleans as such.
struct JsonVisitor<M: serde::ser::SerializeMap> {
    map: M,
    result: Result<(), M::Error>,
}

impl<M: serde::ser::SerializeMap> JsonVisitor<M> {
    fn entry<V: serde::Serialize + ?Sized>(&mut self, field: &Field, value: &V) {
        if self.result.is_ok() && !field.name().starts_with("log.") {
            self.result = self.map.serialize_entry(field.name(), value);
        }
    }
}

impl<M: serde::ser::SerializeMap> Visit for JsonVisitor<M> {
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.entry(field, &value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.entry(field, &value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.entry(field, &value);
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.entry(field, &value);
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.entry(field, value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.entry(field, &format!("{value:?}"));
    }
}

impl<S, N> FormatEvent<S, N> for IstioJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut time = String::new();
        SystemTime.format_time(&mut Writer::new(&mut time))?;
        let written = (|| -> Result<(), serde_json::Error> {
            let mut ser = serde_json::Serializer::new(WriteAdapter(&mut writer));
            let mut map = ser.serialize_map(None)?;
            map.serialize_entry("level", &level(meta.level()))?;
            map.serialize_entry("time", &time)?;
            map.serialize_entry("scope", scope(meta.target()))?;
            let mut v = JsonVisitor {
                map,
                result: Ok(()),
            };
            event.record(&mut v);
            v.result?;
            let mut map = v.map;
            if let Some(spans) = ctx.event_scope() {
                for span in spans.from_root() {
                    let ext = span.extensions();
                    // JsonFields wrote the span's fields as a JSON object.
                    let fields = ext
                        .get::<FormattedFields<N>>()
                        .map(|f| f.fields.as_str())
                        .filter(|f| !f.is_empty())
                        .unwrap_or("{}");
                    let value: serde_json::Value = serde_json::from_str(fields)?;
                    map.serialize_entry(span.metadata().name(), &value)?;
                }
            }
            map.end()
        })();
        written.map_err(|_| fmt::Error)?;
        writeln!(writer)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Collects what a layer writes.
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().expect("buf").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Buf {
        type Writer = Buf;
        fn make_writer(&'a self) -> Buf {
            self.clone()
        }
    }

    fn capture(json: bool, f: impl FnOnce()) -> String {
        let buf = Buf::default();
        if json {
            let layer = tracing_subscriber::fmt::layer()
                .fmt_fields(JsonFields::new())
                .event_format(IstioJson)
                .with_writer(buf.clone());
            tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), f);
        } else {
            let layer = tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .fmt_fields(IstioText)
                .event_format(IstioText)
                .with_writer(buf.clone());
            tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), f);
        }
        String::from_utf8(buf.0.lock().expect("buf").clone()).expect("utf-8")
    }

    #[test]
    fn text_lines_have_istios_layout() {
        let out = capture(false, || {
            let span = tracing::info_span!("inbound", pod = "default/a");
            let _g = span.enter();
            tracing::event!(
                target: "access",
                parent: None,
                tracing::Level::INFO,
                src.addr = %"10.0.0.1:5",
                n = 3u64,
                "connection complete"
            );
            tracing::warn!(why = "x", "in a span");
        });
        let lines: Vec<&str> = out.lines().collect();
        let f: Vec<&str> = lines[0].split('\t').collect();
        assert_eq!(f.len(), 5, "{lines:?}");
        assert!(f[0].ends_with('Z') && f[0].contains('T'), "time: {}", f[0]);
        assert_eq!(
            &f[1..],
            [
                "info",
                "access",
                "connection complete",
                "src.addr=10.0.0.1:5 n=3"
            ]
        );
        let f: Vec<&str> = lines[1].split('\t').collect();
        assert_eq!(
            &f[1..],
            [
                "warn",
                "telemetry::tests:inbound{pod=\"default/a\"}",
                "in a span",
                "why=\"x\""
            ]
        );
    }

    #[test]
    fn json_lines_have_istios_keys_in_order() {
        let out = capture(true, || {
            let span = tracing::info_span!("outbound", pod = "default/a");
            let _g = span.enter();
            tracing::event!(
                target: "access",
                tracing::Level::ERROR,
                src.addr = %"10.0.0.1:5",
                bytes_sent = 7u64,
                "connection complete"
            );
        });
        let line = out.lines().next().expect("a line");
        let keys: Vec<String> = line
            .trim_matches(['{', '}'])
            .split(",\"")
            .map(|kv| {
                kv.trim_start_matches('"')
                    .split('"')
                    .next()
                    .unwrap_or("")
                    .to_owned()
            })
            .collect();
        assert_eq!(
            keys,
            [
                "level",
                "time",
                "scope",
                "message",
                "src.addr",
                "bytes_sent",
                "outbound"
            ],
            "{line}"
        );
        let v: serde_json::Value = serde_json::from_str(line).expect("json");
        assert_eq!(v["level"], "error");
        assert_eq!(v["scope"], "access");
        assert_eq!(v["message"], "connection complete");
        assert_eq!(v["bytes_sent"], 7);
        assert_eq!(v["outbound"]["pod"], "default/a");
    }
}
