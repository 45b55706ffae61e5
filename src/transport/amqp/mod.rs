//! RabbitMQ over AMQP 0-9-1, declaring exactly what kombu declares (reference §3) so a stock
//! worker and celeriac can share a vhost without PRECONDITION_FAILED. Tasks are consumed on a
//! connection of celeriac's own client (`connection.rs`); remote control, events, gossip, mingle
//! and beat's lock use lapin.
//!
//! Delivery tags are only valid on the channel that delivered them, so celeriac's tags are
//! `<connection epoch>.<amqp tag>`: after a reconnect, settling a tag of an earlier epoch is a
//! no-op (the broker has already requeued that message).

mod connection;
mod content;
mod fields;
pub mod url;

pub use connection::Error as TaskConnectionError;
use connection::{Event, RawDelivery, TaskConnection};

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_lite::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicRejectOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::uri::AMQPUri;
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, watch, Semaphore};
use tracing::{debug, error, info, warn};

use super::{
    control_request, reply_body, ControlEvent, Delivery, Incoming, Mailbox, PeerEvent, QueueSpec, ReplyTo, Settle,
    Transport, TransportError,
};

/// Connection settings from the app's configuration (`broker_heartbeat`, ...).
#[derive(Debug, Clone)]
pub struct AmqpOptions {
    /// PEM file of the CA to trust for `amqps://` (`broker_use_ssl['ca_certs']`); otherwise
    /// the system's roots.
    pub tls_ca_file: Option<String>,
    pub heartbeat: Option<u16>,
    pub connect_timeout_ms: Option<u64>,
    pub max_retries: Option<u32>,
    /// `broker_transport_options['frame_max']`, which kombu hands to py-amqp: the frames the
    /// task connection asks for (otherwise `url::TASK_FRAME_MAX`).
    pub frame_max: Option<u32>,
}

/// The task connection of one epoch, and (until the consume loop takes them) its events.
struct Session {
    epoch: u64,
    connection: TaskConnection,
    events: Option<mpsc::Receiver<Event>>,
}

pub struct AmqpTransport {
    /// Failover list (`broker_url` may name several brokers, `;`-separated).
    uris: Vec<AMQPUri>,
    display: String,
    options: AmqpOptions,
    session: tokio::sync::Mutex<Option<Session>>,
    epoch: AtomicU64,
    /// The largest frame the task connection asks for.
    task_frame_max: u32,
    /// (epoch, delivery tag) handed out and not yet settled, in delivery order.
    held: Mutex<BTreeSet<(u64, u64)>>,
    /// Consumer tags of the current connection, cancelled before messages are given back; a
    /// broker cancellation of a tag still here means its queue went away.
    consumer_tags: Mutex<Vec<String>>,
    /// The remote-control connection's channel, also used to publish replies.
    pidbox_channel: tokio::sync::Mutex<Option<(Arc<Connection>, Channel)>>,
    /// Beat's leader lock: the connection whose exclusive queue is the lock, and a channel.
    beat_lock: tokio::sync::Mutex<Option<(Arc<Connection>, Channel)>>,
    /// Consumers are up on a live connection.
    consuming: std::sync::atomic::AtomicBool,
    connections: std::sync::atomic::AtomicU64,
    /// Every connection opened and not yet seen closed: closed at shutdown, while the runtime
    /// their I/O is registered with still runs.
    opened: Mutex<Vec<Arc<Connection>>>,
}

#[derive(Debug, thiserror::Error)]
enum PidboxError {
    #[error("another node with this name holds the mailbox")]
    NodeInUse,
    #[error(transparent)]
    Broker(#[from] lapin::Error),
    #[error("{0}")]
    Other(String),
}

/// Quorum queues cannot take a global QoS (`Tasks.qos_global`).
fn uses_quorum(queues: &[QueueSpec]) -> bool {
    queues.iter().any(|q| q.queue_arguments.get("x-queue-type").and_then(Value::as_str) == Some("quorum"))
}

/// How the prefetch limit is given to RabbitMQ (`basic.qos`).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Qos {
    /// Channel-wide (`global`), as stock sets it on RabbitMQ (`Tasks.qos_global`).
    Channel,
    /// On the one consumer: with one queue consumed the same limit, and cheaper for RabbitMQ,
    /// which then has no channel-wide limiter to consult for each delivery (~8 µs of its CPU a
    /// message in the benchmark's drain). RabbitMQ applies a changed per-consumer limit only
    /// to consumers started later, so the first change of the prefetch count (ETA tasks,
    /// autoscale) or of the queue set moves the channel to `Channel`.
    Consumer,
    /// Quorum queues take no global QoS: per consumer, and changes are not applied (stock
    /// disables `qos_global` for them the same way).
    QuorumConsumer,
}

impl Qos {
    fn for_queues(queues: &[QueueSpec]) -> Qos {
        if uses_quorum(queues) {
            Qos::QuorumConsumer
        } else if queues.len() == 1 {
            Qos::Consumer
        } else {
            Qos::Channel
        }
    }
}

/// One `basic.ack(multiple=true)` can settle a batch when the acks cover the oldest held
/// deliveries without a gap: returns the highest tag of that gap-free run (at least two).
/// `not_acked` is every other tag still unsettled on the channel; one below an ack breaks the run.
fn multiple_ack_cutoff(not_acked: impl Iterator<Item = u64>, acks: &BTreeSet<u64>) -> Option<u64> {
    let first_gap = not_acked.min();
    let run: Vec<u64> = acks.iter().copied().take_while(|t| first_gap.is_none_or(|g| *t < g)).collect();
    (run.len() >= 2).then(|| run[run.len() - 1])
}

fn split_tag(tag: &str) -> Option<(u64, u64)> {
    let (epoch, tag) = tag.split_once('.')?;
    Some((epoch.parse().ok()?, tag.parse().ok()?))
}

/// The delivery as kombu's py-amqp Message shows it: the properties gain `delivery_info`.
fn to_delivery(epoch: u64, d: RawDelivery) -> Delivery {
    let RawDelivery { deliver, content, body } = d;
    let mut properties = content.properties;
    properties.insert(
        "delivery_info".into(),
        serde_json::json!({
            "exchange": deliver.exchange, "routing_key": deliver.routing_key, "redelivered": deliver.redelivered,
        }),
    );
    Delivery {
        tag: format!("{epoch}.{}", deliver.delivery_tag),
        exchange: deliver.exchange,
        routing_key: deliver.routing_key,
        redelivered: deliver.redelivered,
        content_type: content.content_type,
        content_encoding: content.content_encoding,
        headers: content.headers,
        properties,
        body,
    }
}

impl AmqpTransport {
    pub async fn connect(url: &str, display: &str, options: AmqpOptions) -> Result<Self, TransportError> {
        let uris: Vec<AMQPUri> = url
            .split(';')
            .filter(|u| !u.trim().is_empty())
            .map(|u| url::parse(u.trim(), options.heartbeat, options.connect_timeout_ms))
            .collect::<Option<_>>()
            .ok_or_else(|| TransportError::UnsupportedUrl(display.to_owned()))?;
        // 0 is AMQP's "no limit": the largest we ever ask for.
        let task_frame_max = match options.frame_max {
            None | Some(0) => url::TASK_FRAME_MAX,
            Some(f) => f.max(url::FRAME_MIN_SIZE),
        };
        let t = AmqpTransport {
            uris,
            display: display.to_owned(),
            options,
            session: tokio::sync::Mutex::new(None),
            epoch: AtomicU64::new(0),
            task_frame_max,
            held: Mutex::new(BTreeSet::new()),
            consumer_tags: Default::default(),
            pidbox_channel: tokio::sync::Mutex::new(None),
            beat_lock: tokio::sync::Mutex::new(None),
            consuming: Default::default(),
            connections: Default::default(),
            opened: Default::default(),
        };
        let session = t.open_session(0).await?;
        *t.session.lock().await = Some(session);
        Ok(t)
    }

    fn held(&self) -> std::sync::MutexGuard<'_, BTreeSet<(u64, u64)>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Connect to the `attempt`-th broker of the failover list (round robin), asking for
    /// frames of at most `frame_max` bytes (`task_frame_max` for the connection that consumes
    /// tasks).
    async fn connect_to(&self, attempt: usize, name: &str, frame_max: u32) -> Result<Arc<Connection>, TransportError> {
        let mut uri = self.uris[attempt % self.uris.len()].clone();
        uri.query.frame_max = Some(frame_max);
        // lapin's own tasks and socket readiness on our tokio runtime rather than on
        // async-global-executor's and async-io's threads: fewer thread hand-offs per delivery.
        let props = ConnectionProperties::default()
            .with_connection_name(name.into())
            .with_executor(tokio_executor_trait::Tokio::current())
            .with_reactor(tokio_reactor_trait::Tokio);
        let mut tls = lapin::tcp::OwnedTLSConfig::default();
        if let Some(path) = &self.options.tls_ca_file {
            let pem = std::fs::read_to_string(path)
                .map_err(|e| TransportError::Tls(format!("cannot read broker_use_ssl ca_certs {path}: {e}")))?;
            tls.cert_chain = Some(pem);
        }
        let connection = Arc::new(Connection::connect_uri_with_config(uri, props, tls).await?);
        let mut opened = self.opened.lock().unwrap_or_else(|p| p.into_inner());
        opened.retain(|c| c.status().connected());
        opened.push(connection.clone());
        Ok(connection)
    }

    async fn open_session(&self, attempt: usize) -> Result<Session, TransportError> {
        let uri = &self.uris[attempt % self.uris.len()];
        let (tx, events) = mpsc::channel(1024);
        let connection =
            TaskConnection::open(uri, "celeriac", self.task_frame_max, self.options.tls_ca_file.as_deref(), tx).await?;
        let epoch = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        Ok(Session { epoch, connection, events: Some(events) })
    }

    /// Reconnect with back-off until it works or `broker_connection_max_retries` runs out.
    async fn reconnect(&self, stop: &watch::Receiver<bool>) -> Option<Session> {
        let mut delay = Duration::from_millis(200);
        let mut attempt = 0usize;
        loop {
            if *stop.borrow() {
                return None;
            }
            match self.open_session(attempt).await {
                Ok(s) => return Some(s),
                Err(e) => {
                    attempt += 1;
                    if self.options.max_retries.is_some_and(|max| attempt as u32 > max) {
                        error!("consumer: Cannot connect to {}: {e}. Giving up.", self.display);
                        return None;
                    }
                    error!(
                        "consumer: Cannot connect to {}: {e}.\nTrying again in {:.2} seconds... ({attempt})",
                        self.display,
                        delay.as_secs_f64()
                    );
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    async fn declare_on(connection: &TaskConnection, queues: &[QueueSpec]) -> Result<(), connection::Error> {
        for q in queues {
            if !q.exchange.is_empty() {
                let arguments = fields::table_from_json(&q.exchange_arguments);
                connection
                    .exchange_declare(
                        &q.exchange,
                        &q.exchange_type,
                        q.exchange_durable,
                        q.exchange_auto_delete,
                        arguments,
                    )
                    .await?;
            }
            let arguments = fields::table_from_json(&q.queue_arguments);
            connection.queue_declare(&q.name, q.durable, q.exclusive, q.auto_delete, arguments).await?;
            if !q.exchange.is_empty() {
                let arguments = fields::table_from_json(&q.binding_arguments);
                connection.queue_bind(&q.name, &q.exchange, &q.routing_key, arguments).await?;
            }
        }
        Ok(())
    }

    /// Connect the mailbox: the `<ns>.pidbox` fanout exchange and this node's exclusive queue,
    /// declared as kombu declares them, consumed without acks.
    async fn open_pidbox(&self, mailbox: &Mailbox, attempt: usize) -> Result<lapin::Consumer, PidboxError> {
        let connection =
            self.connect_to(attempt, "celeriac-pidbox", url::SMALL_FRAME_MAX).await.map_err(|e| match e {
                TransportError::Amqp(e) => PidboxError::Broker(e),
                other => PidboxError::Other(other.to_string()),
            })?;
        let channel = connection.create_channel().await?;
        let transient = ExchangeDeclareOptions { durable: false, ..Default::default() };
        channel.exchange_declare(&mailbox.exchange(), ExchangeKind::Fanout, transient, FieldTable::default()).await?;
        let mut args = Map::new();
        if let Some(ms) = mailbox.queue_expires_ms {
            args.insert("x-expires".into(), Value::from(ms));
        }
        if let Some(ms) = mailbox.queue_ttl_ms {
            args.insert("x-message-ttl".into(), Value::from(ms));
        }
        let opts = QueueDeclareOptions {
            durable: mailbox.durable,
            exclusive: mailbox.exclusive,
            auto_delete: !mailbox.durable,
            ..Default::default()
        };
        if let Err(e) = channel.queue_declare(&mailbox.queue(), opts, fields::table_from_json(&args)).await {
            return Err(if e.to_string().contains("RESOURCE_LOCKED") { PidboxError::NodeInUse } else { e.into() });
        }
        channel
            .queue_bind(&mailbox.queue(), &mailbox.exchange(), "", QueueBindOptions::default(), FieldTable::default())
            .await?;
        let consume = BasicConsumeOptions { no_ack: true, ..Default::default() };
        let consumer = channel
            .basic_consume(
                &mailbox.queue(),
                &format!("celeriac-pidbox-{}", std::process::id()),
                consume,
                FieldTable::default(),
            )
            .await?;
        *self.pidbox_channel.lock().await = Some((connection, channel));
        Ok(consumer)
    }

    /// An event receiver as `celery.events.Receiver` declares it: an auto-delete queue
    /// `celeryev.<uuid>` bound to the `celeryev` topic exchange, messages living `ttl_ms`.
    async fn open_event_receiver(
        &self,
        attempt: usize,
        ttl_ms: u64,
    ) -> Result<(Arc<Connection>, lapin::Consumer), TransportError> {
        let connection = self.connect_to(attempt, "celeriac-gossip", url::SMALL_FRAME_MAX).await?;
        let channel = connection.create_channel().await?;
        let opts = ExchangeDeclareOptions { durable: true, ..Default::default() };
        channel.exchange_declare("celeryev", ExchangeKind::Topic, opts, FieldTable::default()).await?;
        let queue = format!("celeryev.{}", uuid::Uuid::new_v4());
        let mut args = Map::new();
        args.insert("x-message-ttl".into(), Value::from(ttl_ms));
        // `event_queue_expires` (60 s).
        args.insert("x-expires".into(), Value::from(60_000));
        let opts = QueueDeclareOptions { auto_delete: true, ..Default::default() };
        channel.queue_declare(&queue, opts, fields::table_from_json(&args)).await?;
        channel.queue_bind(&queue, "celeryev", "worker.#", QueueBindOptions::default(), FieldTable::default()).await?;
        let consume = BasicConsumeOptions { no_ack: true, ..Default::default() };
        let consumer = channel.basic_consume(&queue, "", consume, FieldTable::default()).await?;
        Ok((connection, consumer))
    }

    /// The queue holding beat's shared schedule state: durable, and only ever the newest
    /// message (`x-max-length` 1 drops the older one).
    async fn declare_beat_state(channel: &Channel, name: &str) -> Result<String, lapin::Error> {
        let queue = format!("{name}.state");
        let mut args = Map::new();
        args.insert("x-max-length".into(), Value::from(1));
        let opts = QueueDeclareOptions { durable: true, ..Default::default() };
        channel.queue_declare(&queue, opts, fields::table_from_json(&args)).await?;
        Ok(queue)
    }

    /// Stop the broker sending more (`basic.cancel`), so what we give back stays in the queue.
    async fn cancel_consumers(&self, connection: &TaskConnection) {
        let tags: Vec<String> = std::mem::take(&mut *self.tags());
        for tag in tags {
            if let Err(e) = connection.basic_cancel(&tag).await {
                warn!("Could not cancel consumer {tag}: {e}");
            }
        }
    }

    async fn set_qos(connection: &TaskConnection, prefetch: usize, global: bool) -> Result<(), connection::Error> {
        connection.basic_qos(u16::try_from(prefetch).unwrap_or(u16::MAX), global).await
    }

    /// Declare, set QoS and start one consumer per queue; their deliveries all come as the
    /// connection's events.
    async fn start_consumers(
        &self,
        session: &Session,
        queues: &[QueueSpec],
        prefetch: usize,
        qos: Qos,
    ) -> Result<(), connection::Error> {
        Self::set_qos(&session.connection, prefetch, qos == Qos::Channel).await?;
        self.add_consumers(session, queues).await
    }

    /// From `Qos::Consumer` to `Qos::Channel`: the channel's limit set, the consumers' lifted,
    /// and the consumers restarted, since a per-consumer limit binds the consumers it was set
    /// for. Deliveries in hand stay unacked on the channel and count against its limit.
    async fn move_to_channel_qos(&self, queues: &[QueueSpec], prefetch: usize) -> Result<(), connection::Error> {
        let guard = self.session.lock().await;
        let Some(session) = guard.as_ref() else { return Ok(()) };
        // In this order: RabbitMQ lifts the channel's limit on a per-consumer `basic.qos`.
        Self::set_qos(&session.connection, 0, false).await?;
        Self::set_qos(&session.connection, prefetch, true).await?;
        self.cancel_consumers(&session.connection).await;
        self.add_consumers(session, queues).await
    }

    fn consumer_tag(queue: &str) -> String {
        format!("celeriac-{}-{queue}", std::process::id())
    }

    /// Declare `queues` and consume from them on the session's channel.
    async fn add_consumers(&self, session: &Session, queues: &[QueueSpec]) -> Result<(), connection::Error> {
        Self::declare_on(&session.connection, queues).await?;
        for q in queues {
            let tag = Self::consumer_tag(&q.name);
            session.connection.basic_consume(&q.name, &tag).await?;
            self.tags().push(tag);
        }
        Ok(())
    }

    fn tags(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        self.consumer_tags.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `add_consumer` / `cancel_consumer` on a live connection: consume from queues that
    /// joined the set, cancel the consumers of queues that left it. Deliveries already in hand
    /// from a cancelled queue are settled as usual.
    async fn follow_queue_set(&self, consumed: &[QueueSpec], wanted: &[QueueSpec]) -> Result<(), connection::Error> {
        let guard = self.session.lock().await;
        let Some(session) = guard.as_ref() else { return Ok(()) };
        for gone in consumed.iter().filter(|q| !wanted.iter().any(|w| w.name == q.name)) {
            let tag = Self::consumer_tag(&gone.name);
            self.tags().retain(|t| *t != tag);
            session.connection.basic_cancel(&tag).await?;
        }
        let added: Vec<QueueSpec> =
            wanted.iter().filter(|w| !consumed.iter().any(|q| q.name == w.name)).cloned().collect();
        self.add_consumers(session, &added).await
    }
}

impl Transport for AmqpTransport {
    async fn declare(&self, queues: &[QueueSpec]) -> Result<(), TransportError> {
        let guard = self.session.lock().await;
        let session = guard.as_ref().ok_or_else(|| TransportError::Disconnected(self.display.clone()))?;
        Self::declare_on(&session.connection, queues).await?;
        Ok(())
    }

    fn consume(
        self: Arc<Self>,
        mut queues: watch::Receiver<Vec<QueueSpec>>,
        window: Arc<Semaphore>,
        mut prefetch: watch::Receiver<usize>,
        deliveries: mpsc::Sender<Incoming>,
        mut stop: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                let mut consumed = queues.borrow_and_update().clone();
                let mut qos = Qos::for_queues(&consumed);
                let (epoch, mut rx) = {
                    let mut guard = self.session.lock().await;
                    if guard.is_none() {
                        drop(guard);
                        let Some(s) = self.reconnect(&stop).await else {
                            return;
                        };
                        guard = self.session.lock().await;
                        *guard = Some(s);
                    }
                    let Some(session) = guard.as_mut() else {
                        return;
                    };
                    let Some(events) = session.events.take() else {
                        *guard = None;
                        continue;
                    };
                    let current = *prefetch.borrow();
                    if let Err(e) = self.start_consumers(session, &consumed, current, qos).await {
                        error!("consumer: Cannot consume from {}: {e}", self.display);
                        *guard = None;
                        drop(guard);
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                    (session.epoch, events)
                };
                self.consuming.store(true, Ordering::Relaxed);
                self.connections.fetch_add(1, Ordering::Relaxed);
                if epoch > 1 {
                    info!("Connected to {}", self.display);
                }
                // Serve this connection until it fails or we are told to stop.
                loop {
                    tokio::select! {
                        item = rx.recv() => match item {
                            Some(Event::Delivery(d)) => {
                                let delivery = to_delivery(epoch, *d);
                                let Ok(permit) = window.clone().acquire_owned().await else { return };
                                permit.forget();
                                if let Some(t) = split_tag(&delivery.tag) {
                                    self.held().insert(t);
                                }
                                if deliveries.send(Incoming::Delivery(Box::new(delivery))).await.is_err() {
                                    return;
                                }
                            }
                            // A consumer we cancelled ourselves (`cancel_consumer`, shutdown) is
                            // no longer in `tags`; any other the broker cancelled (queue deleted).
                            Some(Event::Cancelled(tag)) if !self.tags().contains(&tag) => {
                                debug!("consumer {tag} ended");
                            }
                            Some(Event::Cancelled(tag)) => {
                                error!("consumer: Connection to broker lost: the broker cancelled consumer {tag}. Trying to re-establish the connection...");
                                break;
                            }
                            Some(Event::Closed(e)) => {
                                error!("consumer: Connection to broker lost: {e}. Trying to re-establish the connection...");
                                break;
                            }
                            None => break,
                        },
                        changed = prefetch.changed() => {
                            if changed.is_err() { return; }
                            let count = *prefetch.borrow();
                            match qos {
                                Qos::Channel => {
                                    let guard = self.session.lock().await;
                                    if let Some(s) = guard.as_ref() {
                                        if let Err(e) = Self::set_qos(&s.connection, count, true).await {
                                            warn!("Could not change prefetch to {count}: {e}");
                                        }
                                    }
                                }
                                Qos::Consumer => {
                                    if let Err(e) = self.move_to_channel_qos(&consumed, count).await {
                                        error!("consumer: Cannot change prefetch to {count}: {e}");
                                        break;
                                    }
                                    qos = Qos::Channel;
                                }
                                Qos::QuorumConsumer => {}
                            }
                        }
                        changed = queues.changed() => {
                            if changed.is_err() { return; }
                            let wanted = queues.borrow_and_update().clone();
                            if qos == Qos::Consumer {
                                let count = *prefetch.borrow();
                                if let Err(e) = self.move_to_channel_qos(&consumed, count).await {
                                    error!("consumer: Cannot change the queues consumed from: {e}");
                                    break;
                                }
                                qos = Qos::Channel;
                            }
                            if let Err(e) = self.follow_queue_set(&consumed, &wanted).await {
                                error!("consumer: Cannot change the queues consumed from: {e}");
                                break;
                            }
                            consumed = wanted;
                        }
                        _ = stop.changed() => return,
                    }
                }
                self.consuming.store(false, Ordering::Relaxed);
                // The broker requeues everything this connection held. Said goodbye to where it
                // still listens (a channel error, a cancelled consumer), so it logs no error.
                if let Some(s) = self.session.lock().await.take() {
                    let _ = tokio::time::timeout(Duration::from_secs(1), s.connection.close("reconnecting")).await;
                }
                self.tags().clear();
                self.held().retain(|(e, _)| *e != epoch);
                if deliveries.send(Incoming::ConnectionLost).await.is_err() {
                    return;
                }
            }
        })
    }

    async fn settle(&self, batch: Vec<Settle>) -> Result<(), TransportError> {
        let guard = self.session.lock().await;
        let Some(session) = guard.as_ref() else {
            // No connection: the broker has requeued everything we held.
            self.held().clear();
            return Ok(());
        };
        if batch.iter().any(|op| matches!(op, Settle::Restore(_))) {
            // Restores happen at shutdown: stop deliveries first (stock cancels the task
            // consumer before it releases its messages).
            self.cancel_consumers(&session.connection).await;
        }
        let epoch = session.epoch;
        // What to send, decided under the lock: only tags we still hold from this connection
        // (settling a tag twice, or one of an old channel, would close the channel).
        let (cutoff, singles) = {
            let mut held = self.held();
            let mut acks = BTreeSet::new();
            let mut singles = Vec::new();
            let mut forgotten = Vec::new();
            for op in &batch {
                let (tag, kind) = match op {
                    Settle::Ack(t) => (t, Some(None)),
                    Settle::Reject(t) => (t, Some(Some(false))),
                    Settle::Requeue(t) | Settle::Restore(t) => (t, Some(Some(true))),
                    Settle::Forget(t) => (t, None),
                };
                let Some((e, amqp_tag)) = split_tag(tag) else {
                    continue;
                };
                if !held.contains(&(e, amqp_tag)) || e != epoch {
                    held.remove(&(e, amqp_tag));
                    continue;
                }
                match kind {
                    Some(None) => {
                        acks.insert(amqp_tag);
                    }
                    Some(Some(requeue)) => singles.push((amqp_tag, Some(requeue))),
                    None => forgotten.push(amqp_tag),
                }
                held.remove(&(e, amqp_tag));
            }
            // Everything still unacked on the channel that is not in `acks` breaks a run.
            let not_acked = held
                .range((epoch, 0)..=(epoch, u64::MAX))
                .map(|(_, t)| *t)
                .chain(singles.iter().map(|(t, _)| *t))
                .chain(forgotten.iter().copied());
            let cutoff = multiple_ack_cutoff(not_acked, &acks);
            singles.extend(acks.into_iter().filter(|t| cutoff.is_none_or(|c| *t > c)).map(|t| (t, None)));
            (cutoff, singles)
        };
        let mut acks: Vec<(u64, bool)> = cutoff.map(|c| (c, true)).into_iter().collect();
        let mut rejects = Vec::new();
        for (tag, reject) in singles {
            match reject {
                None => acks.push((tag, false)),
                Some(requeue) => rejects.push((tag, requeue)),
            }
        }
        session.connection.settle(&acks, &rejects).await?;
        Ok(())
    }

    async fn restore_all(&self) -> Result<usize, TransportError> {
        let tags: Vec<Settle> = self.held().iter().map(|(e, t)| Settle::Restore(format!("{e}.{t}"))).collect();
        let n = tags.len();
        self.settle(tags).await?;
        if let Some(s) = self.session.lock().await.take() {
            s.connection.close("worker shutdown").await;
        }
        // All of them (remote control, gossip, beat's lock too): one left open when the runtime
        // ends would have its I/O fail and log an error on the way out.
        let opened: Vec<Arc<Connection>> = std::mem::take(&mut *self.opened.lock().unwrap_or_else(|p| p.into_inner()));
        for connection in opened.into_iter().filter(|c| c.status().connected()) {
            let _ = tokio::time::timeout(Duration::from_secs(2), connection.close(200, "worker shutdown")).await;
        }
        Ok(n)
    }

    fn pidbox(
        self: Arc<Self>,
        mailbox: Mailbox,
        requests: mpsc::Sender<ControlEvent>,
        mut stop: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut attempt = 0usize;
            loop {
                match self.open_pidbox(&mailbox, attempt).await {
                    Ok(mut consumer) => {
                        attempt = 0;
                        let _ = requests.send(ControlEvent::Listening).await;
                        loop {
                            let item = tokio::select! {
                                i = consumer.next() => i,
                                _ = stop.changed() => return,
                            };
                            match item {
                                Some(Ok(d)) => {
                                    let clock = d
                                        .properties
                                        .headers()
                                        .as_ref()
                                        .and_then(|h| h.inner().get("clock").map(fields::to_json))
                                        .and_then(|v| v.as_u64())
                                        .unwrap_or(0);
                                    match serde_json::from_slice::<Value>(&d.data) {
                                        Ok(body) => {
                                            if requests.send(ControlEvent::Request(body, clock)).await.is_err() {
                                                return;
                                            }
                                        }
                                        Err(e) => warn!("pidbox: undecodable request ({e}), ignored"),
                                    }
                                }
                                Some(Err(e)) => {
                                    warn!("pidbox: connection lost ({e}); reconnecting");
                                    break;
                                }
                                None => break,
                            }
                        }
                    }
                    Err(PidboxError::NodeInUse) => {
                        error!(
                            "A node named {} is already using this process mailbox!\n\nMaybe you forgot to shutdown \
                             the other node or did not do so properly?\nOr if you meant to start multiple nodes on \
                             the same host please make sure you give each node a unique node name!",
                            mailbox.node
                        );
                        let _ = requests.send(ControlEvent::Listening).await;
                        return;
                    }
                    Err(e) => warn!("pidbox: {e}"),
                }
                *self.pidbox_channel.lock().await = None;
                attempt += 1;
                let delay = Duration::from_millis(200 * (attempt as u64).min(25));
                tokio::select! { _ = tokio::time::sleep(delay) => {}, _ = stop.changed() => return }
            }
        })
    }

    async fn broadcast(
        &self,
        mailbox: &Mailbox,
        method: &str,
        arguments: Value,
        timeout: Duration,
    ) -> Result<Vec<Value>, TransportError> {
        // A short-lived client connection of our own, as `app.control` would open.
        let connection = self.connect_to(0, "celeriac-mingle", url::SMALL_FRAME_MAX).await?;
        let channel = connection.create_channel().await?;
        let oid = uuid::Uuid::new_v4().to_string();
        let reply_exchange = format!("reply.{}.pidbox", mailbox.namespace);
        let reply_queue = format!("{oid}.{reply_exchange}");
        let transient = ExchangeDeclareOptions { durable: false, ..Default::default() };
        channel.exchange_declare(&reply_exchange, ExchangeKind::Direct, transient, FieldTable::default()).await?;
        channel.exchange_declare(&mailbox.exchange(), ExchangeKind::Fanout, transient, FieldTable::default()).await?;
        let queue_opts = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
        channel.queue_declare(&reply_queue, queue_opts, FieldTable::default()).await?;
        channel
            .queue_bind(&reply_queue, &reply_exchange, &oid, QueueBindOptions::default(), FieldTable::default())
            .await?;
        let consume = BasicConsumeOptions { no_ack: true, ..Default::default() };
        let mut replies_in = channel.basic_consume(&reply_queue, "", consume, FieldTable::default()).await?;
        let (body, ticket) = control_request(method, arguments, &reply_exchange, &oid);
        let mut headers = FieldTable::default();
        headers.insert("clock".into(), fields::from_json(&Value::from(1)));
        let props = lapin::BasicProperties::default()
            .with_content_type("application/json".into())
            .with_content_encoding("utf-8".into())
            .with_headers(headers);
        // Mandatory and confirmed: the broker hands the request back when no mailbox queue is
        // bound, so a worker with no neighbours knows at once instead of waiting out `timeout`.
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        let mandatory = BasicPublishOptions { mandatory: true, ..Default::default() };
        let confirmation =
            channel.basic_publish(&mailbox.exchange(), "", mandatory, &reply_body(&body), props).await?.await?;
        let unrouted = confirmation.take_message().is_some();
        let deadline = tokio::time::Instant::now() + if unrouted { Duration::ZERO } else { timeout };
        let mut replies = Vec::new();
        while let Ok(Some(Ok(d))) = tokio::time::timeout_at(deadline, replies_in.next()).await {
            let ticket_header =
                d.properties.headers().as_ref().and_then(|h| h.inner().get("ticket").map(fields::to_json));
            if ticket_header == Some(Value::from(ticket.as_str())) {
                if let Ok(v) = serde_json::from_slice::<Value>(&d.data) {
                    replies.push(v);
                }
            }
        }
        let _ = connection.close(200, "mingle done").await;
        Ok(replies)
    }

    async fn reply(&self, to: &ReplyTo, ticket: &str, clock: u64, body: &Value) -> Result<(), TransportError> {
        let guard = self.pidbox_channel.lock().await;
        let (_, channel) = guard.as_ref().ok_or_else(|| TransportError::Disconnected(self.display.clone()))?;
        // As `kombu.pidbox.Mailbox._publish_reply`: declare the (transient) reply exchange.
        let opts = ExchangeDeclareOptions { durable: false, ..Default::default() };
        channel.exchange_declare(&to.exchange, ExchangeKind::Direct, opts, FieldTable::default()).await?;
        let mut headers = FieldTable::default();
        headers.insert("ticket".into(), fields::from_json(&Value::from(ticket)));
        headers.insert("clock".into(), fields::from_json(&Value::from(clock)));
        let props = lapin::BasicProperties::default()
            .with_content_type("application/json".into())
            .with_content_encoding("utf-8".into())
            .with_delivery_mode(1)
            .with_headers(headers);
        channel.basic_publish(&to.exchange, &to.routing_key, Default::default(), &reply_body(body), props).await?;
        Ok(())
    }

    async fn publish_event(&self, routing_key: &str, hostname: &str, body: &Value) -> Result<(), TransportError> {
        let guard = self.pidbox_channel.lock().await;
        let (_, channel) = guard.as_ref().ok_or_else(|| TransportError::Disconnected(self.display.clone()))?;
        // `celery.events.event.event_exchange`: topic, durable.
        let opts = ExchangeDeclareOptions { durable: true, ..Default::default() };
        channel.exchange_declare("celeryev", ExchangeKind::Topic, opts, FieldTable::default()).await?;
        let mut headers = FieldTable::default();
        headers.insert("hostname".into(), fields::from_json(&Value::from(hostname)));
        let props = lapin::BasicProperties::default()
            .with_content_type("application/json".into())
            .with_content_encoding("utf-8".into())
            .with_delivery_mode(1)
            .with_headers(headers);
        channel.basic_publish("celeryev", routing_key, Default::default(), &reply_body(body), props).await?;
        Ok(())
    }

    fn subscribe_worker_events(
        self: Arc<Self>,
        ttl_ms: u64,
        events: mpsc::Sender<PeerEvent>,
        mut stop: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut attempt = 0;
            loop {
                let opened = tokio::select! {
                    r = self.open_event_receiver(attempt, ttl_ms) => r,
                    _ = stop.changed() => return,
                };
                match opened {
                    Ok((_connection, mut consumer)) => loop {
                        let item = tokio::select! {
                            i = consumer.next() => i,
                            _ = stop.changed() => return,
                        };
                        let Some(Ok(d)) = item else { break };
                        let hostname = d
                            .properties
                            .headers()
                            .as_ref()
                            .and_then(|h| h.inner().get("hostname"))
                            .and_then(|v| fields::to_json(v).as_str().map(str::to_owned));
                        let Some(event) = PeerEvent::new(d.routing_key.as_str(), hostname.as_deref(), &d.data) else {
                            continue;
                        };
                        if events.send(event).await.is_err() {
                            return;
                        }
                    },
                    Err(e) => debug!("gossip: cannot receive worker events: {e}"),
                }
                attempt += 1;
                tokio::select! { _ = tokio::time::sleep(Duration::from_secs(2)) => {}, _ = stop.changed() => return }
            }
        })
    }

    async fn beat_lead(&self, name: &str, _holder: &str, _ttl: Duration) -> Result<bool, TransportError> {
        // The lock is an exclusive queue: RabbitMQ lets one connection declare it and deletes
        // it the moment that connection dies, which is when another replica takes over.
        let mut guard = self.beat_lock.lock().await;
        if let Some((connection, channel)) = guard.as_ref() {
            if connection.status().connected() && channel.status().connected() {
                return Ok(true);
            }
        }
        *guard = None;
        let connection = self.connect_to(0, "celeriac-beat", url::SMALL_FRAME_MAX).await?;
        let channel = connection.create_channel().await?;
        let opts = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
        match channel.queue_declare(name, opts, FieldTable::default()).await {
            Ok(_) => {
                *guard = Some((connection, channel));
                Ok(true)
            }
            Err(e) if e.to_string().contains("RESOURCE_LOCKED") => {
                let _ = connection.close(200, "follower").await;
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn beat_resign(&self, _name: &str, _holder: &str) -> Result<(), TransportError> {
        if let Some((connection, _)) = self.beat_lock.lock().await.take() {
            connection.close(200, "beat stopped").await?;
        }
        Ok(())
    }

    async fn beat_state(&self, name: &str) -> Result<Option<Value>, TransportError> {
        let guard = self.beat_lock.lock().await;
        let (_, channel) = guard.as_ref().ok_or_else(|| TransportError::Disconnected(self.display.clone()))?;
        let queue = Self::declare_beat_state(channel, name).await?;
        // Read the newest state and leave it in place for the next leader.
        let Some(message) = channel.basic_get(&queue, BasicGetOptions { no_ack: false }).await? else {
            return Ok(None);
        };
        let state = serde_json::from_slice(&message.delivery.data).ok();
        channel.basic_reject(message.delivery.delivery_tag, BasicRejectOptions { requeue: true }).await?;
        Ok(state)
    }

    async fn save_beat_state(&self, name: &str, state: &Value) -> Result<(), TransportError> {
        let guard = self.beat_lock.lock().await;
        let (_, channel) = guard.as_ref().ok_or_else(|| TransportError::Disconnected(self.display.clone()))?;
        let queue = Self::declare_beat_state(channel, name).await?;
        let props =
            lapin::BasicProperties::default().with_content_type("application/json".into()).with_delivery_mode(2);
        channel.basic_publish("", &queue, Default::default(), state.to_string().as_bytes(), props).await?.await?;
        Ok(())
    }

    fn connections(&self) -> u64 {
        self.connections.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn connected(&self) -> bool {
        self.consuming.load(Ordering::Relaxed)
    }

    fn maintain(self: Arc<Self>, stop: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
        // Heartbeats are lapin's; nothing else needs tending.
        super::idle_until(stop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_classic_queue_takes_its_prefetch_per_consumer() {
        let queue = |name: &str, quorum: bool| {
            let mut q: QueueSpec = serde_json::from_value(serde_json::json!({"name": name})).unwrap();
            if quorum {
                q.queue_arguments.insert("x-queue-type".into(), "quorum".into());
            }
            q
        };
        assert_eq!(Qos::for_queues(&[queue("celery", false)]), Qos::Consumer);
        assert_eq!(Qos::for_queues(&[queue("a", false), queue("b", false)]), Qos::Channel);
        assert_eq!(Qos::for_queues(&[queue("a", true)]), Qos::QuorumConsumer);
        assert_eq!(Qos::for_queues(&[queue("a", false), queue("b", true)]), Qos::QuorumConsumer);
    }

    #[test]
    fn multiple_ack_only_over_a_gap_free_prefix() {
        let acks: BTreeSet<u64> = [1, 2, 3, 7].into_iter().collect();
        // 5 is still held (running with acks_late): only 1..=3 may go in one multiple ack.
        assert_eq!(multiple_ack_cutoff([5, 9].into_iter(), &acks), Some(3));
        assert_eq!(multiple_ack_cutoff(std::iter::empty(), &acks), Some(7));
        assert_eq!(multiple_ack_cutoff([2].into_iter(), &acks), None);
        let one: BTreeSet<u64> = [4].into_iter().collect();
        assert_eq!(multiple_ack_cutoff(std::iter::empty(), &one), None);
    }

    #[test]
    fn tags_carry_their_epoch() {
        assert_eq!(split_tag("3.17"), Some((3, 17)));
        assert_eq!(split_tag("x"), None);
    }
}
