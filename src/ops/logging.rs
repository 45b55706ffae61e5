//! Log lines in Celery's shape, `[2026-11-24 18:27:15,123: INFO/MainProcess] message`, or with
//! `--log-format json` one JSON object per line for log shippers. The pool children's Python
//! logging is set up to match (`python/celeriac/zygote.py`).

use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::subscriber::Interest;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

fn level_name(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "ERROR",
        Level::WARN => "WARNING",
        Level::INFO => "INFO",
        Level::DEBUG | Level::TRACE => "DEBUG",
    }
}

struct CeleryFormat;

impl<S, N> FormatEvent<S, N> for CeleryFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, _ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        // Our own lines carry only the message: their structured fields (task_id, ...) are for
        // the JSON format. A library's line (lapin's "Connection error") keeps its fields, since
        // the cause is in them.
        let mut fields = Fields::default();
        event.record(&mut fields);
        let now = chrono::Local::now();
        let level = level_name(event.metadata().level());
        let message = fields.0.remove("message");
        let message = message.as_ref().and_then(Value::as_str).unwrap_or("");
        write!(writer, "[{}: {level}/MainProcess] {message}", now.format("%Y-%m-%d %H:%M:%S,%3f"))?;
        if !event.metadata().target().starts_with(env!("CARGO_CRATE_NAME")) {
            for (name, value) in &fields.0 {
                match value {
                    Value::String(s) => write!(writer, " {name}={s}")?,
                    other => write!(writer, " {name}={other}")?,
                }
            }
        }
        writeln!(writer)
    }
}

/// Collects an event's fields: `message` plus structured ones such as `task_id`.
#[derive(Default)]
struct Fields(Map<String, Value>);

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().to_owned(), Value::from(format!("{value:?}")));
    }
}

struct JsonFormat;

impl<S, N> FormatEvent<S, N> for JsonFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, _ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let mut line = Map::new();
        line.insert("ts".into(), Value::from(chrono::Utc::now().to_rfc3339()));
        line.insert("level".into(), Value::from(level_name(event.metadata().level())));
        line.insert("process".into(), Value::from("MainProcess"));
        line.insert("message".into(), fields.0.remove("message").unwrap_or(Value::from("")));
        line.extend(fields.0);
        writeln!(writer, "{}", Value::Object(line))
    }
}

/// Map Celery's level names onto tracing's.
pub fn level_filter(loglevel: &str) -> tracing_subscriber::filter::LevelFilter {
    use tracing_subscriber::filter::LevelFilter;
    match loglevel.to_ascii_uppercase().as_str() {
        "DEBUG" => LevelFilter::DEBUG,
        "INFO" => LevelFilter::INFO,
        "WARNING" | "WARN" => LevelFilter::WARN,
        _ => LevelFilter::ERROR,
    }
}

/// The log file, shared by every log line (appends are atomic per write).
struct SharedFile(std::sync::Arc<std::fs::File>);

impl std::io::Write for SharedFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        (&*self.0).write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        (&*self.0).flush()
    }
}

/// Set once the worker starts closing its broker connections: from then on, what the AMQP client
/// says about a connection is about one being thrown away on purpose (a frame or heartbeat
/// caught between our `connection.close` and the broker's reply), not news for the user.
static BROKER_CLIENT_QUIET: AtomicBool = AtomicBool::new(false);

/// The worker is tearing its broker connections down: silence the AMQP client's own log lines.
/// Our lines about the consequences (a message not acked, not restored) still reach the log.
pub fn quiet_broker_client() {
    BROKER_CLIENT_QUIET.store(true, Ordering::Relaxed);
}

/// Install the supervisor's logger: stderr (where the children log too) or `--logfile`.
pub fn init(loglevel: &str, format: LogFormat, logfile: Option<&Path>) -> std::io::Result<()> {
    // lapin warns of every message the broker returns, but the one celeriac gets back (mingle's
    // unrouted `hello`: no other worker) is expected and handled.
    let filter = tracing_subscriber::EnvFilter::builder()
        .parse_lossy(format!("{},lapin::returned_messages=error", level_filter(loglevel)));
    // Asked at every event only for lapin's lines that pass the level filter (it sits inside it).
    let quiet = tracing_subscriber::filter::dynamic_filter_fn(|meta, _| {
        !(BROKER_CLIENT_QUIET.load(Ordering::Relaxed) && meta.target().starts_with("lapin"))
    })
    .with_callsite_filter(|meta| match meta.target().starts_with("lapin") {
        true => Interest::sometimes(),
        false => Interest::always(),
    });
    let file = logfile.map(|p| std::fs::OpenOptions::new().create(true).append(true).open(p)).transpose()?;
    let file = file.map(std::sync::Arc::new);
    let writer = tracing_subscriber::fmt::writer::BoxMakeWriter::new(move || -> Box<dyn std::io::Write> {
        match &file {
            Some(f) => Box::new(SharedFile(f.clone())),
            None => Box::new(std::io::stderr()),
        }
    });
    let lines = tracing_subscriber::fmt::layer().with_writer(writer);
    let lines = match format {
        LogFormat::Text => lines.event_format(CeleryFormat).boxed(),
        LogFormat::Json => lines.event_format(JsonFormat).boxed(),
    };
    let _ = tracing_subscriber::registry().with(quiet).with(filter).with(lines).try_init();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().map_err(|_| std::io::Error::other("poisoned"))?.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn text_lines_keep_a_librarys_fields_and_drop_our_own() {
        let captured = Captured::default();
        let sink = captured.clone();
        let subscriber =
            tracing_subscriber::fmt().with_writer(move || sink.clone()).event_format(CeleryFormat).finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::error!(target: "lapin::channels", error = "IO error: broken pipe", "Connection error");
            tracing::info!(task_id = "t-1", "Task add[t-1] received");
        });
        let text = String::from_utf8(captured.0.lock().map(|b| b.clone()).unwrap_or_default()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].ends_with("ERROR/MainProcess] Connection error error=IO error: broken pipe"), "{text}");
        assert!(lines[1].ends_with("INFO/MainProcess] Task add[t-1] received"), "{text}");
    }
}
