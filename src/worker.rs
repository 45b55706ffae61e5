//! `celeriac worker`: start the zygote, read the app's configuration, connect to the broker and
//! run the consumer until shutdown.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch, Semaphore};
use tracing::{error, info, warn};

use crate::cli::{Cli, WorkerArgs};
use crate::config::{zygote_options, AppInfo, WorkerSettings};
use crate::consumer::{acker, Channels, Consumer};
use crate::control::events::Events;
use crate::embed::interpreter;
use crate::ops::metrics::Metrics;
use crate::ops::{banner, http, logging, pidfile::Pidfile, signals};
use crate::pool::{zygote, Pool};
use crate::transport::amqp::{AmqpOptions, AmqpTransport};
use crate::transport::redis::{RedisOptions, RedisTransport};
use crate::transport::{Transport, TransportError};

/// Deliveries buffered between the transport and the consumer; the prefetch window is the
/// real bound, this only decouples the two tasks.
const DELIVERY_BUFFER: usize = 1024;
/// `broker_connection_max_retries` default.
const CONNECT_RETRIES: u32 = 100;

/// Entry point; returns the process exit code. Must run before any thread is started.
pub fn run(cli: &Cli, worker: &WorkerArgs) -> i32 {
    if let Err(e) = logging::init(&worker.loglevel, worker.log_format, worker.logfile.as_deref()) {
        eprintln!("celeriac: cannot open the log file: {e}");
        return 1;
    }
    if let Some(dir) = &cli.workdir {
        if let Err(e) = std::env::set_current_dir(dir) {
            error!("Cannot change to --workdir {}: {e}", dir.display());
            return 1;
        }
    }
    if cli.app_locator().is_none() {
        error!("No Celery app given: pass -A/--app (e.g. `celeriac -A core worker`) or set CELERY_APP");
        return 1;
    }
    let python = interpreter::choose(cli.python.as_deref());
    if let Err(msg) = interpreter::check_compatible(&python) {
        error!("{msg}");
        return 1;
    }
    for flag in worker.not_yet.given() {
        warn!("{flag} is accepted for compatibility with `celery worker` but not implemented by celeriac yet; ignoring it");
    }
    // Fork the zygote first: the process must have no threads when it forks.
    let pending = match zygote::start(zygote_options(cli, worker).to_string(), python) {
        Ok(p) => p,
        Err(e) => {
            error!("{e}");
            return 1;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            error!("Cannot start the async runtime: {e}");
            return 1;
        }
    };
    runtime.block_on(supervise(pending, worker.clone()))
}

async fn supervise(pending: zygote::PendingZygote, worker: WorkerArgs) -> i32 {
    let (pool_tx, pool_rx) = mpsc::unbounded_channel();
    let (zygote, info) = match pending.bootstrap(pool_tx.clone()).await {
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
    let settings = match WorkerSettings::resolve(&worker, &app) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            error!("{e}");
            return 1;
        }
    };
    let _pidfile = match worker.pidfile.as_deref().map(Pidfile::create).transpose() {
        Ok(p) => p,
        Err(e) => {
            error!("{e}");
            return 1;
        }
    };
    let stops = match signals::listen() {
        Ok(s) => s,
        Err(e) => {
            error!("Cannot install signal handlers: {e}");
            return 1;
        }
    };
    let scheme = app.broker_url.split("://").next().unwrap_or("").to_owned();
    let parts = Parts { settings, app, zygote, pool_tx, pool_rx, stops };
    match scheme.as_str() {
        "redis" | "redis+socket" | "unix" => {
            let opts = RedisOptions::from_transport_options(&parts.app.conf.broker_transport_options);
            let url = parts.app.broker_url.clone();
            let connected = with_retries(&parts.app, || RedisTransport::connect(&url, opts.clone())).await;
            start(connected, parts).await
        }
        "amqp" | "pyamqp" | "amqps" | "pyamqps" | "librabbitmq" => {
            let conf = &parts.app.conf;
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
            };
            let (url, display) = (parts.app.broker_url.clone(), parts.app.broker_display.clone());
            let connected = with_retries(&parts.app, || AmqpTransport::connect(&url, &display, opts.clone())).await;
            start(connected, parts).await
        }
        _ => {
            error!("{}", TransportError::UnsupportedUrl(parts.app.broker_display.clone()));
            1
        }
    }
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

async fn start<T: Transport>(connected: Result<T, TransportError>, parts: Parts) -> i32 {
    let transport = match connected {
        Ok(t) => Arc::new(t),
        Err(e) => {
            error!("consumer: Cannot connect to {}: {e}", parts.app.broker_display);
            return 1;
        }
    };
    if let Err(e) = transport.declare(&parts.settings.queues).await {
        error!("Cannot declare queues: {e}");
        return 1;
    }
    println!("{}", banner::render(&parts.app, &parts.settings));
    info!("Connected to {}", parts.app.broker_display);
    run_consumer(transport, parts).await
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
    let pool = Pool::new(zygote, pool_tx);
    let mut revoked = app.revoked.clone();
    if settings.mingle {
        revoked.extend(mingle(&*transport, &app, &revoked).await);
    }
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
    let consumer = Consumer::new(settings, app.tasks, pool, channels);
    let code = consumer.run(stops).await;
    // The consumer dropped its settle sender: the acker drains what is left and ends.
    let _ = consuming.await;
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
            if *node == app.hostname || answer.is_null() {
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
