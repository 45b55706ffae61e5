//! Log lines in Celery's shape, `[2026-11-24 18:27:15,123: INFO/MainProcess] message`, or with
//! `--log-format json` one JSON object per line for log shippers. The pool children's Python
//! logging is set up to match (`python/celeriac/zygote.py`).

use std::fmt;
use std::path::Path;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

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
        // Only the message: structured fields (task_id, ...) are for the JSON format.
        let mut fields = Fields::default();
        event.record(&mut fields);
        let now = chrono::Local::now();
        let level = level_name(event.metadata().level());
        let message = fields.0.get("message").and_then(Value::as_str).unwrap_or("");
        writeln!(writer, "[{}: {level}/MainProcess] {message}", now.format("%Y-%m-%d %H:%M:%S,%3f"))
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

/// Install the supervisor's logger: stderr (where the children log too) or `--logfile`.
pub fn init(loglevel: &str, format: LogFormat, logfile: Option<&Path>) -> std::io::Result<()> {
    // lapin warns of every message the broker returns, but the one celeriac gets back (mingle's
    // unrouted `hello`: no other worker) is expected and handled.
    let filter = tracing_subscriber::EnvFilter::builder()
        .parse_lossy(format!("{},lapin::returned_messages=error", level_filter(loglevel)));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let file = logfile.map(|p| std::fs::OpenOptions::new().create(true).append(true).open(p)).transpose()?;
    let file = file.map(std::sync::Arc::new);
    let writer = tracing_subscriber::fmt::writer::BoxMakeWriter::new(move || -> Box<dyn std::io::Write> {
        match &file {
            Some(f) => Box::new(SharedFile(f.clone())),
            None => Box::new(std::io::stderr()),
        }
    });
    let _ = match format {
        LogFormat::Text => builder.with_writer(writer).event_format(CeleryFormat).try_init(),
        LogFormat::Json => builder.with_writer(writer).event_format(JsonFormat).try_init(),
    };
    Ok(())
}
