//! Brokers: the one seam between celeriac and RabbitMQ, Redis, SQS or a folder.
//!
//! A transport consumes from a set of queues while the prefetch window has room, and settles
//! each delivery exactly once: ack, reject, requeue (to the back) or restore (to the front,
//! for messages given back unstarted at shutdown).

pub mod amqp;
pub mod envelope;
pub mod filesystem;
pub mod redis;
pub mod sqs;

use std::future::Future;
use std::sync::Arc;

use serde::Deserialize;

pub use crate::control::ReplyTo;
use serde_json::{Map, Value};
use tokio::sync::{mpsc, watch, Semaphore};

pub use celeriac_protocol::Delivery;

/// What a transport hands the consumer.
#[derive(Debug)]
pub enum Incoming {
    Delivery(Box<Delivery>),
    /// The connection dropped: every unsettled delivery from it is void (the broker requeues
    /// them), so the consumer drops what it has not started.
    ConnectionLost,
}

/// How a delivery leaves the worker's hands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settle {
    /// Done with it (also `reject(requeue=False)` on transports without dead-lettering).
    Ack(String),
    /// `reject(requeue=False)`.
    Reject(String),
    /// `reject(requeue=True)`: back of the queue.
    Requeue(String),
    /// Given back unstarted at shutdown: front of the queue, consumed next.
    Restore(String),
    /// The broker already took it back (its connection was lost): only forget it.
    Forget(String),
}

/// The worker's remote-control mailbox (`kombu.pidbox.Mailbox`, `control_*` settings).
#[derive(Debug, Clone)]
pub struct Mailbox {
    pub node: String,
    /// `control_exchange`: the broadcast exchange is `<namespace>.pidbox`.
    pub namespace: String,
    pub queue_expires_ms: Option<u64>,
    pub queue_ttl_ms: Option<u64>,
    pub exclusive: bool,
    pub durable: bool,
}

impl Mailbox {
    pub fn exchange(&self) -> String {
        format!("{}.pidbox", self.namespace)
    }

    pub fn queue(&self) -> String {
        format!("{}.{}.pidbox", self.node, self.namespace)
    }
}

/// What the mailbox hands the consumer.
#[derive(Debug)]
pub enum ControlEvent {
    /// The mailbox is bound and consumed (or could not be, and never will): the worker may
    /// announce itself ready, as stock does only after its pidbox started.
    Listening,
    /// A request: the decoded body and the sender's `clock` header.
    Request(Value, u64),
}

/// The wall clock as Unix seconds, as kombu and Celery stamp time (`time.time()`).
pub fn now_secs() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// A pidbox request as `kombu.pidbox.Mailbox._broadcast` publishes it, and its ticket.
pub fn control_request(method: &str, arguments: Value, reply_exchange: &str, oid: &str) -> (Value, String) {
    let ticket = uuid::Uuid::new_v4().to_string();
    let body = serde_json::json!({
        "method": method,
        "arguments": arguments,
        "destination": null,
        "pattern": null,
        "matcher": null,
        "ticket": ticket,
        "reply_to": {"exchange": reply_exchange, "routing_key": oid},
    });
    (body, ticket)
}

/// Serialize a reply body as kombu's JSON producer would.
pub fn reply_body(body: &Value) -> Vec<u8> {
    serde_json::to_vec(body).unwrap_or_else(|_| b"null".to_vec())
}

/// An event another node published on the `celeryev` exchange.
#[derive(Debug, Clone)]
pub struct PeerEvent {
    pub routing_key: String,
    /// The `hostname` header (protocol 2), else the body's.
    pub hostname: String,
    pub body: Value,
}

impl PeerEvent {
    /// From a decoded body and the message's headers; `None` for anything but a JSON map.
    pub fn new(routing_key: &str, headers_hostname: Option<&str>, body: &[u8]) -> Option<PeerEvent> {
        let body: Value = serde_json::from_slice(body).ok()?;
        let hostname = headers_hostname
            .map(str::to_owned)
            .or_else(|| body.get("hostname").and_then(Value::as_str).map(str::to_owned))?;
        body.is_object().then(|| PeerEvent { routing_key: routing_key.to_owned(), hostname, body })
    }
}

/// A queue the worker consumes from, as the app's `task_queues` / `-Q` define it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct QueueSpec {
    pub name: String,
    #[serde(default)]
    pub exchange: String,
    #[serde(default = "direct")]
    pub exchange_type: String,
    #[serde(default)]
    pub routing_key: String,
    #[serde(default = "yes")]
    pub durable: bool,
    #[serde(default)]
    pub auto_delete: bool,
    #[serde(default)]
    pub exclusive: bool,
    #[serde(default)]
    pub max_priority: Option<u8>,
    /// Queue arguments as kombu sends them (`x-max-priority`, `x-queue-type`, `x-expires`, ...).
    #[serde(default)]
    pub queue_arguments: Map<String, Value>,
    #[serde(default = "yes")]
    pub exchange_durable: bool,
    #[serde(default)]
    pub exchange_auto_delete: bool,
    #[serde(default)]
    pub exchange_arguments: Map<String, Value>,
    #[serde(default)]
    pub binding_arguments: Map<String, Value>,
}

impl QueueSpec {
    /// A queue the app does not define, as `add_consumer` creates it
    /// (`Consumer.add_task_queue`: the exchange and routing key default to the queue's name).
    pub fn from_control(name: &str, args: &Map<String, Value>) -> QueueSpec {
        let text = |k: &str| args.get(k).and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_owned);
        let flag = |k: &str, default: bool| args.get(k).and_then(Value::as_bool).unwrap_or(default);
        let table = |k: &str| args.get(k).and_then(Value::as_object).cloned().unwrap_or_default();
        let queue_arguments = table("queue_arguments");
        QueueSpec {
            name: name.to_owned(),
            exchange: text("exchange").unwrap_or_else(|| name.to_owned()),
            exchange_type: text("exchange_type").unwrap_or_else(direct),
            routing_key: text("routing_key").unwrap_or_else(|| name.to_owned()),
            durable: flag("durable", true),
            auto_delete: flag("auto_delete", false),
            exclusive: flag("exclusive", false),
            max_priority: queue_arguments.get("x-max-priority").and_then(Value::as_u64).map(|p| p.min(255) as u8),
            queue_arguments,
            exchange_durable: flag("exchange_durable", true),
            exchange_auto_delete: flag("exchange_auto_delete", false),
            exchange_arguments: table("exchange_arguments"),
            binding_arguments: table("binding_arguments"),
        }
    }
}

fn direct() -> String {
    "direct".into()
}
fn yes() -> bool {
    true
}

/// A task with nothing to do but wait for the stop: a duty this transport does not have.
pub fn idle_until(mut stop: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let _ = stop.changed().await;
    })
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("unsupported broker URL {0:?} (supported: redis://, amqp://, pyamqp://, amqps://, sqs://, filesystem://)")]
    UnsupportedUrl(String),
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("amqp: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("amqp: {0}")]
    AmqpTask(#[from] amqp::TaskConnectionError),
    #[error("not connected to {0}")]
    Disconnected(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("filesystem: {0}")]
    Folder(String),
    #[error("sqs: {0}")]
    Sqs(String),
}

/// The transport seam. Implementations keep their own record of the deliveries they handed
/// out, so settling needs only the tag.
pub trait Transport: Send + Sync + 'static {
    /// Declare queues and bindings so producers routing through exchanges reach them.
    fn declare(&self, queues: &[QueueSpec]) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Consume from `queues` until `stop` turns true, following changes to the set
    /// (`add_consumer` / `cancel_consumer`: added queues are declared first). One permit of
    /// `window` is taken per delivery and given back when it is settled, which is what bounds
    /// the prefetch; `prefetch` tells brokers that enforce it themselves (AMQP QoS) the count.
    fn consume(
        self: Arc<Self>,
        queues: watch::Receiver<Vec<QueueSpec>>,
        window: Arc<Semaphore>,
        prefetch: watch::Receiver<usize>,
        deliveries: mpsc::Sender<Incoming>,
        stop: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()>;

    /// Settle a batch of deliveries. Each settled delivery gives one permit back to `window`:
    /// the acker does so once the returned future, first polled, is pending or done, so an
    /// implementation should have handed the batch to its connection by then.
    fn settle(&self, batch: Vec<Settle>) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Shutdown: give back every delivery still held (to the front of its queue) and close
    /// the connections.
    fn restore_all(&self) -> impl Future<Output = Result<usize, TransportError>> + Send;

    /// Remote control: deliver the broadcast requests of the `<node>.celery.pidbox` mailbox
    /// until `stop` turns true; `Listening` first, once requests can arrive.
    fn pidbox(
        self: Arc<Self>,
        mailbox: Mailbox,
        requests: mpsc::Sender<ControlEvent>,
        stop: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()>;

    /// Be a remote-control client: broadcast `method` to every node's mailbox and collect the
    /// replies (`{node: reply}` maps) that arrive within `timeout` (mingle's `hello`). Where the
    /// broker says how many mailboxes took the request, collecting ends once each has replied:
    /// stock always waits out `timeout`, even when no other worker exists.
    fn broadcast(
        &self,
        mailbox: &Mailbox,
        method: &str,
        arguments: Value,
        timeout: std::time::Duration,
    ) -> impl Future<Output = Result<Vec<Value>, TransportError>> + Send;

    /// Publish a pidbox reply to a client's reply queue.
    fn reply(
        &self,
        to: &ReplyTo,
        ticket: &str,
        clock: u64,
        body: &Value,
    ) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Publish one event message (a map, or a list for `task.multi`) to the `celeryev`
    /// exchange: topic on AMQP, fanout (PUBLISH) on Redis, as kombu does.
    fn publish_event(
        &self,
        routing_key: &str,
        hostname: &str,
        body: &Value,
    ) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Gossip: deliver the events other nodes publish under `worker.#` until `stop` turns
    /// true, through a queue whose messages live `ttl_ms` (`celery.events.Receiver`).
    fn subscribe_worker_events(
        self: Arc<Self>,
        ttl_ms: u64,
        events: mpsc::Sender<PeerEvent>,
        stop: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()>;

    /// Beat's leader lock (beyond stock): take or renew lock `name` for `holder`, held while
    /// renewed within `ttl`; false while another replica holds it.
    fn beat_lead(
        &self,
        name: &str,
        holder: &str,
        ttl: std::time::Duration,
    ) -> impl Future<Output = Result<bool, TransportError>> + Send;

    /// Give the lock up (clean shutdown), so another replica takes over at once.
    fn beat_resign(&self, name: &str, holder: &str) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// The schedule state the last leader shared, if any.
    fn beat_state(&self, name: &str) -> impl Future<Output = Result<Option<Value>, TransportError>> + Send;

    /// Share the leader's schedule state (each entry's last run) with the next leader.
    fn save_beat_state(&self, name: &str, state: &Value) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Is the consuming connection up right now (for `/readyz`)?
    fn connected(&self) -> bool;

    /// How many consuming connections were established so far (1 + reconnects).
    fn connections(&self) -> u64;

    /// Housekeeping the broker needs while the worker runs (visibility timeouts, ...).
    fn maintain(self: Arc<Self>, stop: watch::Receiver<bool>) -> tokio::task::JoinHandle<()>;
}
