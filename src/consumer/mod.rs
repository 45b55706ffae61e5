//! The consumer: turns deliveries into requests, holds ETA tasks, hands requests to idle pool
//! children and settles each message as the stock worker would (`celery/worker/strategy.py`,
//! `celery/worker/request.py`, reference §3.3 and §5).

pub mod acker;
mod autoscale;
pub mod eta;
mod pipeline;
mod rate_limit;
mod remote_control;
mod request;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use chrono::Utc;
use serde_json::json;
use tokio::sync::{mpsc, watch, Semaphore};
use tracing::{debug, error, info, warn};

use crate::config::{TaskOptions, WorkerSettings};
use crate::control::events::Events;
use crate::control::gossip::Peers;
use crate::control::revoked::RevokedSet;
use crate::control::{ControlRequest, ReplyTo};
use crate::ops::metrics::Metrics;
use crate::ops::signals::Stop;
use crate::pool::frame::{self, Kind};
use crate::pool::{DoneReport, ExitStatus, Pool, PoolEvent};
use crate::transport::{ControlEvent, Delivery, Incoming, PeerEvent, QueueSpec, Settle};
use acker::SettleOp;
use autoscale::Autoscaler;
use celeriac_protocol::{ChildMeta, MessageError, TaskMessage};
use eta::EtaQueue;
use pipeline::Pipeline;
pub use rate_limit::parse_rate;
use rate_limit::RateLimits;
pub use request::{Job, Request};

/// Sleep until `at`, or forever when there is nothing to wait for.
async fn sleep_until_or_never(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The next item of an optional channel; never, without one.
async fn recv_or_never<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// A pool child that keeps dying before it is ready this many times in a row stops the worker.
const MAX_STARTUP_FAILURES: u32 = 10;

pub struct Consumer {
    settings: Arc<WorkerSettings>,
    tasks: HashMap<String, TaskOptions>,
    pool: Pool,
    pool_events: mpsc::UnboundedReceiver<PoolEvent>,
    deliveries: mpsc::Receiver<Incoming>,
    settle: mpsc::UnboundedSender<SettleOp>,
    window: Arc<Semaphore>,
    stop_consuming: watch::Sender<bool>,
    prefetch: watch::Sender<usize>,
    /// Requests (and outcome records) waiting for an idle child, in arrival order.
    ready: VecDeque<Job>,
    eta: EtaQueue<Request>,
    rate_limits: RateLimits<Request>,
    /// The job each busy child is running.
    active: HashMap<usize, Job>,
    /// Requests written to a busy child behind its running job, not started yet (`pipeline`).
    queued: HashMap<usize, pipeline::Queued>,
    pipeline: Pipeline,
    /// Jobs of children whose socket closed, waiting for the zygote's exit report.
    lost: HashMap<i32, (usize, Job)>,
    /// Exit reports that arrived before the child's socket closed.
    exits: HashMap<i32, ExitStatus>,
    /// Remote control: requests from the pidbox, replies to the replier task.
    control: mpsc::Receiver<ControlEvent>,
    mailbox_listening: bool,
    replies: mpsc::UnboundedSender<Reply>,
    revoked: RevokedSet,
    /// Lamport clock shared with other nodes through pidbox messages.
    clock: u64,
    started: std::time::Instant,
    /// Tasks started, by name (`inspect stats` → `total`).
    totals: HashMap<String, u64>,
    /// `inspect conf` and `stats.broker`, as the zygote reported them.
    app_conf: serde_json::Value,
    broker_info: serde_json::Value,
    events: Events,
    metrics: Arc<Metrics>,
    next_heartbeat: tokio::time::Instant,
    /// Tasks finished (`processed` in heartbeats).
    processed: u64,
    /// MainProcess signals for the zygote to send (`worker_ready`, `worker_shutting_down`).
    worker_signals: Vec<serde_json::Value>,
    /// Requests waiting for their `task_received` handlers (in the zygote), in order, and the
    /// frames still to send.
    task_received_receivers: bool,
    awaiting_received: VecDeque<Request>,
    received_signals: Vec<Vec<u8>>,
    /// Acknowledgements still to come for requests taken out of `awaiting_received`.
    stale_received_acks: usize,
    /// `worker_shutting_down` was sent and its handlers have not reported done yet.
    shutting_down_pending: bool,
    /// The zygote died: its children died with it (parent-death signal) and nothing it would
    /// report (exits, signal handlers done) will come; shutdown waits for none of it.
    zygote_gone: bool,
    /// `--shutdown-timeout`: when a warm shutdown stops waiting for running tasks.
    shutdown_deadline: Option<tokio::time::Instant>,
    /// Pool size now (`-c`, changed by `pool_grow` / `pool_shrink`).
    concurrency: usize,
    startup_failures: u32,
    announced_ready: bool,
    stopping: Option<Stop>,
    /// The queues consumed from now (`add_consumer` / `cancel_consumer` change the set; the
    /// transport follows it), and every queue the app defines.
    queues: watch::Sender<Vec<QueueSpec>>,
    known_queues: Vec<QueueSpec>,
    /// Gossip: other workers' events, and who is alive.
    gossip: Option<mpsc::Receiver<PeerEvent>>,
    peers: Peers,
    autoscaler: Option<Autoscaler>,
}

/// A pidbox reply: where, ticket, clock, body.
pub type Reply = (ReplyTo, String, u64, serde_json::Value);

pub struct Channels {
    pub task_received_receivers: bool,
    pub events: Events,
    pub metrics: Arc<Metrics>,
    pub control: mpsc::Receiver<ControlEvent>,
    pub replies: mpsc::UnboundedSender<Reply>,
    pub app_conf: serde_json::Value,
    pub broker_info: serde_json::Value,
    /// Revoked ids restored from `--statedb`.
    pub revoked: Vec<String>,
    pub pool_events: mpsc::UnboundedReceiver<PoolEvent>,
    pub deliveries: mpsc::Receiver<Incoming>,
    /// The prefetch count brokers that enforce it should apply (raised per waiting ETA task).
    pub prefetch: watch::Sender<usize>,
    pub settle: mpsc::UnboundedSender<SettleOp>,
    pub window: Arc<Semaphore>,
    pub stop_consuming: watch::Sender<bool>,
    pub queues: watch::Sender<Vec<QueueSpec>>,
    pub known_queues: Vec<QueueSpec>,
    pub gossip: Option<mpsc::Receiver<PeerEvent>>,
}

impl Consumer {
    pub fn new(settings: Arc<WorkerSettings>, tasks: HashMap<String, TaskOptions>, pool: Pool, ch: Channels) -> Self {
        let concurrency = settings.concurrency;
        let autoscaler = settings.autoscale.map(|range| Autoscaler::new(range, tokio::time::Instant::now()));
        let peers = Peers::new(&settings.hostname);
        let pipeline = Pipeline::new(settings.pipeline_max_runtime);
        Consumer {
            settings,
            tasks,
            pool,
            pool_events: ch.pool_events,
            deliveries: ch.deliveries,
            settle: ch.settle,
            window: ch.window,
            stop_consuming: ch.stop_consuming,
            prefetch: ch.prefetch,
            ready: VecDeque::new(),
            eta: EtaQueue::default(),
            rate_limits: RateLimits::default(),
            active: HashMap::new(),
            queued: HashMap::new(),
            pipeline,
            lost: HashMap::new(),
            exits: HashMap::new(),
            control: ch.control,
            mailbox_listening: false,
            replies: ch.replies,
            revoked: RevokedSet::from_ids(RevokedSet::from_env(), &ch.revoked),
            clock: 0,
            started: std::time::Instant::now(),
            totals: HashMap::new(),
            app_conf: ch.app_conf,
            broker_info: ch.broker_info,
            events: ch.events,
            metrics: ch.metrics,
            next_heartbeat: tokio::time::Instant::now(),
            processed: 0,
            worker_signals: Vec::new(),
            shutting_down_pending: false,
            zygote_gone: false,
            task_received_receivers: ch.task_received_receivers,
            awaiting_received: VecDeque::new(),
            received_signals: Vec::new(),
            stale_received_acks: 0,
            shutdown_deadline: None,
            concurrency,
            startup_failures: 0,
            announced_ready: false,
            stopping: None,
            queues: ch.queues,
            known_queues: ch.known_queues,
            gossip: ch.gossip,
            peers,
            autoscaler,
        }
    }

    /// Run until shut down; returns the process exit code.
    pub async fn run(mut self, mut signals: mpsc::UnboundedReceiver<Stop>) -> i32 {
        // Configuration, connecting and the zygote's bootstrap are done: their code pages go
        // before the children start, the moment the whole worker's memory is highest.
        crate::ops::resident::release_startup_pages();
        for _ in 0..self.concurrency {
            if let Err(e) = self.pool.spawn_child().await {
                error!("Unrecoverable error: {e}");
                return 1;
            }
        }
        loop {
            let next_eta = self
                .eta
                .next_due()
                .map(|due| tokio::time::Instant::now() + (due - Utc::now()).to_std().unwrap_or_default());
            let eta_sleep = sleep_until_or_never(next_eta);
            let rate_sleep = sleep_until_or_never(self.rate_limits.next_wake());
            let heartbeat = tokio::time::sleep_until(self.next_heartbeat);
            let deadline_sleep = sleep_until_or_never(self.shutdown_deadline);
            let limit_sleep = sleep_until_or_never(self.next_time_limit());
            let autoscale_sleep = sleep_until_or_never(self.autoscaler.as_ref().map(|a| a.next_check));
            tokio::select! {
                Some(incoming) = self.deliveries.recv(), if self.stopping.is_none() => match incoming {
                    Incoming::Delivery(delivery) => {
                        self.on_delivery(*delivery);
                        self.autoscale(false);
                    }
                    Incoming::ConnectionLost => self.on_connection_lost(),
                },
                Some(event) = self.pool_events.recv() => {
                    if let Err(code) = self.on_pool_event(event).await {
                        return self.finish(Stop::Cold, code).await;
                    }
                }
                Some(stop) = signals.recv() => self.begin_stop(stop),
                Some(event) = self.control.recv() => match event {
                    ControlEvent::Listening => {
                        self.mailbox_listening = true;
                        self.maybe_announce_ready();
                    }
                    ControlEvent::Request(body, clock) => match ControlRequest::parse(&body, clock) {
                        Some(request) => self.on_control(request),
                        None => warn!("pidbox: not a control request, ignored: {body}"),
                    },
                },
                _ = eta_sleep => self.release_due(),
                _ = limit_sleep => self.enforce_time_limits(),
                _ = rate_sleep => self.release_rate_limited(),
                _ = heartbeat, if self.announced_ready => {
                    self.send_heartbeat();
                    self.peers.sweep(std::time::Instant::now());
                }
                Some(event) = recv_or_never(&mut self.gossip) => {
                    if let Some(clock) = self.peers.observe(&event, std::time::Instant::now()) {
                        self.clock = self.clock.max(clock) + 1;
                    }
                }
                _ = autoscale_sleep => self.autoscale(true),
                _ = deadline_sleep => return self.shutdown_deadline_passed().await,
            }
            self.resize_pool().await;
            self.dispatch().await;
            self.events.flush();
            self.send_worker_signals().await;
            self.update_gauges();
            match self.stopping {
                Some(Stop::Cold) => return self.finish(Stop::Cold, 1).await,
                Some(warm @ Stop::Warm { exit_code }) if self.warm_shutdown_done() => {
                    return self.finish(warm, exit_code).await
                }
                _ => {}
            }
        }
    }

    /// Nothing runs, nothing waits for a child, and no task whose child died still waits for
    /// that child's exit status to be recorded as lost. Without the zygote no child can record
    /// anything any more: done once the running ones are gone.
    fn warm_shutdown_done(&self) -> bool {
        self.active.is_empty() && (self.zygote_gone || self.ready.is_empty() && self.lost.is_empty())
    }

    /// Stopping, or about to: a stop signal has arrived even if it has not reached us yet.
    fn shutting_down(&self) -> bool {
        self.stopping.is_some() || crate::ops::signals::stop_signalled()
    }

    fn settle(&self, op: Settle, frees_slot: bool) {
        self.hand_to_acker(SettleOp::now(op, frees_slot));
    }

    fn hand_to_acker(&self, op: SettleOp) {
        if self.settle.send(op).is_err() {
            error!("acknowledgements stopped: a message will be redelivered");
        }
    }

    fn on_delivery(&mut self, delivery: Delivery) {
        let message = match TaskMessage::parse(&delivery) {
            Ok(m) => m,
            Err(e) => return self.on_bad_message(delivery, e),
        };
        let Some(options) = self.tasks.get(&message.name).cloned() else {
            return self.on_unknown_task(delivery, message);
        };
        if !self.settings.accepts(&delivery.content_type) {
            let detail = format!(
                "Refusing to deserialize untrusted content of type {} (content type not in accept_content)",
                delivery.content_type
            );
            return self.reject_invalid(delivery, &detail, Some(message.id), Some(message.name), "ContentDisallowed");
        }
        info!(task_id = %message.id, task = %message.name, state = "RECEIVED", "Task {}[{}] received", message.display_name(), message.id);
        self.metrics.task(&message.name, "received");
        let request = Request::new(delivery, message, options);
        if let Some(why) = self.revoked_reason(&request) {
            return self.discard_revoked(request, why);
        }
        let message = &request.message;
        self.events.task(&mut self.clock, "task-received", || {
            json!({
                "uuid": message.id, "name": message.display_name(), "args": message.argsrepr, "kwargs": message.kwargsrepr,
                "root_id": message.root_id, "parent_id": message.parent_id, "retries": message.retries,
                "eta": message.eta.map(|t| t.to_rfc3339()), "expires": message.expires.map(|t| t.to_rfc3339()),
            })
        });
        if self.task_received_receivers {
            // `task_received` runs before the request is scheduled, as in the stock strategy.
            let frame = ChildMeta::task_frame(&request.delivery, &request.message, &self.settings.hostname);
            self.received_signals.push(frame[5..].to_vec());
            self.awaiting_received.push_back(request);
            return;
        }
        self.schedule(request);
    }

    /// Settle every request held but not started (ready, waiting for an ETA or a rate limit,
    /// or for its `task_received` handlers) with `how`; outcome records stay. Returns how many.
    fn release_unstarted(&mut self, how: fn(String) -> Settle) -> usize {
        let mut n = 0;
        for job in std::mem::take(&mut self.ready) {
            match job {
                Job::Task(r) => {
                    self.settle(how(r.delivery.tag), !r.eta_bumped);
                    n += 1;
                }
                record @ Job::Record(_) => self.ready.push_back(record),
            }
        }
        let held = self.eta.drain();
        self.prefetch.send_modify(|p| *p = p.saturating_sub(held.len()));
        let limited = self.rate_limits.drain();
        let awaiting = self.take_awaiting_received();
        for r in held.into_iter().chain(limited).chain(awaiting) {
            // An ETA request got its prefetch slot back when it started waiting.
            let frees = !r.eta_bumped;
            self.settle(how(r.delivery.tag), frees);
            n += 1;
        }
        n
    }

    /// Take the requests waiting for `task_received` (shutdown, connection loss); the zygote's
    /// answers for the frames already sent are then skipped.
    fn take_awaiting_received(&mut self) -> Vec<Request> {
        let unsent = std::mem::take(&mut self.received_signals).len();
        self.stale_received_acks += self.awaiting_received.len().saturating_sub(unsent);
        self.awaiting_received.drain(..).collect()
    }

    /// After receipt: wait for the ETA, or get ready to run.
    fn schedule(&mut self, request: Request) {
        match request.message.eta {
            Some(due) if due > Utc::now() => self.hold_until_eta(due, request),
            _ => self.make_ready(request),
        }
    }

    /// An ETA request waits unacked; the prefetch window grows by one meanwhile, as stock's
    /// `qos.increment_eventually()` does, so waiting tasks don't starve the pool.
    fn hold_until_eta(&mut self, due: chrono::DateTime<Utc>, mut request: Request) {
        request.eta_bumped = true;
        self.window.add_permits(1);
        self.eta.push(due, request);
        self.prefetch.send_modify(|p| *p += 1);
    }

    fn release_due(&mut self) {
        let due = self.eta.pop_due(Utc::now());
        if !due.is_empty() {
            self.prefetch.send_modify(|p| *p = p.saturating_sub(due.len()));
        }
        for request in due {
            self.make_ready(request);
        }
    }

    /// A request that may run now, unless its task's rate limit makes it wait.
    fn make_ready(&mut self, mut request: Request) {
        request.ready_since = tokio::time::Instant::now();
        let rate = if self.settings.disable_rate_limits { None } else { request.options.rate_per_second() };
        let admitted = match rate {
            Some(rate) => {
                let name = request.message.name.clone();
                self.rate_limits.admit(&name, rate, request, tokio::time::Instant::now())
            }
            None => Some(request),
        };
        if let Some(request) = admitted {
            self.ready.push_back(Job::Task(Box::new(request)));
        }
    }

    fn release_rate_limited(&mut self) {
        for request in self.rate_limits.release(tokio::time::Instant::now()) {
            self.ready.push_back(Job::Task(Box::new(request)));
        }
    }

    /// The broker took back everything the lost connection delivered (`Consumer.on_close`):
    /// forget what has not started; running tasks go on, their settlement becomes a no-op.
    fn on_connection_lost(&mut self) {
        let dropped = self.release_unstarted(Settle::Forget);
        if dropped > 0 {
            warn!("Dropped {dropped} prefetched message(s) of the lost connection; the broker redelivers them");
        }
        self.cancel_unackable_tasks();
    }

    /// Running `acks_late` tasks can no longer be acked on the new connection and will be
    /// redelivered. With `worker_cancel_long_running_tasks_on_connection_loss` they are
    /// terminated and marked RETRY now, as stock does; otherwise they finish and run twice.
    fn cancel_unackable_tasks(&mut self) {
        let mut cancel = Vec::new();
        for (index, job) in self.active.iter_mut() {
            if let Job::Task(r) = job {
                if r.options.acks_late && !r.cancelled {
                    if !self.settings.cancel_long_running_on_connection_loss {
                        warn!(
                            "Task {}[{}] runs with late acknowledgement and can't be acknowledged after the \
                             connection loss: the broker will deliver it again. Set \
                             worker_cancel_long_running_tasks_on_connection_loss to terminate such tasks instead.",
                            r.message.display_name(),
                            r.message.id
                        );
                        continue;
                    }
                    warn!(
                        "Task {}[{}] cannot be acknowledged after a connection loss since late acknowledgement \
                         is enabled for it.\nTerminating it instead.",
                        r.message.display_name(),
                        r.message.id
                    );
                    r.cancelled = true;
                    cancel.push((*index, r.child_meta_value(&self.settings.hostname), r.message.clone()));
                }
            }
        }
        for (index, meta, message) in cancel {
            self.pool.signal(index, nix::sys::signal::Signal::SIGTERM);
            self.ready.push_back(Job::Record(json!({
                "reason": "cancelled",
                "id": message.id,
                "name": message.name,
                "meta": meta,
            })));
        }
    }

    fn on_bad_message(&mut self, delivery: Delivery, err: MessageError) {
        match err {
            MessageError::UnknownFormat(detail) => {
                warn!("Received and deleted unknown message.  Wrong destination?!?\n\nThe full contents of the message body was: {detail}");
                self.settle(Settle::Reject(delivery.tag), true);
            }
            MessageError::Decode(detail) => {
                error!(
                    "Can't decode message body: {detail} [type:{:?} encoding:{:?} headers:{}]\n\nbody: {}",
                    delivery.content_type,
                    delivery.content_encoding,
                    delivery.headers,
                    String::from_utf8_lossy(&delivery.body[..delivery.body.len().min(1024)])
                );
                self.settle(Settle::Ack(delivery.tag), true);
            }
            MessageError::Invalid { detail, id, name } => {
                self.reject_invalid(delivery, &detail, id, name, "InvalidTaskError")
            }
        }
    }

    /// `Consumer.on_invalid_task`: log and reject. Beyond stock, which leaves the result
    /// PENDING forever, the failure (`exception`: InvalidTaskError or ContentDisallowed) is
    /// stored for whoever waits on it when the message names its task id.
    fn reject_invalid(
        &mut self,
        delivery: Delivery,
        detail: &str,
        id: Option<String>,
        name: Option<String>,
        exception: &str,
    ) {
        let task = format!("{}[{}]", name.as_deref().unwrap_or("?"), id.as_deref().unwrap_or("no id"));
        error!("Received invalid task message {task}: {detail}\nThe message has been ignored and discarded.");
        self.settle(Settle::Reject(delivery.tag.clone()), true);
        if let Some(id) = id {
            self.ready.push_back(Job::Record(json!({
                "reason": "invalid",
                "exception": exception,
                "id": id,
                "name": name,
                "detail": detail,
                "meta": {"headers": delivery.headers, "extras": {
                    "correlation_id": delivery.properties.get("correlation_id"),
                    "reply_to": delivery.properties.get("reply_to"),
                }},
            })));
        }
    }

    /// `Consumer.on_unknown_task`: log, reject, and store FAILURE with `NotRegistered`.
    fn on_unknown_task(&mut self, delivery: Delivery, message: TaskMessage) {
        error!(
            "Received unregistered task of type '{}'.\nThe message has been ignored and discarded.\n\n\
             Did you remember to import the module containing this task?\nOr maybe you're using relative imports?\n\n\
             The full contents of the message headers:\n{}\n\nThe delivery info for this task is:\n{{\"exchange\": {:?}, \"routing_key\": {:?}}}",
            message.name, delivery.headers, delivery.exchange, delivery.routing_key
        );
        let record = json!({
            "reason": "unregistered",
            "id": message.id,
            "name": message.name,
            "root_id": message.root_id,
            "correlation_id": delivery.properties.get("correlation_id"),
            "reply_to": delivery.properties.get("reply_to"),
        });
        let fields = json!({"uuid": message.id, "exception": format!("NotRegistered('{}')", message.name)});
        self.events.task(&mut self.clock, "task-failed", || fields);
        self.settle(Settle::Reject(delivery.tag), true);
        self.ready.push_back(Job::Record(record));
    }

    /// `Request.revoked` for an expired request: stored REVOKED, acked, never run.
    /// `Request.revoked`: expired or revoked requests are acked, stored REVOKED, never run.
    fn discard_revoked(&mut self, request: Request, why: &str) {
        info!("Discarding revoked task: {}[{}]", request.message.display_name(), request.message.id);
        let fields =
            json!({"uuid": request.message.id, "terminated": false, "signum": null, "expired": why == "expired"});
        self.events.task(&mut self.clock, "task-revoked", || fields);
        self.metrics.task(&request.message.name, "revoked");
        let record = json!({
            "reason": "revoked",
            "why": why,
            "id": request.message.id,
            "name": request.message.name,
            "meta": request.child_meta_value(&self.settings.hostname),
        });
        self.settle(Settle::Ack(request.delivery.tag.clone()), !request.eta_bumped);
        self.ready.push_back(Job::Record(record));
    }

    fn update_gauges(&self) {
        let m = &self.metrics;
        Metrics::set(&m.prefetched, self.reserved_requests().count());
        Metrics::set(&m.eta_waiting, self.eta.iter().count());
        Metrics::set(&m.active, self.active.len());
        Metrics::set(&m.children_alive, self.pool.ready_count());
        m.children_ready.store(
            self.stopping.is_none() && self.pool.ready_count() >= self.concurrency,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// `worker-heartbeat` every `freq` seconds (`celery/worker/heartbeat.py`).
    pub(super) fn send_heartbeat(&mut self) {
        self.events.worker(&mut self.clock, "worker-heartbeat", self.active.len(), self.processed);
        self.next_heartbeat =
            tokio::time::Instant::now() + std::time::Duration::from_secs_f64(self.events.freq.max(0.1));
    }

    /// "<node> ready." once every child is up and the mailbox listens (stock's consumer
    /// starts its pidbox before it reports ready).
    fn maybe_announce_ready(&mut self) {
        if !self.announced_ready && self.mailbox_listening && self.pool.ready_count() >= self.concurrency {
            self.announced_ready = true;
            self.events.worker(&mut self.clock, "worker-online", 0, 0);
            self.next_heartbeat =
                tokio::time::Instant::now() + std::time::Duration::from_secs_f64(self.events.freq.max(0.1));
            info!("{} ready.", self.settings.hostname);
            self.worker_signals.push(json!({"signal": "worker_ready"}));
            crate::ops::resident::release_startup_pages();
            // Start-up still runs for a moment after ready (the first deliveries' first paths,
            // the first events, the mailbox's and gossip's first rounds): up to ~1.5 MiB of
            // code more, handed back as it finishes; the steady paths fault back in packed.
            tokio::spawn(async {
                for after_ms in [100, 150, 750, 2000] {
                    tokio::time::sleep(std::time::Duration::from_millis(after_ms)).await;
                    crate::ops::resident::release_startup_pages();
                }
            });
        }
    }

    /// Every request this worker holds: running, reserved, waiting for an ETA.
    fn held_requests(&self) -> impl Iterator<Item = &Request> {
        self.active
            .values()
            .filter_map(Job::task)
            .chain(self.reserved_requests())
            .chain(self.eta.iter().map(|(_, r)| r))
    }

    /// Requests received, not started and not waiting for an ETA (`inspect reserved`): queued
    /// behind a running task, ready, or held by a rate limit.
    fn reserved_requests(&self) -> impl Iterator<Item = &Request> {
        self.queued_requests().chain(self.ready.iter().filter_map(Job::task)).chain(self.rate_limits.iter())
    }

    /// Requests written to busy children behind their running jobs (`pipeline`).
    fn queued_requests(&self) -> impl Iterator<Item = &Request> {
        self.queued.values().flat_map(pipeline::Queued::iter)
    }

    /// Bring the pool to `concurrency` after `pool_grow` / `pool_shrink`. On the way out no
    /// child is replaced (a SIGTERM to the process group kills them with us), but one is kept
    /// while a job still waits for a child: a lost task's WorkerLostError is recorded by one.
    async fn resize_pool(&mut self) {
        let wanted = match self.shutting_down() {
            true => usize::from(!self.ready.is_empty() && !self.zygote_gone),
            false => self.concurrency,
        };
        while self.pool.serving() < wanted {
            if let Err(e) = self.pool.spawn_child().await {
                error!("Could not grow the pool: {e}");
                break;
            }
        }
        while self.pool.serving() > self.concurrency && self.pool.retire_idle() {}
    }

    /// `Autoscaler.maybe_scale`, run on every task message and periodically: the pool size
    /// follows the number of reserved requests; `resize_pool` does the spawning and retiring.
    fn autoscale(&mut self, periodic: bool) {
        let now = tokio::time::Instant::now();
        let qty = self.reserved_count();
        let Some(scaler) = self.autoscaler.as_mut() else { return };
        if periodic {
            scaler.checked(now);
        }
        if self.stopping.is_none() {
            if let Some(target) = scaler.target(qty, self.concurrency, now) {
                self.concurrency = target;
            }
        }
    }

    /// Requests received and not finished, ETA ones excepted (`state.reserved_requests`).
    fn reserved_count(&self) -> usize {
        self.active.values().filter(|j| j.task().is_some()).count() + self.reserved_requests().count()
    }

    /// The prefetch window grows or shrinks by `delta` (`Consumer._update_prefetch_count`).
    fn change_prefetch(&mut self, delta: isize) {
        let step = delta.unsigned_abs();
        if delta > 0 {
            self.window.add_permits(step);
            self.prefetch.send_modify(|p| *p += step);
        } else if delta < 0 {
            self.window.forget_permits(step);
            self.prefetch.send_modify(|p| *p = p.saturating_sub(step).max(1));
        }
    }

    /// `pool_grow` / `pool_shrink`: the prefetch window follows, by `n × multiplier`.
    pub(super) fn resize(&mut self, grow: bool, n: usize) -> bool {
        let step = (n * self.settings.prefetch_multiplier) as isize;
        if grow {
            self.concurrency += n;
            self.change_prefetch(step);
        } else {
            if self.concurrency <= n {
                return false;
            }
            self.concurrency -= n;
            self.change_prefetch(-step);
        }
        true
    }

    /// Checked at receipt and again right before a request starts (`Request.revoked`).
    fn revoked_reason(&self, request: &Request) -> Option<&'static str> {
        if request.is_expired() {
            Some("expired")
        } else if self.revoked.contains(&request.message.id) {
            Some("revoked")
        } else {
            None
        }
    }

    /// Hand waiting jobs to idle children, oldest first; then queue requests behind busy
    /// children's short tasks.
    async fn dispatch(&mut self) {
        self.dispatch_to_idle().await;
        self.queue_behind_running().await;
    }

    /// A task with this id runs in a child now (or is queued behind a running one).
    fn runs_now(&self, id: &str) -> bool {
        self.active.values().filter_map(Job::task).chain(self.queued_requests()).any(|r| r.message.id == id)
    }

    /// The next ready job to hand out: the first whose task id does not run here right now.
    /// `self.retry()` publishes the retry (same id) before its run stores the RETRY state: run
    /// at once by another child, the retry could finish first and have its result overwritten
    /// by that RETRY. It waits for the first run to report instead.
    fn take_ready(&mut self, tasks_only: bool) -> Option<Job> {
        let position = self.ready.iter().position(|job| match job {
            Job::Task(r) => !self.runs_now(&r.message.id),
            Job::Record(_) => !tasks_only,
        })?;
        self.ready.remove(position)
    }

    async fn dispatch_to_idle(&mut self) {
        while !self.ready.is_empty() {
            let Some(index) = self.pool.take_idle() else {
                return;
            };
            let Some(mut job) = self.take_ready(false) else {
                self.pool.put_back_idle(index);
                return;
            };
            let bytes = match &mut job {
                Job::Task(request) => {
                    if let Some(why) = self.revoked_reason(request) {
                        self.pool.put_back_idle(index);
                        if let Job::Task(request) = job {
                            self.discard_revoked(*request, why);
                        }
                        continue;
                    }
                    // The body stays with the request until the write succeeded
                    // (`on_job_started` drops it): a failed write hands it to another child.
                    ChildMeta::task_frame(&request.delivery, &request.message, &self.settings.hostname)
                }
                Job::Record(record) => frame::encode(Kind::MarkFailure, record.to_string().as_bytes()),
            };
            if let Err(e) = self.pool.send(index, &bytes).await {
                // The child is going away; its Gone event will follow. Keep the job.
                warn!("{e}; handing the job to another child");
                self.ready.push_front(job);
                continue;
            }
            self.on_job_started(index, job);
        }
    }

    /// Write the oldest ready requests behind the running task of each busy child whose task
    /// is short, up to `pipeline::MAX_QUEUED` each (`pipeline`); each starts when the one
    /// ahead of it is done.
    async fn queue_behind_running(&mut self) {
        if self.stopping.is_some() {
            return;
        }
        let now = Utc::now().timestamp_micros() as f64 / 1e6;
        // Round by round, so every busy child gets one before any gets a second.
        for _ in 0..pipeline::MAX_QUEUED {
            if !self.ready.iter().any(|job| matches!(job, Job::Task(_))) {
                return;
            }
            let behind: Vec<usize> = self
                .active
                .iter()
                .filter(|(index, job)| {
                    self.queued.get(index).is_none_or(pipeline::Queued::has_room)
                        && job.task().is_some_and(|r| self.pipeline.may_queue_behind(r, now))
                })
                .map(|(index, _)| *index)
                .collect();
            if behind.is_empty() {
                return;
            }
            for index in behind {
                let Some(Job::Task(request)) = self.take_ready(true) else { return };
                if let Some(why) = self.revoked_reason(&request) {
                    self.discard_revoked(*request, why);
                    continue;
                }
                let bytes = ChildMeta::task_frame(&request.delivery, &request.message, &self.settings.hostname);
                if bytes.len() > pipeline::MAX_QUEUED_BYTES {
                    // Fits behind no child: it waits for an idle one.
                    self.ready.push_front(Job::Task(request));
                    return;
                }
                if !self.queued.get(&index).is_none_or(|queue| queue.fits(bytes.len())) {
                    self.ready.push_front(Job::Task(request));
                    continue;
                }
                if let Err(e) = self.pool.send(index, &bytes).await {
                    warn!("{e}; keeping the request for another child");
                    self.ready.push_front(Job::Task(request));
                    continue;
                }
                self.queued.entry(index).or_default().push(request, bytes.len());
                self.metrics.pipelined.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    /// A child started `job`: given to it idle, or queued behind the job it just finished.
    fn on_job_started(&mut self, index: usize, mut job: Job) {
        if let Job::Task(request) = &mut job {
            request.delivery.body = Vec::new(); // the child has it now
            request.start_clocks(self.settings.time_limit, self.settings.soft_time_limit);
            // The name is copied only the first time (this runs for every task).
            match self.totals.get_mut(&request.message.name) {
                Some(total) => *total += 1,
                None => {
                    self.totals.insert(request.message.name.clone(), 1);
                }
            }
            self.events.task(&mut self.clock, "task-started", || json!({"uuid": request.message.id}));
            self.metrics.task(&request.message.name, "started");
            self.metrics.queue_wait(&request.message.name, request.ready_since.elapsed().as_secs_f64());
            // Early ack: the child starts the task now (`Request.on_accepted`).
            if !request.options.acks_late {
                self.hand_to_acker(SettleOp::early_ack(request.delivery.tag.clone(), !request.eta_bumped));
            }
            // `revoke(terminate=True)` that came while it was queued.
            if let Some(signal) = request.terminated.and_then(|sig| nix::sys::signal::Signal::try_from(sig).ok()) {
                self.pool.signal(index, signal);
            } else if self.revoked.contains(&request.message.id) {
                warn!(
                    "Task {}[{}] was revoked after it was queued to its child: it runs",
                    request.message.display_name(),
                    request.message.id
                );
            }
        }
        self.active.insert(index, job);
    }

    async fn on_pool_event(&mut self, event: PoolEvent) -> Result<(), i32> {
        match event {
            PoolEvent::Ready { index, pid } => {
                debug!("ForkPoolWorker-{index} (pid {pid}) ready");
                self.startup_failures = 0;
                self.pool.on_ready(index, pid);
                self.maybe_announce_ready();
            }
            PoolEvent::Done { index, report } => {
                let next = self.queued.get_mut(&index).and_then(pipeline::Queued::pop);
                let first_job = self.pool.on_done(index, report.exiting, next.is_some());
                match self.active.remove(&index) {
                    Some(Job::Task(request)) => {
                        // A child's first run includes its set-up: not what the task typically takes.
                        if let (Some(runtime), false) = (report.runtime, first_job) {
                            self.pipeline.observe(&request.message.name, runtime);
                        }
                        self.on_task_done(*request, &report)
                    }
                    Some(Job::Record(_)) => {}
                    None => warn!("ForkPoolWorker-{index} reported a job it was not given"),
                }
                match next {
                    // A leaving child never reads what was queued behind its last job.
                    Some(request) if report.exiting => {
                        self.requeue_queued(index);
                        self.ready.push_front(Job::Task(request));
                    }
                    Some(request) => self.on_job_started(index, Job::Task(request)),
                    None => {}
                }
            }
            PoolEvent::Gone { index } => {
                let pid = self.pool.on_gone(index);
                let job = self.active.remove(&index);
                // Its running job never reported done, so the child never started these.
                self.requeue_queued(index);
                match (pid, job) {
                    (Some(pid), Some(job)) => match self.exits.remove(&pid) {
                        Some(status) => self.on_job_lost(index, pid, job, &status),
                        None => {
                            self.lost.insert(pid, (index, job));
                        }
                    },
                    (None, _) => {
                        self.startup_failures += 1;
                        error!("ForkPoolWorker-{index} exited before it was ready (see the log above)");
                        if self.startup_failures >= MAX_STARTUP_FAILURES {
                            error!("Pool children keep dying at start-up; stopping the worker");
                            return Err(1);
                        }
                    }
                    (Some(pid), None) => {
                        if !self.shutting_down() {
                            match self.exits.remove(&pid) {
                                Some(status) if !status.is_clean() => {
                                    error!("Process 'ForkPoolWorker-{index}' pid:{pid} exited with '{status}'")
                                }
                                _ => debug!("ForkPoolWorker-{index} (pid {pid}) left; replacing it"),
                            }
                        }
                    }
                }
                if !self.shutting_down() && self.pool.serving() < self.concurrency {
                    self.metrics.child_restarts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if let Err(e) = self.pool.spawn_child().await {
                        error!("Could not replace ForkPoolWorker-{index}: {e}");
                    }
                }
            }
            PoolEvent::Exited { pid, status } => {
                if let Some((index, job)) = self.lost.remove(&pid) {
                    self.on_job_lost(index, pid, job, &status);
                } else if self.pool.has_pid(pid) {
                    self.exits.insert(pid, status);
                } else if !self.shutting_down() && !status.is_clean() {
                    error!("Process pid:{pid} exited with '{status}'");
                }
            }
            PoolEvent::SignalSent(name) if name == "task_received" => {
                if self.stale_received_acks > 0 {
                    self.stale_received_acks -= 1; // for a request we already gave back
                } else if let Some(request) = self.awaiting_received.pop_front() {
                    self.schedule(request);
                }
            }
            PoolEvent::SignalSent(_) => self.shutting_down_pending = false,
            PoolEvent::ZygoteGone => {
                self.zygote_gone = true;
                if self.stopping.is_none() {
                    error!("The zygote process died: no pool children can be started. Stopping.");
                    return Err(1);
                }
            }
        }
        Ok(())
    }

    /// Settle a finished request per its ack policy (reference §3.3).
    fn on_task_done(&mut self, request: Request, report: &DoneReport) {
        if request.timed_out {
            return; // settled when the hard limit fired
        }
        self.processed += 1;
        let uuid = &request.message.id;
        let kind = match report.outcome.as_str() {
            "success" => Some("task-succeeded"),
            "failure" => Some("task-failed"),
            "retry" => Some("task-retried"),
            "rejected" => Some("task-rejected"),
            _ => None,
        };
        if let Some(kind) = kind {
            self.events.task(&mut self.clock, kind, || match kind {
                "task-succeeded" => json!({"uuid": uuid, "result": report.result, "runtime": report.runtime}),
                "task-rejected" => json!({"uuid": uuid, "requeue": report.requeue}),
                _ => json!({"uuid": uuid, "exception": report.exception, "traceback": report.traceback}),
            });
            self.metrics.task(&request.message.name, kind.trim_start_matches("task-"));
        }
        if let Some(runtime) = report.runtime {
            self.metrics.runtime(&request.message.name, runtime);
        }
        let frees = !request.eta_bumped;
        let tag = request.delivery.tag.clone();
        if !request.options.acks_late {
            return; // acked when it started
        }
        let op = match report.outcome.as_str() {
            "failure" if !request.options.acks_on_failure() => Settle::Reject(tag),
            "rejected" if report.requeue => Settle::Requeue(tag),
            "rejected" | "invalid" => Settle::Reject(tag),
            _ => Settle::Ack(tag),
        };
        self.settle(op, frees);
    }

    /// A child died while running a job: `WorkerLostError`, as billiard reports it.
    fn on_job_lost(&mut self, index: usize, pid: i32, job: Job, status: &ExitStatus) {
        error!("Process 'ForkPoolWorker-{index}' pid:{pid} exited with '{status}'");
        match job {
            Job::Record(record) => self.ready.push_back(Job::Record(record)),
            Job::Task(request) if request.timed_out => {
                debug!("task {} was killed for its hard time limit", request.message.id);
            }
            Job::Task(request) if request.terminated.is_some() => {
                // revoke(terminate=True): REVOKED 'terminated', acked (`Request._announce_revoked`).
                let fields = json!({"uuid": request.message.id, "terminated": true, "signum": request.terminated, "expired": false});
                self.events.task(&mut self.clock, "task-revoked", || fields);
                if request.options.acks_late {
                    self.settle(Settle::Ack(request.delivery.tag.clone()), !request.eta_bumped);
                }
                self.ready.push_back(Job::Record(json!({
                    "reason": "revoked",
                    "why": "terminated",
                    "signum": request.terminated,
                    "id": request.message.id,
                    "name": request.message.name,
                    "meta": request.child_meta_value(&self.settings.hostname),
                })));
            }
            Job::Task(request) if request.cancelled => {
                debug!("cancelled task {} ended with its child", request.message.id);
            }
            Job::Task(request) => {
                let detail = format!("Worker exited prematurely: {status}.");
                error!(
                    "Task handler raised error: WorkerLostError('{detail}') [{}[{}]]",
                    request.message.display_name(),
                    request.message.id
                );
                let fields = json!({"uuid": request.message.id, "exception": format!("WorkerLostError('{detail}')"), "traceback": null});
                self.events.task(&mut self.clock, "task-failed", || fields);
                let tag = request.delivery.tag.clone();
                let frees = !request.eta_bumped;
                let opts = &request.options;
                if opts.acks_late && opts.reject_on_worker_lost {
                    self.settle(Settle::Requeue(tag), frees);
                    return;
                }
                if opts.acks_late {
                    let op = if opts.acks_on_failure() { Settle::Ack(tag) } else { Settle::Reject(tag) };
                    self.settle(op, frees);
                }
                self.ready.push_back(Job::Record(json!({
                    "reason": "worker_lost",
                    "id": request.message.id,
                    "name": request.message.name,
                    "detail": detail,
                    "meta": request.child_meta_value(&self.settings.hostname),
                })));
            }
        }
    }

    /// The earliest soft or hard deadline among running tasks.
    fn next_time_limit(&self) -> Option<tokio::time::Instant> {
        self.active
            .values()
            .filter_map(|job| match job {
                Job::Task(r) if !r.timed_out => r.soft_deadline.into_iter().chain(r.hard_deadline).min(),
                _ => None,
            })
            .min()
    }

    /// Soft limit: SIGUSR1 makes the child raise `SoftTimeLimitExceeded` in the task. Hard
    /// limit: the child is killed, FAILURE with `TimeLimitExceeded` stored, the child replaced
    /// (billiard's `TimeoutHandler`, `Request.on_timeout`).
    fn enforce_time_limits(&mut self) {
        let now = tokio::time::Instant::now();
        let mut records = Vec::new();
        for (index, job) in self.active.iter_mut() {
            let Job::Task(r) = job else { continue };
            if r.timed_out {
                continue;
            }
            let (hard, soft) = r.time_limits(self.settings.time_limit, self.settings.soft_time_limit);
            if r.soft_deadline.is_some_and(|d| d <= now) {
                r.soft_deadline = None;
                warn!(
                    "Soft time limit ({}s) exceeded for {}[{}]",
                    soft.unwrap_or(0.0),
                    r.message.display_name(),
                    r.message.id
                );
                self.pool.signal(*index, nix::sys::signal::Signal::SIGUSR1);
            }
            if r.hard_deadline.is_some_and(|d| d <= now) {
                let hard = hard.unwrap_or(0.0);
                error!("Hard time limit ({hard}s) exceeded for {}[{}]", r.message.display_name(), r.message.id);
                let fields =
                    json!({"uuid": r.message.id, "exception": format!("TimeLimitExceeded({hard})"), "traceback": null});
                self.events.task(&mut self.clock, "task-failed", || fields);
                r.timed_out = true;
                self.pool.signal(*index, nix::sys::signal::Signal::SIGKILL);
                if r.options.acks_late {
                    let tag = r.delivery.tag.clone();
                    let op = if r.options.acks_on_timeout() { Settle::Ack(tag) } else { Settle::Requeue(tag) };
                    records.push((Some((op, !r.eta_bumped)), None));
                }
                records.push((
                    None,
                    Some(json!({
                        "reason": "time_limit",
                        "id": r.message.id,
                        "name": r.message.name,
                        "limit": hard,
                        "meta": r.child_meta_value(&self.settings.hostname),
                    })),
                ));
            }
        }
        for (settle, record) in records {
            if let Some((op, frees)) = settle {
                self.settle(op, frees);
            }
            if let Some(record) = record {
                self.ready.push_back(Job::Record(record));
            }
        }
    }

    async fn send_worker_signals(&mut self) {
        for payload in std::mem::take(&mut self.received_signals) {
            if let Err(e) = self.pool.zygote().task_received(&payload).await {
                warn!("Could not send task_received to the zygote: {e}");
            }
        }
        for event in std::mem::take(&mut self.worker_signals) {
            if let Err(e) = self.pool.zygote().worker_signal(&event).await {
                warn!("Could not send {} to the zygote: {e}", event["signal"]);
            }
        }
    }

    fn begin_stop(&mut self, stop: Stop) {
        if self.stopping.is_none() {
            let (how, exitcode) = match stop {
                Stop::Warm { exit_code } => ("Warm", exit_code),
                Stop::Cold => ("Cold", 1),
            };
            // Sent at once, as stock's signal handler does; `finish` waits for its handlers
            // to have run before it stops the children.
            self.worker_signals.push(json!({"signal": "worker_shutting_down", "how": how, "exitcode": exitcode}));
            self.shutting_down_pending = true;
        }
        match stop {
            Stop::Warm { .. } if self.stopping.is_none() => {
                info!("worker: Warm shutdown (MainProcess)");
                self.shutdown_deadline = self
                    .settings
                    .shutdown_timeout
                    .map(|t| tokio::time::Instant::now() + std::time::Duration::from_secs_f64(t));
                let _ = self.stop_consuming.send(true);
                self.give_back_unstarted();
                self.stopping = Some(stop);
            }
            Stop::Warm { .. } => info!("worker: Warm shutdown already in progress"),
            Stop::Cold => {
                info!("worker: Cold shutdown (MainProcess)");
                let _ = self.stop_consuming.send(true);
                self.stopping = Some(Stop::Cold);
            }
        }
    }

    /// Prefetched and ETA-waiting requests go back to the broker at once, to the front of
    /// their queues, so other workers can run them (`QoS.restore_unacked_once`).
    fn give_back_unstarted(&mut self) {
        let mut n = self.release_unstarted(Settle::Restore);
        while let Ok(incoming) = self.deliveries.try_recv() {
            if let Incoming::Delivery(d) = incoming {
                self.settle(Settle::Restore(d.tag), true);
                n += 1;
            }
        }
        if n > 0 {
            info!("Restoring {n} unacknowledged message(s)");
        }
    }

    /// Children about to be killed: what was queued behind their running jobs goes back
    /// (never acked; one a child may just have started runs at least once, never lost).
    fn give_back_queued(&mut self) {
        for r in std::mem::take(&mut self.queued).into_values().flat_map(pipeline::Queued::into_requests) {
            self.settle(Settle::Restore(r.delivery.tag.clone()), !r.eta_bumped);
        }
    }

    /// What was queued behind a child's running job goes back to the front of the ready
    /// queue, in its order: the child will never read it.
    fn requeue_queued(&mut self, index: usize) {
        if let Some(queue) = self.queued.remove(&index) {
            for request in queue.into_requests().rev() {
                self.ready.push_front(Job::Task(request));
            }
        }
    }

    /// `--shutdown-timeout` ran out with tasks still running: `acks_late` ones go back to the
    /// front of their queue, the others (already acked) are marked failed with
    /// `WorkerLostError`, and the worker exits with the warm shutdown's code.
    async fn shutdown_deadline_passed(mut self) -> i32 {
        let exit_code = match self.stopping {
            Some(Stop::Warm { exit_code }) => exit_code,
            _ => 0,
        };
        let mut records = Vec::new();
        self.give_back_queued();
        for (_, job) in self.active.drain() {
            let Job::Task(r) = job else { continue };
            warn!("Shutdown timeout: stopping {}[{}] before it finished", r.message.display_name(), r.message.id);
            if r.options.acks_late {
                let _ = self.settle.send(SettleOp::now(Settle::Restore(r.delivery.tag.clone()), !r.eta_bumped));
            } else {
                records.push(json!({
                    "reason": "worker_lost",
                    "id": r.message.id,
                    "name": r.message.name,
                    "detail": "Worker exited prematurely: the warm shutdown timed out.",
                    "meta": r.child_meta_value(&self.settings.hostname),
                }));
            }
        }
        self.pool.kill_all();
        for record in records {
            if let Err(e) = self.pool.zygote().record(&record).await {
                error!("Could not record the outcome of task {}: {e}", record["id"]);
            }
        }
        self.finish(Stop::Warm { exit_code }, exit_code).await
    }

    async fn finish(mut self, how: Stop, exit_code: i32) -> i32 {
        let _ = self.stop_consuming.send(true);
        // `worker_shutting_down` handlers run before any child is told to stop, as stock.
        if !self.zygote_gone {
            self.send_worker_signals().await;
        }
        if self.shutting_down_pending && !self.zygote_gone {
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
            while let Ok(Some(event)) = tokio::time::timeout_at(deadline, self.pool_events.recv()).await {
                match event {
                    PoolEvent::ZygoteGone => {
                        self.zygote_gone = true;
                        break;
                    }
                    PoolEvent::SignalSent(name) if name != "task_received" => break,
                    // Kept for the wait below: a child may die meanwhile (a process-group SIGTERM).
                    PoolEvent::Exited { pid, status } => {
                        self.exits.insert(pid, status);
                    }
                    _ => {}
                }
            }
        }
        // The children to wait for, counted before the pool forgets them: not those whose exit
        // was already reported, and none when the zygote died (they died with it, and nobody is
        // left to report their exits).
        let mut expected: HashSet<i32> = match self.zygote_gone {
            true => HashSet::new(),
            false => self.pool.pids().into_iter().filter(|pid| !self.exits.contains_key(pid)).collect(),
        };
        if how == Stop::Cold {
            // Running acks_late tasks were never acked: give them back for redelivery.
            for (_, job) in self.active.drain() {
                if let Job::Task(r) = job {
                    if r.options.acks_late {
                        self.settle.send(SettleOp::now(Settle::Restore(r.delivery.tag), false)).ok();
                    }
                }
            }
            self.give_back_queued();
            self.give_back_unstarted();
            self.pool.kill_all();
        } else {
            self.pool.close_all();
        }
        // Wait (briefly) for children to leave so worker_process_shutdown handlers run.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while !expected.is_empty() {
            match tokio::time::timeout_at(deadline, self.pool_events.recv()).await {
                Ok(Some(PoolEvent::Exited { pid, .. })) => {
                    expected.remove(&pid);
                }
                Ok(Some(PoolEvent::ZygoteGone)) => {
                    self.zygote_gone = true;
                    break;
                }
                Ok(None) | Err(_) => break,
                Ok(Some(_)) => {}
            }
        }
        self.events.flush();
        let (active, processed) = (self.active.len(), self.processed);
        self.events.worker(&mut self.clock, "worker-offline", active, processed);
        if self.zygote_gone {
            return exit_code;
        }
        self.worker_signals.push(json!({"signal": "worker_shutdown"}));
        self.send_worker_signals().await;
        let state = json!({"revoked": self.revoked.ids(), "clock": self.clock});
        if let Err(e) = self.pool.zygote().save_state(&state).await {
            warn!("Could not save the worker state: {e}");
        }
        self.pool.zygote().close();
        // Let the zygote finish (it writes the state file) before we exit and take it along.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while let Ok(Some(event)) = tokio::time::timeout_at(deadline, self.pool_events.recv()).await {
            if matches!(event, PoolEvent::ZygoteGone) {
                break;
            }
        }
        exit_code
    }
}
