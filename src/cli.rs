//! The command line, compatible with `celery [global options] worker [options]`.
//!
//! Every option also reads an environment variable (`CELERIAC_<OPTION>`), and the stock CLI's
//! own variables (`CELERY_APP`, `CELERY_BROKER_URL`, ...) are honoured. Stock flags celeriac does
//! not implement yet are accepted and reported with a warning, never an error.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "celeriac",
    about = "A drop-in replacement for `celery worker`: your Celery app, run by a Rust supervisor",
    args_override_self = true,
    arg_required_else_help = true
)]
pub struct Cli {
    /// The Celery application: `module`, `module:attr` or `package` (→ `package.celery:app`).
    #[arg(short = 'A', long = "app", global = true, env = "CELERY_APP")]
    pub app: Option<String>,

    /// Broker URL; overrides the app's `broker_url` (as `celery -b`).
    #[arg(short = 'b', long = "broker", global = true, env = "CELERY_BROKER")]
    pub broker: Option<String>,

    /// Result backend URL; overrides the app's `result_backend`.
    #[arg(long = "result-backend", global = true)]
    pub result_backend: Option<String>,

    /// Change to this directory before importing the app.
    #[arg(long, global = true, env = "CELERIAC_WORKDIR")]
    pub workdir: Option<PathBuf>,

    /// The Python interpreter whose environment runs the app (default: the active virtualenv).
    #[arg(long, global = true, env = "CELERIAC_PYTHON")]
    pub python: Option<PathBuf>,

    /// Configuration module (as `celery --config`).
    #[arg(long, global = true, env = "CELERY_CONFIG")]
    pub config: Option<String>,

    /// Loader class (as `celery --loader`).
    #[arg(long, global = true, env = "CELERY_LOADER")]
    pub loader: Option<String>,

    /// Skip Django system checks.
    #[arg(long = "skip-checks", global = true, env = "CELERY_SKIP_CHECKS")]
    pub skip_checks: bool,

    /// Accepted for compatibility: celeriac's logs are not colored.
    #[arg(short = 'C', long = "no-color", global = true)]
    pub no_color: bool,

    /// Accepted for compatibility.
    #[arg(short = 'q', long = "quiet", global = true)]
    pub quiet: bool,

    /// Print celeriac's version, the Python it would run the app with, and that Python's Celery.
    #[arg(short = 'V', long = "version")]
    pub version: bool,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a worker (as `celery worker`).
    Worker(Box<WorkerArgs>),
    /// Run the periodic task scheduler alone (as `celery beat`).
    Beat(Box<BeatArgs>),
    /// Print the settings a worker would run with, and where each came from.
    Config(Box<ConfigArgs>),
    /// Check the environment a worker would run in (Python, libpython, Celery, the app, the
    /// broker, the result backend) and say what is wrong and how to fix it.
    Doctor(Box<WorkerArgs>),
}

#[derive(Debug, Args, Clone)]
pub struct ConfigArgs {
    #[command(flatten)]
    pub worker: WorkerArgs,
    /// Print JSON (`{setting: {"value": ..., "source": ...}}`) instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `celery beat` options.
#[derive(Debug, Args, Clone)]
pub struct BeatArgs {
    /// Logging level: DEBUG, INFO, WARNING, ERROR, CRITICAL, FATAL.
    #[arg(short = 'l', long = "loglevel", env = "CELERIAC_LOGLEVEL", default_value = "WARNING", value_parser = parse_loglevel)]
    pub loglevel: String,

    /// The schedule state file of the default scheduler (`beat_schedule_filename`).
    #[arg(short = 's', long = "schedule", env = "CELERIAC_BEAT_SCHEDULE")]
    pub schedule: Option<String>,

    /// Scheduler class (`beat_scheduler`), e.g. `django_celery_beat.schedulers:DatabaseScheduler`.
    #[arg(short = 'S', long = "scheduler", env = "CELERIAC_BEAT_SCHEDULER")]
    pub scheduler: Option<String>,

    /// Longest sleep, in seconds, between two looks at the schedule (`beat_max_loop_interval`).
    #[arg(long = "max-interval", env = "CELERIAC_BEAT_MAX_INTERVAL")]
    pub max_interval: Option<f64>,

    /// Send without taking the leader lock in the broker (stock behaviour: run one beat only).
    #[arg(long = "without-beat-lock", env = "CELERIAC_WITHOUT_BEAT_LOCK")]
    pub without_beat_lock: bool,

    /// Write beat's pid here; refuse to start if another live process owns it.
    #[arg(long = "pidfile", env = "CELERIAC_PIDFILE")]
    pub pidfile: Option<PathBuf>,

    /// Log to this file instead of stderr.
    #[arg(short = 'f', long = "logfile", env = "CELERIAC_LOGFILE")]
    pub logfile: Option<std::path::PathBuf>,

    /// `text` (Celery's format) or `json` (one object per line, for log shippers).
    #[arg(long = "log-format", env = "CELERIAC_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: crate::ops::logging::LogFormat,

    #[command(flatten)]
    pub daemon: Daemonize,
}

#[derive(Debug, Args, Clone)]
pub struct WorkerArgs {
    /// Logging level: DEBUG, INFO, WARNING, ERROR, CRITICAL, FATAL.
    #[arg(short = 'l', long = "loglevel", env = "CELERIAC_LOGLEVEL", default_value = "WARNING", value_parser = parse_loglevel)]
    pub loglevel: String,

    /// Number of pool child processes (default: the app's `worker_concurrency`, else CPUs).
    #[arg(short = 'c', long = "concurrency", env = "CELERIAC_CONCURRENCY")]
    pub concurrency: Option<usize>,

    /// Comma-separated queues to consume from (default: all of `task_queues`).
    #[arg(short = 'Q', long = "queues", env = "CELERIAC_QUEUES")]
    pub queues: Option<String>,

    /// Comma-separated queues not to consume from.
    #[arg(short = 'X', long = "exclude-queues", env = "CELERIAC_EXCLUDE_QUEUES")]
    pub exclude_queues: Option<String>,

    /// Node name, `%h` expands to the host name (default `celery@%h`).
    #[arg(short = 'n', long = "hostname", env = "CELERIAC_HOSTNAME")]
    pub hostname: Option<String>,

    /// Messages prefetched per pool child (default: the app's `worker_prefetch_multiplier`, 4).
    #[arg(long = "prefetch-multiplier", env = "CELERIAC_PREFETCH_MULTIPLIER")]
    pub prefetch_multiplier: Option<usize>,

    /// Scheduling optimization: `default` or `fair` (the same since Celery 4).
    #[arg(short = 'O', long = "optimization", env = "CELERIAC_OPTIMIZATION", value_parser = ["default", "fair"])]
    pub optimization: Option<String>,

    /// Write the worker's pid here; refuse to start if another live worker owns it.
    #[arg(long = "pidfile", env = "CELERIAC_PIDFILE")]
    pub pidfile: Option<PathBuf>,

    /// Don't synchronise revoked tasks with other workers at start-up.
    #[arg(long = "without-mingle", env = "CELERIAC_WITHOUT_MINGLE")]
    pub without_mingle: bool,

    /// Don't subscribe to other workers' events.
    #[arg(long = "without-gossip", env = "CELERIAC_WITHOUT_GOSSIP")]
    pub without_gossip: bool,

    /// Don't send worker heartbeats.
    #[arg(long = "without-heartbeat", env = "CELERIAC_WITHOUT_HEARTBEAT")]
    pub without_heartbeat: bool,

    /// Write the next task to a busy child behind its running one when that task's runs take
    /// less than this many milliseconds (0: never, as stock's `-O fair`). See docs/pipelining.md.
    #[arg(long = "pipeline-max-ms", env = "CELERIAC_PIPELINE_MAX_MS", default_value_t = 5.0)]
    pub pipeline_max_ms: f64,

    /// Benchmark ceiling (bench/run.py): take and ack every message at once, run no task.
    #[arg(long = "bare-consumer", hide = true)]
    pub bare_consumer: bool,

    /// Benchmark floor (bench/run.py): with --bare-consumer, append `<task id> <unix time>` to
    /// this file for each delivery as it arrives.
    #[arg(long = "bare-stamps", hide = true)]
    pub bare_stamps: Option<std::path::PathBuf>,

    /// Send task-related events (for Flower and `celery events`).
    #[arg(short = 'E', long = "task-events", visible_alias = "events", env = "CELERIAC_TASK_EVENTS")]
    pub task_events: bool,

    /// Hard time limit in seconds: the child running the task is killed (default: none).
    #[arg(long = "time-limit", env = "CELERIAC_TIME_LIMIT")]
    pub time_limit: Option<f64>,

    /// Soft time limit in seconds: `SoftTimeLimitExceeded` is raised inside the task.
    #[arg(long = "soft-time-limit", env = "CELERIAC_SOFT_TIME_LIMIT")]
    pub soft_time_limit: Option<f64>,

    /// Replace a pool child after it ran this many tasks.
    #[arg(long = "max-tasks-per-child", env = "CELERIAC_MAX_TASKS_PER_CHILD")]
    pub max_tasks_per_child: Option<u64>,

    /// Replace a pool child after a task leaves it above this resident memory (KiB).
    #[arg(long = "max-memory-per-child", env = "CELERIAC_MAX_MEMORY_PER_CHILD")]
    pub max_memory_per_child: Option<u64>,

    /// Keep revoked task ids in this file across restarts (celery's shelve format).
    #[arg(short = 'S', long = "statedb", env = "CELERIAC_STATEDB")]
    pub statedb: Option<String>,

    /// Seconds between worker heartbeat events (default 2).
    #[arg(long = "heartbeat-interval", env = "CELERIAC_HEARTBEAT_INTERVAL")]
    pub heartbeat_interval: Option<f64>,

    /// Serve /healthz, /readyz and /metrics on this port (off by default).
    #[arg(long = "http-port", env = "CELERIAC_HTTP_PORT")]
    pub http_port: Option<u16>,

    /// Address the HTTP endpoint listens on.
    #[arg(long = "http-bind", env = "CELERIAC_HTTP_BIND", default_value = "0.0.0.0")]
    pub http_bind: String,

    /// Warm shutdown waits at most this many seconds for running tasks; then `acks_late`
    /// tasks go back to the queue and the others are marked failed (default: wait forever).
    #[arg(long = "shutdown-timeout", env = "CELERIAC_SHUTDOWN_TIMEOUT")]
    pub shutdown_timeout: Option<f64>,

    /// Log to this file instead of stderr (children too).
    #[arg(short = 'f', long = "logfile", env = "CELERIAC_LOGFILE")]
    pub logfile: Option<std::path::PathBuf>,

    /// `text` (Celery's format) or `json` (one object per line, for log shippers).
    #[arg(long = "log-format", env = "CELERIAC_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: crate::ops::logging::LogFormat,

    /// Run beat, the periodic task scheduler, inside the worker.
    #[arg(short = 'B', long = "beat", env = "CELERIAC_BEAT")]
    pub beat: bool,

    /// With -B: the schedule state file of the default scheduler (`beat_schedule_filename`).
    #[arg(short = 's', long = "schedule-filename", visible_alias = "schedule", env = "CELERIAC_BEAT_SCHEDULE")]
    pub schedule_filename: Option<String>,

    /// With -B: the scheduler class (`beat_scheduler`).
    #[arg(long = "scheduler", env = "CELERIAC_BEAT_SCHEDULER")]
    pub scheduler: Option<String>,

    /// With -B: send without taking the leader lock in the broker (stock behaviour).
    #[arg(long = "without-beat-lock", env = "CELERIAC_WITHOUT_BEAT_LOCK")]
    pub without_beat_lock: bool,

    /// Delete every message waiting in the queues consumed before starting (unrecoverable).
    #[arg(long = "purge", visible_alias = "discard", env = "CELERIAC_PURGE")]
    pub purge: bool,

    /// Comma-separated extra modules to import, as `celery worker -I`.
    #[arg(short = 'I', long = "include", env = "CELERIAC_INCLUDE")]
    pub include: Option<String>,

    /// Grow the pool up to MAX children under load and shrink it to MIN when idle: `MAX,MIN`.
    #[arg(long = "autoscale", env = "CELERIAC_AUTOSCALE")]
    pub autoscale: Option<String>,

    #[command(flatten)]
    pub daemon: Daemonize,

    #[command(flatten)]
    pub not_yet: NotYetImplemented,
}

/// Daemonization options of `celery worker` and `celery beat`.
#[derive(Debug, Args, Clone, Default)]
pub struct Daemonize {
    /// Start in the background: detach from the terminal (use with --logfile and --pidfile).
    #[arg(short = 'D', long = "detach", env = "CELERIAC_DETACH")]
    pub detach: bool,

    /// Run as this user (name or uid) once started.
    #[arg(long = "uid", env = "CELERIAC_UID")]
    pub uid: Option<String>,

    /// Run as this group (name or gid) once started.
    #[arg(long = "gid", env = "CELERIAC_GID")]
    pub gid: Option<String>,

    /// The process' umask, in octal (e.g. 022).
    #[arg(long = "umask", env = "CELERIAC_UMASK")]
    pub umask: Option<String>,
}

/// Stock `celery worker` flags that celeriac accepts but does not act on yet.
#[derive(Debug, Args, Clone, Default)]
pub struct NotYetImplemented {
    #[arg(long = "executable", env = "CELERIAC_EXECUTABLE", hide = true)]
    pub executable: Option<String>,
    #[arg(short = 'P', long = "pool", env = "CELERIAC_POOL", hide = true)]
    pub pool: Option<String>,
    #[arg(long = "pool-start-method", env = "CELERIAC_POOL_START_METHOD", hide = true)]
    pub pool_start_method: Option<String>,
    #[arg(long = "disable-prefetch", env = "CELERIAC_DISABLE_PREFETCH", hide = true)]
    pub disable_prefetch: bool,
}

impl NotYetImplemented {
    /// The flags given that celeriac does not act on, as the user typed them.
    pub fn given(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        let mut note = |set: bool, flag: &'static str| {
            if set {
                out.push(flag)
            }
        };
        note(self.executable.is_some(), "--executable");
        note(self.pool.as_deref().is_some_and(|p| p != "prefork"), "--pool");
        note(self.pool_start_method.is_some(), "--pool-start-method");
        note(self.disable_prefetch, "--disable-prefetch");
        out
    }
}

fn parse_loglevel(s: &str) -> Result<String, String> {
    let up = s.to_ascii_uppercase();
    match up.as_str() {
        "DEBUG" | "INFO" | "WARNING" | "WARN" | "ERROR" | "CRITICAL" | "FATAL" => Ok(up),
        _ => Err(format!("{s:?} is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL, FATAL")),
    }
}

impl Cli {
    /// The app locator from `-A`, `CELERY_APP`, or the stock CLI's plain `APP` variable.
    pub fn app_locator(&self) -> Option<String> {
        self.app.clone().or_else(|| std::env::var("APP").ok().filter(|s| !s.is_empty()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(args).unwrap()
    }

    #[test]
    fn app_before_or_after_the_subcommand() {
        let a = parse(&["celeriac", "-A", "core", "worker", "-l", "info"]);
        let b = parse(&["celeriac", "worker", "-A", "core", "-l", "info"]);
        let c = parse(&["celeriac", "worker", "--app=core", "--loglevel=INFO"]);
        for cli in [a, b, c] {
            assert_eq!(cli.app.as_deref(), Some("core"));
            let Some(Command::Worker(w)) = cli.command else { panic!("not a worker") };
            assert_eq!(w.loglevel, "INFO");
        }
    }

    #[test]
    fn worker_flags() {
        let cli = parse(&[
            "celeriac",
            "-A",
            "x",
            "worker",
            "-c",
            "3",
            "-Q",
            "a,b",
            "-n",
            "w1@%h",
            "--prefetch-multiplier",
            "2",
            "-O",
            "fair",
            "--without-mingle",
            "--without-gossip",
            "--without-heartbeat",
            "-E",
        ]);
        let Some(Command::Worker(w)) = cli.command else { panic!("not a worker") };
        assert_eq!(w.concurrency, Some(3));
        assert_eq!(w.queues.as_deref(), Some("a,b"));
        assert_eq!(w.hostname.as_deref(), Some("w1@%h"));
        assert_eq!(w.prefetch_multiplier, Some(2));
        assert!(w.without_mingle && w.without_gossip && w.without_heartbeat && w.task_events);
    }

    #[test]
    fn stock_flags_not_implemented_are_accepted() {
        let cli = parse(&["celeriac", "-A", "x", "worker", "-P", "solo", "-B", "--autoscale", "4,2", "-D"]);
        let Some(Command::Worker(w)) = cli.command else { panic!("not a worker") };
        assert_eq!(w.not_yet.given(), vec!["--pool"]);
        assert!(w.daemon.detach);
        assert!(w.beat && w.autoscale.as_deref() == Some("4,2"));
    }

    #[test]
    fn beat_and_config_commands() {
        let cli = parse(&["celeriac", "-A", "x", "beat", "-l", "info", "-s", "/tmp/s", "-S", "my:Scheduler"]);
        let Some(Command::Beat(b)) = cli.command else { panic!("not beat") };
        assert_eq!((b.schedule.as_deref(), b.scheduler.as_deref()), (Some("/tmp/s"), Some("my:Scheduler")));
        let cli = parse(&["celeriac", "-A", "x", "config", "-c", "3", "--json"]);
        let Some(Command::Config(c)) = cli.command else { panic!("not config") };
        assert!(c.json && c.worker.concurrency == Some(3));
    }

    #[test]
    fn bad_loglevel_is_an_error() {
        assert!(Cli::try_parse_from(["celeriac", "worker", "-l", "loud"]).is_err());
    }
}
