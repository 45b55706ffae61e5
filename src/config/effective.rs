//! `celeriac config`: the settings a worker would run with, each with where it came from
//! (the command line, the environment, the app's configuration, or the default).

use serde_json::{json, Value};

use super::{AppInfo, WorkerSettings};
use crate::cli::WorkerArgs;

/// Where a command-line option's value came from, as clap saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Given {
    CommandLine,
    /// The environment variable's name.
    Environment(String),
    Absent,
}

/// How option `id` was given, from clap's matches.
pub fn given(matches: &clap::ArgMatches, id: &str) -> Given {
    match matches.try_get_raw(id).ok().flatten().and(matches.value_source(id)) {
        Some(clap::parser::ValueSource::CommandLine) => Given::CommandLine,
        Some(clap::parser::ValueSource::EnvVariable) => Given::Environment(env_var_of(id)),
        _ => Given::Absent,
    }
}

/// The environment variable clap read option `id` from.
fn env_var_of(id: &str) -> String {
    match id {
        "app" => "CELERY_APP".into(),
        "broker" => "CELERY_BROKER".into(),
        "result_backend" => "CELERY_RESULT_BACKEND".into(),
        other => format!("CELERIAC_{}", other.to_ascii_uppercase()),
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq)]
pub struct Effective {
    pub setting: &'static str,
    pub value: Value,
    pub source: String,
}

/// The worker's effective settings. `given(id)` says how option `id` (the `WorkerArgs` field
/// name) was given; `app_keys` is what the app's own configuration sets.
pub fn report(
    worker: &WorkerArgs,
    given: &dyn Fn(&str) -> Given,
    app: &AppInfo,
    settings: &WorkerSettings,
) -> Vec<Effective> {
    let app_sets = |key: &str| app.conf_table.get(key).is_some_and(|v| !v.is_null());
    // An option's source: the flag or variable if given, else the app's setting if it has
    // one, else the default.
    let source = |id: &str, app_key: Option<&str>| match given(id) {
        Given::CommandLine => "command line".to_owned(),
        Given::Environment(var) => format!("environment ({var})"),
        Given::Absent => match app_key {
            Some(key) if app_sets(key) => format!("app ({key})"),
            _ => "default".to_owned(),
        },
    };
    let from_app = |key: &str| if app_sets(key) { format!("app ({key})") } else { "default".to_owned() };
    let queue_names: Vec<&str> = settings.queues.iter().map(|q| q.name.as_str()).collect();
    let mut out = vec![
        // `<Celery proj at 0x7f…>` without the address.
        line("app", json!(format!("{}>", app.app.split(" at 0x").next().unwrap_or(&app.app))), source("app", None)),
        line("broker_url", json!(app.broker_display), source("broker", Some("broker_url"))),
        line("result_backend", json!(app.result_backend), source("result_backend", Some("result_backend"))),
        line("hostname", json!(settings.hostname), source("hostname", None)),
        line("concurrency", json!(settings.concurrency), source("concurrency", Some("worker_concurrency"))),
        line("prefetch_multiplier", json!(settings.prefetch_multiplier), {
            source("prefetch_multiplier", Some("worker_prefetch_multiplier"))
        }),
        line("prefetch_count", json!(settings.prefetch_count()), "derived (pool size × prefetch_multiplier)".into()),
        line("queues", json!(queue_names), source("queues", Some("task_queues"))),
        line("loglevel", json!(worker.loglevel), source("loglevel", None)),
        line("log_format", json!(format!("{:?}", worker.log_format).to_lowercase()), source("log_format", None)),
        line("logfile", json!(worker.logfile), source("logfile", None)),
        line("task_events", json!(settings.task_events), source("task_events", Some("worker_send_task_events"))),
        line("time_limit", json!(settings.time_limit), source("time_limit", None)),
        line("soft_time_limit", json!(settings.soft_time_limit), source("soft_time_limit", None)),
        line("max_tasks_per_child", json!(worker.max_tasks_per_child), {
            source("max_tasks_per_child", Some("worker_max_tasks_per_child"))
        }),
        line("max_memory_per_child", json!(worker.max_memory_per_child), {
            source("max_memory_per_child", Some("worker_max_memory_per_child"))
        }),
        line("statedb", json!(worker.statedb), source("statedb", Some("worker_state_db"))),
        line("heartbeat_interval", json!(settings.heartbeat_interval), source("heartbeat_interval", None)),
        line("heartbeat", json!(settings.worker_events), source("without_heartbeat", None)),
        line("mingle", json!(settings.mingle), source("without_mingle", None)),
        line("gossip", json!(settings.gossip), source("without_gossip", None)),
        line("http_port", json!(settings.http_port), source("http_port", None)),
        line("http_bind", json!(settings.http_bind), source("http_bind", None)),
        line("shutdown_timeout", json!(settings.shutdown_timeout), source("shutdown_timeout", None)),
        line("pidfile", json!(worker.pidfile), source("pidfile", None)),
        line("accept_content", json!(settings.accept_content), from_app("accept_content")),
        line("disable_rate_limits", json!(settings.disable_rate_limits), from_app("worker_disable_rate_limits")),
    ];
    if let Some(a) = settings.autoscale {
        out.insert(5, line("autoscale", json!([a.max, a.min]), source("autoscale", None)));
    }
    out
}

fn line(setting: &'static str, value: Value, source: String) -> Effective {
    Effective { setting, value, source }
}

/// The report as an aligned table, values as JSON.
pub fn render(lines: &[Effective]) -> String {
    let width = lines.iter().map(|l| l.setting.len()).max().unwrap_or(0);
    let values: Vec<String> = lines.iter().map(|l| l.value.to_string()).collect();
    let value_width = values.iter().map(String::len).max().unwrap_or(0).min(60);
    let mut out = String::new();
    for (l, v) in lines.iter().zip(values) {
        out.push_str(&format!("{:width$}  {:value_width$}  {}\n", l.setting, v, l.source));
    }
    out
}

/// The report as one JSON object: `{setting: {"value": ..., "source": ...}}`.
pub fn to_json(lines: &[Effective]) -> Value {
    let map: serde_json::Map<String, Value> =
        lines.iter().map(|l| (l.setting.to_owned(), json!({"value": l.value, "source": l.source}))).collect();
    Value::Object(map)
}
