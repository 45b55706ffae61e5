//! Layered worker settings: command line → environment → the app's own configuration (as the
//! zygote read it, Django `CELERY_*` settings included) → Celery's defaults.

use std::collections::HashMap;

use config::{Config, File, FileFormat};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::cli::{Cli, WorkerArgs};
use crate::transport::QueueSpec;

pub mod effective;
pub mod nodename;

/// What the zygote reports after importing the app (`python/celeriac/zygote.py: bootstrap_info`).
#[derive(Debug, Clone, Deserialize)]
pub struct AppInfo {
    pub hostname: String,
    pub app: String,
    /// The app's main module name (`Celery("proj")`): names beat's leader lock.
    #[serde(default)]
    pub main: Option<String>,
    pub celery_version: String,
    pub python_version: String,
    pub executable: String,
    pub broker_url: String,
    pub broker_display: String,
    pub result_backend: Option<String>,
    pub queues: Vec<QueueSpec>,
    /// Every queue the app defines, consumed or not (`add_consumer` looks names up here).
    #[serde(default)]
    pub known_queues: Vec<QueueSpec>,
    pub tasks: HashMap<String, TaskOptions>,
    #[serde(default)]
    pub conf_table: Value,
    /// The app connected `task_received` receivers: send it (through the zygote) per task.
    #[serde(default)]
    pub task_received_receivers: bool,
    /// Revoked ids loaded from `--statedb`.
    #[serde(default)]
    pub revoked: Vec<String>,
    #[serde(default)]
    pub broker_info: Value,
    /// The broker connection as kombu parsed it (`userid`, `password`, `hostname`, `port`):
    /// SQS takes its credentials and endpoint from there.
    #[serde(default)]
    pub broker_connection: Map<String, Value>,
    /// `doctor` only: whether the result backend answered.
    #[serde(default)]
    pub backend_check: Option<BackendCheck>,
    pub conf: AppConf,
}

#[derive(Debug, Clone, Deserialize)]
pub struct BackendCheck {
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AppConf {
    pub worker_concurrency: Option<usize>,
    pub worker_prefetch_multiplier: Option<usize>,
    #[serde(default)]
    pub worker_send_task_events: bool,
    pub accept_content: Vec<String>,
    #[serde(default)]
    pub broker_transport_options: Map<String, Value>,
    pub broker_heartbeat: Option<f64>,
    /// `broker_use_ssl` as a mapping (`ca_certs`, `certfile`, `keyfile`, `cert_reqs`).
    #[serde(default)]
    pub broker_use_ssl: Option<Map<String, Value>>,
    pub broker_connection_timeout: Option<f64>,
    pub broker_connection_max_retries: Option<u32>,
    #[serde(default = "yes")]
    pub broker_connection_retry_on_startup: bool,
    #[serde(default)]
    pub worker_cancel_long_running_tasks_on_connection_loss: bool,
    #[serde(default)]
    pub worker_disable_rate_limits: bool,
    #[serde(default = "control_exchange")]
    pub control_exchange: String,
    pub control_queue_expires: Option<f64>,
    pub control_queue_ttl: Option<f64>,
    #[serde(default)]
    pub control_queue_exclusive: bool,
    #[serde(default)]
    pub control_queue_durable: bool,
}

/// The per-task options the supervisor acts on (`celery/app/task.py`, resolved from config).
#[derive(Debug, Clone, Deserialize, Default)]
pub struct TaskOptions {
    #[serde(default)]
    pub acks_late: bool,
    #[serde(default = "yes")]
    pub acks_on_failure_or_timeout: bool,
    pub acks_on_failure: Option<bool>,
    #[serde(default)]
    pub reject_on_worker_lost: bool,
    pub acks_on_timeout: Option<bool>,
    #[serde(default)]
    pub rate_limit: Option<Value>,
    pub time_limit: Option<f64>,
    pub soft_time_limit: Option<f64>,
}

fn control_exchange() -> String {
    "celery".into()
}

fn yes() -> bool {
    true
}

impl TaskOptions {
    /// `task_acks_on_failure` (5.7) overrides the combined `acks_on_failure_or_timeout`.
    pub fn acks_on_failure(&self) -> bool {
        self.acks_on_failure.unwrap_or(self.acks_on_failure_or_timeout)
    }

    /// The task's `rate_limit` in tasks per second, if it has one.
    pub fn rate_per_second(&self) -> Option<f64> {
        self.rate_limit.as_ref().and_then(crate::consumer::parse_rate)
    }

    /// `task_acks_on_timeout` (5.7) likewise.
    pub fn acks_on_timeout(&self) -> bool {
        self.acks_on_timeout.unwrap_or(self.acks_on_failure_or_timeout)
    }
}

/// Everything the supervisor runs with, after layering.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub hostname: String,
    pub concurrency: usize,
    pub prefetch_multiplier: usize,
    pub task_events: bool,
    pub accept_content: Vec<String>,
    pub queues: Vec<QueueSpec>,
    pub cancel_long_running_on_connection_loss: bool,
    /// `--time-limit` / `--soft-time-limit`: the pool's defaults when neither the message nor
    /// the task sets one.
    pub time_limit: Option<f64>,
    pub soft_time_limit: Option<f64>,
    /// `worker_disable_rate_limits`.
    pub disable_rate_limits: bool,
    /// Worker events (online, heartbeat, offline): off with `--without-heartbeat`.
    pub worker_events: bool,
    pub heartbeat_interval: f64,
    /// `--http-port` / `--http-bind`: the health and metrics endpoint.
    pub http_port: Option<u16>,
    pub http_bind: String,
    /// Mingle at start-up (off with `--without-mingle`).
    pub mingle: bool,
    /// Follow other workers' events (off with `--without-gossip`).
    pub gossip: bool,
    /// `--autoscale=max,min`: the pool starts at `min` children and grows to `max`.
    pub autoscale: Option<Autoscale>,
    /// `-B`: run beat in the worker.
    pub beat: Option<crate::beat::BeatOptions>,
    /// `--shutdown-timeout`: how long a warm shutdown waits for running tasks.
    pub shutdown_timeout: Option<f64>,
    /// `--bare-consumer` (hidden): the benchmark's ceiling, see `worker::bare_consume`.
    pub bare_consumer: bool,
    /// `--bare-stamps` (hidden): where the bare consumer notes each delivery's arrival.
    pub bare_stamps: Option<std::path::PathBuf>,
    /// `--pipeline-max-ms`, in seconds (`consumer::pipeline`); `None`: never pipeline.
    pub pipeline_max_runtime: Option<f64>,
}

/// `--autoscale=max[,min]` (`celery/worker/components.py: Pool.__init__`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Autoscale {
    pub max: usize,
    pub min: usize,
}

impl std::str::FromStr for Autoscale {
    type Err = SettingsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || SettingsError::Autoscale(s.to_owned());
        let (max, min) = s.split_once(',').unwrap_or((s, ""));
        let max: usize = max.trim().parse().map_err(|_| bad())?;
        let min: usize = if min.trim().is_empty() { 0 } else { min.trim().parse().map_err(|_| bad())? };
        if max == 0 || min > max {
            return Err(bad());
        }
        Ok(Autoscale { max, min })
    }
}

#[derive(Debug, Deserialize)]
struct Layered {
    concurrency: usize,
    prefetch_multiplier: usize,
    task_events: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("invalid configuration: {0}")]
    Layering(#[from] config::ConfigError),
    #[error("concurrency must be at least 1")]
    NoConcurrency,
    #[error("--autoscale takes MAX[,MIN] with MAX >= 1 and MIN <= MAX, not {0:?}")]
    Autoscale(String),
}

impl WorkerSettings {
    pub fn resolve(worker: &WorkerArgs, app: &AppInfo) -> Result<Self, SettingsError> {
        let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        // The app's configuration as one source; unset keys fall through to the defaults.
        let mut from_app = Map::new();
        if let Some(c) = app.conf.worker_concurrency.filter(|c| *c > 0) {
            from_app.insert("concurrency".into(), json!(c));
        }
        if let Some(m) = app.conf.worker_prefetch_multiplier {
            from_app.insert("prefetch_multiplier".into(), json!(m));
        }
        from_app.insert("task_events".into(), json!(app.conf.worker_send_task_events));
        let layered: Layered = Config::builder()
            .set_default("concurrency", cpus as u64)?
            .set_default("prefetch_multiplier", 4u64)?
            .set_default("task_events", false)?
            .add_source(File::from_str(&Value::Object(from_app).to_string(), FileFormat::Json))
            .set_override_option("concurrency", worker.concurrency.map(|c| c as u64))?
            .set_override_option("prefetch_multiplier", worker.prefetch_multiplier.map(|c| c as u64))?
            .set_override_option("task_events", worker.task_events.then_some(true))?
            .build()?
            .try_deserialize()?;
        let autoscale = worker.autoscale.as_deref().map(str::parse::<Autoscale>).transpose()?;
        if layered.concurrency == 0 && autoscale.is_none() {
            return Err(SettingsError::NoConcurrency);
        }
        Ok(WorkerSettings {
            hostname: app.hostname.clone(),
            // With autoscale the pool starts at its minimum, as stock.
            concurrency: autoscale.map_or(layered.concurrency, |a| a.min),
            prefetch_multiplier: layered.prefetch_multiplier,
            task_events: layered.task_events,
            accept_content: app.conf.accept_content.clone(),
            queues: app.queues.clone(),
            cancel_long_running_on_connection_loss: app.conf.worker_cancel_long_running_tasks_on_connection_loss,
            time_limit: worker.time_limit.filter(|t| *t > 0.0),
            soft_time_limit: worker.soft_time_limit.filter(|t| *t > 0.0),
            disable_rate_limits: app.conf.worker_disable_rate_limits,
            worker_events: !worker.without_heartbeat,
            heartbeat_interval: worker.heartbeat_interval.filter(|h| *h > 0.0).unwrap_or(2.0),
            http_port: worker.http_port,
            http_bind: worker.http_bind.clone(),
            shutdown_timeout: worker.shutdown_timeout.filter(|t| *t >= 0.0),
            bare_consumer: worker.bare_consumer,
            bare_stamps: worker.bare_stamps.clone(),
            pipeline_max_runtime: Some(worker.pipeline_max_ms / 1000.0).filter(|s| *s > 0.0),
            // Stock's Mingle and Gossip bootsteps run on AMQP and Redis only (`compatible_transports`).
            mingle: !worker.without_mingle && broadcasts_to_workers(&app.broker_url),
            gossip: !worker.without_gossip && broadcasts_to_workers(&app.broker_url),
            autoscale,
            beat: worker.beat.then(|| crate::beat::BeatOptions {
                schedule_filename: worker.schedule_filename.clone(),
                scheduler: worker.scheduler.clone(),
                max_interval: None,
                standalone: false,
                loglevel: worker.loglevel.clone(),
                logfile: worker.logfile.clone(),
                leader_lock: !worker.without_beat_lock,
            }),
        })
    }

    /// Messages held unsettled at most: concurrency × multiplier (0 = unlimited, as kombu);
    /// with autoscale, the largest pool's.
    pub fn prefetch_count(&self) -> usize {
        self.autoscale.map_or(self.concurrency, |a| a.max) * self.prefetch_multiplier
    }

    /// Is this content type allowed by `accept_content` (`kombu.serialization.loads`)?
    pub fn accepts(&self, content_type: &str) -> bool {
        content_type == "application/data"
            || content_type == "application/text"
            || self.accept_content.iter().any(|a| a == content_type)
    }
}

impl AppInfo {
    /// The worker's pidbox, from the `control_*` settings.
    pub fn mailbox(&self) -> crate::transport::Mailbox {
        let ms = |s: Option<f64>| s.filter(|s| *s > 0.0).map(|s| (s * 1000.0) as u64);
        crate::transport::Mailbox {
            node: self.hostname.clone(),
            namespace: self.conf.control_exchange.clone(),
            queue_expires_ms: ms(self.conf.control_queue_expires),
            queue_ttl_ms: ms(self.conf.control_queue_ttl),
            exclusive: self.conf.control_queue_exclusive,
            durable: self.conf.control_queue_durable,
        }
    }
}

/// The options the zygote needs to load the app as `celery -A ... worker` would.
pub fn zygote_options(cli: &Cli, worker: &WorkerArgs) -> Value {
    json!({
        "app": cli.app_locator(),
        "broker": cli.broker,
        "result_backend": cli.result_backend,
        "config": cli.config,
        "loader": cli.loader,
        "skip_checks": cli.skip_checks,
        "loglevel": worker.loglevel,
        "hostname": worker.hostname,
        "queues": worker.queues,
        "exclude_queues": worker.exclude_queues,
        "concurrency": worker.concurrency,
        "max_tasks_per_child": worker.max_tasks_per_child,
        "max_memory_per_child": worker.max_memory_per_child,
        "statedb": worker.statedb,
        "purge": worker.purge,
        "include": worker.include,
        "logfile": worker.logfile,
        "log_format": if worker.log_format == crate::ops::logging::LogFormat::Json { "json" } else { "text" },
    })
}

/// The zygote's options for `celeriac beat`: load the app as `celery beat` does.
pub fn beat_zygote_options(cli: &Cli, beat: &crate::cli::BeatArgs) -> Value {
    json!({
        "role": "beat",
        "app": cli.app_locator(),
        "broker": cli.broker,
        "result_backend": cli.result_backend,
        "config": cli.config,
        "loader": cli.loader,
        "skip_checks": cli.skip_checks,
        "loglevel": beat.loglevel,
        "logfile": beat.logfile,
        "log_format": if beat.log_format == crate::ops::logging::LogFormat::Json { "json" } else { "text" },
    })
}

/// Brokers whose workers can say hello to each other (mingle) and follow each other (gossip).
fn broadcasts_to_workers(broker_url: &str) -> bool {
    let scheme = broker_url.split("://").next().unwrap_or("");
    matches!(
        scheme,
        "amqp" | "amqps" | "pyamqp" | "pyamqps" | "librabbitmq" | "redis" | "rediss" | "redis+socket" | "unix"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn app_info(conf: Value) -> AppInfo {
        serde_json::from_value(json!({
            "hostname": "celery@h", "app": "<Celery x>", "celery_version": "5.7.0",
            "python_version": "3.11.7", "executable": "/usr/bin/python3",
            "broker_url": "redis://", "broker_display": "redis://", "result_backend": null,
            "queues": [{"name": "celery", "exchange": "celery", "routing_key": "celery"}],
            "tasks": {"a.add": {"acks_late": true}},
            "conf": conf,
        }))
        .unwrap()
    }

    fn worker(args: &[&str]) -> WorkerArgs {
        let mut all = vec!["celeriac", "worker"];
        all.extend_from_slice(args);
        let Some(crate::cli::Command::Worker(w)) = Cli::try_parse_from(all).unwrap().command else {
            panic!("not a worker")
        };
        *w
    }

    #[test]
    fn cli_beats_app_config_beats_defaults() {
        let app = app_info(
            json!({"worker_concurrency": 3, "worker_prefetch_multiplier": 2, "accept_content": ["application/json"]}),
        );
        let s = WorkerSettings::resolve(&worker(&[]), &app).unwrap();
        assert_eq!((s.concurrency, s.prefetch_multiplier, s.prefetch_count()), (3, 2, 6));
        let s = WorkerSettings::resolve(&worker(&["-c", "5", "--prefetch-multiplier", "1"]), &app).unwrap();
        assert_eq!((s.concurrency, s.prefetch_multiplier), (5, 1));
        let app =
            app_info(json!({"worker_concurrency": null, "worker_prefetch_multiplier": null, "accept_content": []}));
        let s = WorkerSettings::resolve(&worker(&[]), &app).unwrap();
        assert_eq!(s.prefetch_multiplier, 4);
        assert!(s.concurrency >= 1);
        assert!(app.tasks["a.add"].acks_late);
        assert!(app.tasks["a.add"].acks_on_failure());
    }

    #[test]
    fn autoscale() {
        let app = app_info(json!({"worker_concurrency": 3, "accept_content": []}));
        let s = WorkerSettings::resolve(&worker(&["--autoscale", "10,2"]), &app).unwrap();
        assert_eq!((s.concurrency, s.autoscale, s.prefetch_count()), (2, Some(Autoscale { max: 10, min: 2 }), 40));
        let s = WorkerSettings::resolve(&worker(&["--autoscale", "5"]), &app).unwrap();
        assert_eq!((s.concurrency, s.autoscale), (0, Some(Autoscale { max: 5, min: 0 })));
        for bad in ["0", "2,5", "x", "3,y"] {
            assert!(WorkerSettings::resolve(&worker(&["--autoscale", bad]), &app).is_err(), "{bad}");
        }
    }

    #[test]
    fn accept_content() {
        let app = app_info(json!({"accept_content": ["application/json"]}));
        let s = WorkerSettings::resolve(&worker(&[]), &app).unwrap();
        assert!(s.accepts("application/json"));
        assert!(s.accepts("application/data"));
        assert!(!s.accepts("application/x-python-serialize"));
    }
}
