//! `celeriac worker`: start the zygote, read the app's configuration, connect to the broker and
//! run the consumer until shutdown.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch, Semaphore};
use tracing::{error, info, warn};

use crate::beat;
use crate::cli::{BeatArgs, Cli, WorkerArgs};
use crate::config::effective::{self, Given};
use crate::config::{beat_zygote_options, nodename, zygote_options, AppInfo, WorkerSettings};
use crate::consumer::{acker, Channels, Consumer};
use crate::control::events::Events;
use crate::embed::interpreter::{self, Interpreter};
use crate::ops::metrics::Metrics;
use crate::ops::{banner, http, logging, pidfile::Pidfile, signals};
use crate::pool::{zygote, Pool};
use crate::transport::amqp::{AmqpOptions, AmqpTransport};
use crate::transport::filesystem::{FilesystemOptions, FilesystemTransport};
use crate::transport::redis::{RedisOptions, RedisTls, RedisTransport};
use crate::transport::sqs::{SqsOptions, SqsTransport};
use crate::transport::{Transport, TransportError};

/// Deliveries buffered between the transport and the consumer; the prefetch window is the
/// real bound, this only decouples the two tasks.
const DELIVERY_BUFFER: usize = 1024;
/// `broker_connection_max_retries` default.
const CONNECT_RETRIES: u32 = 100;

/// `-f` and `--pidfile` of the worker's main process, Celery's `%n`, `%h`, `%i`... expanded once
/// at start-up. The zygote gets `-f` as given, for pool children to expand their own `%i`.
pub struct MainProcessFiles {
    pub logfile: Option<std::path::PathBuf>,
    pub pidfile: Option<std::path::PathBuf>,
}

impl MainProcessFiles {
    pub fn of(worker: &WorkerArgs) -> Result<Self, nodename::UnknownFormat> {
        let expand = |path: &Option<std::path::PathBuf>| {
            path.as_deref().map(|path| nodename::main_process_path(path, worker.hostname.as_deref())).transpose()
        };
        Ok(MainProcessFiles { logfile: expand(&worker.logfile)?, pidfile: expand(&worker.pidfile)? })
    }

    /// The names exactly as given.
    pub fn as_given(worker: &WorkerArgs) -> Self {
        MainProcessFiles { logfile: worker.logfile.clone(), pidfile: worker.pidfile.clone() }
    }
}

/// Entry point; returns the process exit code. Must run before any thread is started.
pub fn run(cli: &Cli, worker: &WorkerArgs, files: &MainProcessFiles) -> i32 {
    for flag in worker.not_yet.given() {
        eprintln!(
            "celeriac: {flag} is accepted for compatibility with `celery worker` but not implemented yet; ignoring it"
        );
    }
    match prepare(cli, &LogOptions::of(worker, files), zygote_options(cli, worker)) {
        Ok((pending, runtime)) => run_to_exit(runtime, supervise(pending, worker.clone(), files.pidfile.clone())),
        Err(code) => code,
    }
}

/// Run the command's future to its end and hand back its exit code, leaving the runtime
/// running: the process exits next, and lapin's I/O threads, registered with this runtime's
/// reactor, may still be finishing a connection's close; shutting the runtime down first would
/// fail their last I/O and log it as an error.
fn run_to_exit(runtime: tokio::runtime::Runtime, command: impl std::future::Future<Output = i32>) -> i32 {
    let code = runtime.block_on(command);
    std::mem::forget(runtime);
    code
}

/// `celeriac config`: load the app as `worker` would and print the effective settings, each
/// with its source; start nothing.
pub fn show_config(
    cli: &Cli,
    worker: &WorkerArgs,
    files: &MainProcessFiles,
    given: &dyn Fn(&str) -> Given,
    as_json: bool,
) -> i32 {
    let mut options = zygote_options(cli, worker);
    options["role"] = "config".into();
    let (pending, runtime) = match prepare(cli, &LogOptions::of(worker, files), options) {
        Ok(p) => p,
        Err(code) => return code,
    };
    run_to_exit(runtime, async {
        let (pool_tx, _pool_rx) = mpsc::unbounded_channel();
        let (mut zygote, app, settings) = match load_app(pending, pool_tx, worker).await {
            Ok(loaded) => loaded,
            Err(code) => return code,
        };
        zygote.close();
        let lines = effective::report(worker, given, &app, &settings);
        if as_json {
            println!("{}", effective::to_json(&lines));
        } else {
            print!("{}", effective::render(&lines));
        }
        0
    })
}

/// How to log: `--loglevel`, `--log-format`, `--logfile`.
struct LogOptions<'a> {
    loglevel: &'a str,
    format: logging::LogFormat,
    logfile: Option<std::path::PathBuf>,
}

impl<'a> LogOptions<'a> {
    fn of(worker: &'a WorkerArgs, files: &MainProcessFiles) -> Self {
        LogOptions { loglevel: &worker.loglevel, format: worker.log_format, logfile: files.logfile.clone() }
    }
}

/// What `worker`, `beat` and `config` do first: logging, `--workdir`, the interpreter check, the
/// zygote (forked before any thread exists) and the async runtime.
fn prepare(
    cli: &Cli,
    log: &LogOptions<'_>,
    zygote_options: serde_json::Value,
) -> Result<(zygote::PendingZygote, tokio::runtime::Runtime), i32> {
    if let Err(e) = logging::init(log.loglevel, log.format, log.logfile.as_deref()) {
        eprintln!("celeriac: cannot open the log file: {e}");
        return Err(1);
    }
    if let Some(dir) = &cli.workdir {
        if let Err(e) = std::env::set_current_dir(dir) {
            error!("Cannot change to --workdir {}: {e}", dir.display());
            return Err(1);
        }
    }
    if cli.app_locator().is_none() {
        error!("No Celery app given: pass -A/--app (e.g. `celeriac -A core worker`) or set CELERY_APP");
        return Err(1);
    }
    let python = interpreter::choose(cli.python.as_deref());
    let libdir = Interpreter::probe(&python, false).and_then(|i| i.check()).map_err(|msg| {
        error!("{msg}");
        1
    })?;
    // From the main thread, before the runtime's threads: the zygote dies with this thread.
    let pending = zygote::start(zygote_options, &python, &libdir).map_err(|e| {
        error!("{e}");
        1
    })?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| {
        error!("Cannot start the async runtime: {e}");
        1
    })?;
    Ok((pending, runtime))
}

/// Wait for the zygote to load the app; resolve the worker's settings against it.
async fn load_app(
    pending: zygote::PendingZygote,
    pool_tx: mpsc::UnboundedSender<crate::pool::PoolEvent>,
    worker: &WorkerArgs,
) -> Result<(zygote::Zygote, AppInfo, WorkerSettings), i32> {
    let (zygote, info) = pending.bootstrap(pool_tx).await.map_err(|e| {
        error!("{e}");
        1
    })?;
    let app: AppInfo = serde_json::from_slice(&info).map_err(|e| {
        error!("The zygote reported an unreadable configuration: {e}");
        1
    })?;
    let settings = WorkerSettings::resolve(worker, &app).map_err(|e| {
        error!("{e}");
        1
    })?;
    Ok((zygote, app, settings))
}

async fn supervise(pending: zygote::PendingZygote, worker: WorkerArgs, pidfile: Option<std::path::PathBuf>) -> i32 {
    let (pool_tx, pool_rx) = mpsc::unbounded_channel();
    let (zygote, app, settings) = match load_app(pending, pool_tx.clone(), &worker).await {
        Ok((zygote, app, settings)) => (zygote, app, Arc::new(settings)),
        Err(code) => return code,
    };
    let _pidfile = match pidfile.as_deref().map(Pidfile::create).transpose() {
        Ok(p) => p,
        Err(e) => {
            error!("{e}");
            return 1;
        }
    };
    let stops = match signals::listen(true) {
        Ok(s) => s,
        Err(e) => {
            error!("Cannot install signal handlers: {e}");
            return 1;
        }
    };
    let app_for_connect = app.clone();
    let parts = Parts { settings, app, zygote, pool_tx, pool_rx, stops };
    connect_and_run(&app_for_connect, Role::Worker(parts)).await
}

/// What runs once the broker is connected: a worker (with its consumer), beat alone, or
/// nothing (`doctor` only wants to know whether it connects, and if not, why).
enum Role {
    Worker(Parts),
    Beat(BeatParts),
    Probe(tokio::sync::oneshot::Sender<Result<(), String>>),
}

/// Connect to the app's broker (retrying as `broker_connection_retry_on_startup` says) and run.
async fn connect_and_run(app: &AppInfo, role: Role) -> i32 {
    let scheme = app.broker_url.split("://").next().unwrap_or("");
    match scheme {
        "redis" | "rediss" | "redis+socket" | "unix" => {
            let mut opts = RedisOptions::from_transport_options(&app.conf.broker_transport_options);
            opts.tls = RedisTls::from_kombu(&app.broker_url, app.broker_connection.get("ssl"));
            if opts.tls.as_ref().is_some_and(|t| !t.verify) {
                warn!("TLS to the Redis broker without certificate verification (ssl_cert_reqs=CERT_NONE)");
            }
            let connected = with_retries(app, || RedisTransport::connect(&app.broker_url, opts.clone())).await;
            run_role(connected, app, role).await
        }
        "amqp" | "pyamqp" | "amqps" | "pyamqps" | "librabbitmq" => {
            let conf = &app.conf;
            let opts = AmqpOptions {
                tls_ca_file: conf
                    .broker_use_ssl
                    .as_ref()
                    .and_then(|s| s.get("ca_certs"))
                    .and_then(|v| v.as_str())
                    .map(str::to_owned),
                heartbeat: conf.broker_heartbeat.map(|h| h as u16),
                connect_timeout_ms: conf.broker_connection_timeout.map(|t| (t * 1000.0) as u64),
                max_retries: conf.broker_connection_max_retries,
                frame_max: conf
                    .broker_transport_options
                    .get("frame_max")
                    .and_then(serde_json::Value::as_u64)
                    .map(|f| u32::try_from(f).unwrap_or(u32::MAX)),
            };
            let connect = || AmqpTransport::connect(&app.broker_url, &app.broker_display, opts.clone());
            let connected = with_retries(app, connect).await;
            run_role(connected, app, role).await
        }
        "filesystem" => {
            let opts = FilesystemOptions::from_transport_options(&app.conf.broker_transport_options);
            run_role(FilesystemTransport::open(opts, &app.hostname), app, role).await
        }
        "sqs" => {
            let opts = SqsOptions::new(&app.broker_connection, &app.conf.broker_transport_options);
            let connected = with_retries(app, || SqsTransport::connect(opts.clone())).await;
            run_role(connected, app, role).await
        }
        _ => {
            error!("{}", TransportError::UnsupportedUrl(app.broker_display.clone()));
            1
        }
    }
}

async fn run_role<T: Transport>(connected: Result<T, TransportError>, app: &AppInfo, role: Role) -> i32 {
    let transport = match (connected, role) {
        (Ok(_), Role::Probe(answer)) => {
            let _ = answer.send(Ok(()));
            return 0;
        }
        (Err(e), Role::Probe(answer)) => {
            let _ = answer.send(Err(e.to_string()));
            return 1;
        }
        (Ok(t), role) => (Arc::new(t), role),
        (Err(e), _) => {
            error!("consumer: Cannot connect to {}: {e}", app.broker_display);
            return 1;
        }
    };
    match transport {
        (transport, Role::Worker(parts)) => start(transport, parts).await,
        (transport, Role::Beat(parts)) => serve_beat(transport, parts).await,
        (_, Role::Probe(_)) => 0,
    }
}

/// `celeriac doctor`: the interpreter, the app (loaded as the worker would), the broker (one
/// connection attempt) and the result backend, each reported with how to fix what fails.
pub fn doctor(cli: &Cli, worker: &WorkerArgs) -> i32 {
    use crate::ops::doctor::{check_python, Report};

    let mut report = Report::start();
    let Some((python, libdir)) = check_python(cli, &mut report) else { return report.finish() };
    let Some(app_name) = cli.app_locator() else {
        report.fail("no Celery app given", "pass -A/--app (e.g. `celeriac -A core doctor`) or set CELERY_APP");
        return report.finish();
    };
    if let Some(dir) = &cli.workdir {
        if let Err(e) = std::env::set_current_dir(dir) {
            report.fail(format!("--workdir {}: {e}", dir.display()), "give a folder that exists");
            return report.finish();
        }
    }
    let mut options = zygote_options(cli, worker);
    options["role"] = "doctor".into();
    let pending = match zygote::start(options, &python, &libdir) {
        Ok(p) => p,
        Err(e) => {
            report.fail(e, "reinstall celeriac (pip install celeriac): celeriac-zygote belongs beside celeriac");
            return report.finish();
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            report.fail(format!("cannot start the async runtime: {e}"), "check the machine's limits (ulimit -n)");
            return report.finish();
        }
    };
    run_to_exit(runtime, async {
        let (pool_tx, _pool_rx) = mpsc::unbounded_channel();
        let (mut zygote, info) = match pending.bootstrap(pool_tx).await {
            Ok(loaded) => loaded,
            Err(e) => {
                report.fail(
                    format!("app {app_name}: {e}"),
                    "check -A/--app, the working directory (--workdir) and that the app's requirements are \
                     installed in that environment; `python -c 'import <module>'` shows the full error",
                );
                return report.finish();
            }
        };
        let mut app: AppInfo = match serde_json::from_slice(&info) {
            Ok(app) => app,
            Err(e) => {
                report.fail(format!("the zygote's report is unreadable: {e}"), "report this as a celeriac bug");
                return report.finish();
            }
        };
        report.ok(format!("app {app_name} imported: {} tasks registered", app.tasks.len()));
        app.conf.broker_connection_retry_on_startup = false; // one attempt: say what is wrong now
        let (answer, connected) = tokio::sync::oneshot::channel();
        let attempt = tokio::time::timeout(Duration::from_secs(15), connect_and_run(&app, Role::Probe(answer)));
        let _ = attempt.await;
        match connected.await {
            Ok(Ok(())) => report.ok(format!("broker {} reachable", app.broker_display)),
            Ok(Err(e)) => report.fail(
                format!("broker {}: {e}", app.broker_display),
                "start the broker, or point broker_url (CELERY_BROKER_URL, -b) at one that runs; check its \
                 password and, for TLS, broker_use_ssl",
            ),
            Err(_) => report.fail(
                format!("broker {}: no answer within 15 s", app.broker_display),
                "check the host and port, and any firewall between here and the broker",
            ),
        }
        match &app.backend_check {
            Some(check) if check.ok => report.ok(format!("result backend: {}", check.detail)),
            Some(check) => report.fail(
                format!("result backend: {}", check.detail),
                "start it, or point result_backend (CELERY_RESULT_BACKEND, --result-backend) at one that runs",
            ),
            None => {}
        }
        zygote.close();
        report.finish()
    })
}

/// What the consumer needs besides the transport.
struct Parts {
    settings: Arc<WorkerSettings>,
    app: AppInfo,
    zygote: zygote::Zygote,
    pool_tx: mpsc::UnboundedSender<crate::pool::PoolEvent>,
    pool_rx: mpsc::UnboundedReceiver<crate::pool::PoolEvent>,
    stops: mpsc::UnboundedReceiver<signals::Stop>,
}

async fn start<T: Transport>(transport: Arc<T>, parts: Parts) -> i32 {
    if let Err(e) = transport.declare(&parts.settings.queues).await {
        error!("Cannot declare queues: {e}");
        return 1;
    }
    println!("{}", banner::render(&parts.app, &parts.settings));
    info!("Connected to {}", parts.app.broker_display);
    run_consumer(transport, parts).await
}

/// `celeriac beat`: what it needs besides the transport.
struct BeatParts {
    app: AppInfo,
    zygote: zygote::Zygote,
    stops: mpsc::UnboundedReceiver<signals::Stop>,
    options: beat::BeatOptions,
}

/// Entry point of `celeriac beat`; returns the process exit code.
pub fn run_beat(cli: &Cli, args: &BeatArgs) -> i32 {
    let log = LogOptions { loglevel: &args.loglevel, format: args.log_format, logfile: args.logfile.clone() };
    let (pending, runtime) = match prepare(cli, &log, beat_zygote_options(cli, args)) {
        Ok(p) => p,
        Err(code) => return code,
    };
    run_to_exit(runtime, async {
        let (pool_tx, _pool_rx) = mpsc::unbounded_channel();
        let (zygote, info) = match pending.bootstrap(pool_tx).await {
            Ok(z) => z,
            Err(e) => {
                error!("{e}");
                return 1;
            }
        };
        let app: AppInfo = match serde_json::from_slice(&info) {
            Ok(a) => a,
            Err(e) => {
                error!("The zygote reported an unreadable configuration: {e}");
                return 1;
            }
        };
        let _pidfile = match args.pidfile.as_deref().map(Pidfile::create).transpose() {
            Ok(p) => p,
            Err(e) => {
                error!("{e}");
                return 1;
            }
        };
        let stops = match signals::listen(false) {
            Ok(s) => s,
            Err(e) => {
                error!("Cannot install signal handlers: {e}");
                return 1;
            }
        };
        let options = beat::BeatOptions {
            schedule_filename: args.schedule.clone(),
            scheduler: args.scheduler.clone(),
            max_interval: args.max_interval,
            standalone: true,
            loglevel: args.loglevel.clone(),
            logfile: args.logfile.clone(),
            leader_lock: !args.without_beat_lock,
        };
        let app_for_connect = app.clone();
        connect_and_run(&app_for_connect, Role::Beat(BeatParts { app, zygote, stops, options })).await
    })
}

/// Run the beat process until a shutdown signal (exit 0, as stock beat) or until it dies.
async fn serve_beat<T: Transport>(transport: Arc<T>, parts: BeatParts) -> i32 {
    let BeatParts { app, mut zygote, mut stops, options } = parts;
    let process = match beat::spawn(&mut zygote, &options).await {
        Ok(p) => p,
        Err(e) => {
            error!("{e}");
            return 1;
        }
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let lock = beat::lock_name(app.main.as_deref());
    let holder = format!("{}.{}", app.hostname, std::process::id());
    let mut leading = tokio::spawn(beat::lead(transport, process, options, lock, holder, stop_rx));
    let code = tokio::select! {
        _ = stops.recv() => {
            let _ = stop_tx.send(true);
            let _ = (&mut leading).await;
            0
        }
        _ = &mut leading => 1,
    };
    zygote.close();
    code
}

/// Connect at start-up, retrying as `broker_connection_retry_on_startup` does.
async fn with_retries<T, F, Fut>(app: &AppInfo, mut connect: F) -> Result<T, TransportError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, TransportError>>,
{
    let max = if app.conf.broker_connection_retry_on_startup {
        app.conf.broker_connection_max_retries.unwrap_or(CONNECT_RETRIES)
    } else {
        0
    };
    let mut delay = Duration::from_millis(500);
    let mut attempt = 0;
    loop {
        match connect().await {
            Ok(t) => return Ok(t),
            Err(e) if attempt < max => {
                attempt += 1;
                error!(
                    "consumer: Cannot connect to {}: {e}.\nTrying again in {:.2} seconds... ({attempt}/{max})",
                    app.broker_display,
                    delay.as_secs_f64()
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            Err(e) => return Err(e),
        }
    }
}

async fn run_consumer<T: Transport>(transport: Arc<T>, parts: Parts) -> i32 {
    let Parts { settings, app, zygote, pool_tx, pool_rx, stops } = parts;
    let prefetch = match settings.prefetch_count() {
        0 => Semaphore::MAX_PERMITS / 2,
        n => n,
    };
    let window = Arc::new(Semaphore::new(prefetch));
    let (stop_tx, stop_rx) = watch::channel(false);
    let (delivery_tx, delivery_rx) = mpsc::channel(DELIVERY_BUFFER);
    let (settle_tx, settle_rx) = mpsc::unbounded_channel();
    let (prefetch_tx, prefetch_rx) = watch::channel(prefetch);
    let (queues_tx, queues_rx) = watch::channel(settings.queues.clone());
    let consuming = transport.clone().consume(queues_rx, window.clone(), prefetch_rx, delivery_tx, stop_rx.clone());
    let maintenance = transport.clone().maintain(stop_rx.clone());
    let (control_tx, control_rx) = mpsc::channel(256);
    let (gossip, gossip_rx) = if settings.gossip {
        let (tx, rx) = mpsc::channel(256);
        // Events older than a heartbeat are of no use (`Gossip.get_consumers`: queue_ttl).
        let ttl_ms = (settings.heartbeat_interval * 1000.0) as u64;
        (Some(transport.clone().subscribe_worker_events(ttl_ms, tx, stop_rx.clone())), Some(rx))
    } else {
        (None, None)
    };
    let stop_rx_beat = stop_rx.clone();
    // Mingle before this node's own mailbox listens (as stock's bootsteps order them), so the
    // mailboxes that take the hello are the other workers' only.
    let mut revoked = app.revoked.clone();
    if settings.mingle {
        revoked.extend(mingle(&*transport, &app, &revoked).await);
    }
    let mailbox = transport.clone().pidbox(app.mailbox(), control_tx, stop_rx);
    let (reply_tx, reply_rx) = mpsc::unbounded_channel();
    let (event_tx, event_rx) = mpsc::unbounded_channel();
    let publisher = tokio::spawn(send_events(transport.clone(), settings.hostname.clone(), event_rx));
    let events = Events::new(
        settings.hostname.clone(),
        app.celery_version.clone(),
        settings.task_events,
        settings.worker_events,
        settings.heartbeat_interval,
        event_tx,
    );
    let replier = tokio::spawn(send_replies(transport.clone(), reply_rx));
    let acking = tokio::spawn(acker::run(transport.clone(), settle_rx, window.clone()));
    let mut zygote = zygote;
    let beat = match &settings.beat {
        Some(options) => match beat::spawn(&mut zygote, options).await {
            Ok(process) => {
                let holder = format!("{}.{}", settings.hostname, std::process::id());
                let lock = beat::lock_name(app.main.as_deref());
                let stop = stop_rx_beat.clone();
                Some(tokio::spawn(beat::lead(transport.clone(), process, options.clone(), lock, holder, stop)))
            }
            Err(e) => {
                error!("{e}");
                None
            }
        },
        None => None,
    };
    let pool = Pool::new(zygote, pool_tx);
    let metrics = Arc::new(Metrics::default());
    let (http_port, http_bind) = (settings.http_port, settings.http_bind.clone());
    let http = http_port.map(|port| tokio::spawn(http::serve(http_bind.clone(), port, metrics.clone())));
    let watcher = tokio::spawn(watch_connection(transport.clone(), metrics.clone()));
    let channels = Channels {
        task_received_receivers: app.task_received_receivers,
        events,
        metrics,
        control: control_rx,
        replies: reply_tx,
        app_conf: app.conf_table.clone(),
        broker_info: app.broker_info.clone(),
        revoked,
        pool_events: pool_rx,
        deliveries: delivery_rx,
        prefetch: prefetch_tx,
        settle: settle_tx,
        window,
        stop_consuming: stop_tx,
        queues: queues_tx,
        known_queues: app.known_queues.clone(),
        gossip: gossip_rx,
    };
    let code = if settings.bare_consumer {
        bare_consume(channels, stops, settings.bare_stamps.as_deref()).await
    } else {
        Consumer::new(settings, app.tasks, pool, channels).run(stops).await
    };
    if let Some(b) = beat {
        let _ = b.await;
    }
    // The consumer dropped its settle sender: the acker drains what is left and ends.
    let _ = consuming.await;
    // From here on every broker connection is being let go of on purpose.
    crate::ops::logging::quiet_broker_client();
    maintenance.abort();
    mailbox.abort();
    if let Some(g) = gossip {
        g.abort();
    }
    watcher.abort();
    if let Some(h) = http {
        h.abort();
    }
    // The consumer is gone and with it the event sender: let the last events (worker-offline) out.
    let _ = tokio::time::timeout(Duration::from_secs(2), publisher).await;
    replier.abort();
    if tokio::time::timeout(Duration::from_secs(10), acking).await.is_err() {
        error!("Timed out acknowledging the last messages; they will be redelivered");
    }
    match transport.restore_all().await {
        Ok(0) => {}
        Ok(n) => info!("Restored {n} message(s) still held at shutdown"),
        Err(e) => error!("Could not restore held messages at shutdown: {e}"),
    }
    code
}

/// The benchmark's ceiling (`--bare-consumer`): every delivery acked as it arrives, through the
/// worker's own transport, prefetch window and acker, until a stop signal; no task runs. With
/// `stamps`, it is also the latency floor: each delivery's task id and arrival time are appended
/// there as it arrives, one unbuffered line each, so the benchmark can count them as they come.
async fn bare_consume(
    channels: Channels,
    mut stops: mpsc::UnboundedReceiver<signals::Stop>,
    stamps: Option<&std::path::Path>,
) -> i32 {
    use std::io::Write;
    let Channels { mut deliveries, settle, stop_consuming, .. } = channels;
    let mut stamps = match stamps.map(|p| std::fs::OpenOptions::new().create(true).append(true).open(p)) {
        Some(Ok(file)) => Some(file),
        Some(Err(e)) => {
            error!("--bare-stamps: {e}");
            let _ = stop_consuming.send(true);
            return 1;
        }
        None => None,
    };
    loop {
        tokio::select! {
            incoming = deliveries.recv() => match incoming {
                Some(crate::transport::Incoming::Delivery(d)) => {
                    if let Some(file) = stamps.as_mut() {
                        let now = crate::transport::now_secs();
                        let id = d.headers.get("id").and_then(serde_json::Value::as_str).unwrap_or("-");
                        let _ = writeln!(file, "{id} {now:.6}");
                    }
                    let _ = settle.send(acker::SettleOp::now(crate::transport::Settle::Ack(d.tag), true));
                }
                Some(crate::transport::Incoming::ConnectionLost) => {}
                None => break,
            },
            _ = stops.recv() => break,
        }
    }
    let _ = stop_consuming.send(true);
    0
}

/// Publish pidbox replies as the consumer produces them, off its loop.
async fn send_replies<T: Transport>(transport: Arc<T>, mut replies: mpsc::UnboundedReceiver<crate::consumer::Reply>) {
    while let Some((to, ticket, clock, body)) = replies.recv().await {
        if let Err(e) = transport.reply(&to, &ticket, clock, &body).await {
            warn!("Could not send a remote-control reply to {}: {e}", to.routing_key);
        }
    }
}

/// Publish events as the consumer produces them, off its loop. Events are transient: one that
/// cannot be published is dropped, as kombu's event dispatcher does.
async fn send_events<T: Transport>(
    transport: Arc<T>,
    hostname: String,
    mut events: mpsc::UnboundedReceiver<crate::control::events::EventMessage>,
) {
    while let Some((routing_key, body)) = events.recv().await {
        if let Err(e) = transport.publish_event(&routing_key, &hostname, &body).await {
            tracing::debug!("event {routing_key} dropped: {e}");
        }
    }
}

/// Keep `/readyz` and the reconnect counter in step with the broker connection.
async fn watch_connection<T: Transport>(transport: Arc<T>, metrics: Arc<Metrics>) {
    use std::sync::atomic::Ordering;
    loop {
        metrics.broker_connected.store(transport.connected(), Ordering::Relaxed);
        metrics.broker_reconnects.store(transport.connections().saturating_sub(1), Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Mingle (`celery/worker/consumer/mingle.py`): say hello to the other workers and take over the
/// ids they have revoked. Replies carry a list (Celery 5.7) or a map of id → time (≤ 5.6).
async fn mingle<T: Transport>(transport: &T, app: &AppInfo, revoked: &[String]) -> Vec<String> {
    info!("mingle: searching for neighbors");
    let hello = serde_json::json!({"from_node": app.hostname, "revoked": revoked});
    let replies = match transport.broadcast(&app.mailbox(), "hello", hello, Duration::from_secs(1)).await {
        Ok(r) => r,
        Err(e) => {
            warn!("mingle: could not ask the other workers: {e}");
            return Vec::new();
        }
    };
    let mut ids = Vec::new();
    let mut nodes = 0;
    for reply in &replies {
        for (node, answer) in reply.as_object().into_iter().flatten() {
            if *node == app.hostname {
                // Stock runs on silently here (on Redis nothing else notices); say it.
                warn!(
                    "mingle: another worker answered as {node}: two workers share this node name. \
                     Give each worker a unique node name with -n (e.g. -n worker1@%h)"
                );
                continue;
            }
            if answer.is_null() {
                continue;
            }
            nodes += 1;
            match answer.get("revoked") {
                Some(serde_json::Value::Array(list)) => {
                    ids.extend(list.iter().filter_map(|v| v.as_str().map(str::to_owned)))
                }
                Some(serde_json::Value::Object(map)) => ids.extend(map.keys().cloned()),
                _ => {}
            }
        }
    }
    if nodes == 0 {
        info!("mingle: all alone");
    } else {
        info!("mingle: sync with {nodes} nodes");
        info!("mingle: sync complete");
    }
    ids
}
