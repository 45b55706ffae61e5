//! Log lines in Celery's shape: `[2026-11-24 18:27:15,123: INFO/MainProcess] message`.

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

struct CeleryFormat;

impl<S, N> FormatEvent<S, N> for CeleryFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let now = chrono::Local::now();
        let level = match *event.metadata().level() {
            Level::ERROR => "ERROR",
            Level::WARN => "WARNING",
            Level::INFO => "INFO",
            Level::DEBUG | Level::TRACE => "DEBUG",
        };
        write!(writer, "[{}: {level}/MainProcess] ", now.format("%Y-%m-%d %H:%M:%S,%3f"))?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
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

/// Install the supervisor's logger on stderr, where the children's Python logging goes too.
pub fn init(loglevel: &str) {
    let _ = tracing_subscriber::fmt()
        .with_max_level(level_filter(loglevel))
        .with_writer(std::io::stderr)
        .event_format(CeleryFormat)
        .try_init();
}
