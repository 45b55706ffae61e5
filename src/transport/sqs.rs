//! Amazon SQS, as kombu uses it (`kombu/transport/SQS/__init__.py`, reference §11), so stock
//! producers and workers interoperate with celeriac on the same queues.
//!
//! - Queue names: `queue_name_prefix + name`, `.` → `-`, other punctuation but `-`/`_` → `_`,
//!   a `.fifo` suffix kept; missing queues are created with the visibility timeout.
//! - A message body is base64 of kombu's JSON envelope (reference §2.1); the delivery tag is
//!   the receipt handle. Ack (and reject without requeue, unless the queue has a redrive
//!   policy) deletes the message; requeue and restore make it visible again.
//! - Beyond stock: messages in hand (prefetched, waiting for an ETA, running) have their
//!   visibility extended while the worker holds them, so SQS never redelivers a task that is
//!   merely waiting or running here; messages of a worker that died come back after the
//!   visibility timeout, as stock.
//! - As stock: no remote control, events, mingle or gossip (SQS has no broadcast).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_sqs::error::DisplayErrorContext;
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry, MessageSystemAttributeName,
    QueueAttributeName,
};
use aws_sdk_sqs::Client;
use base64::Engine;
use serde_json::{Map, Value};
use tokio::sync::{mpsc, watch, Semaphore};
use tracing::{debug, error, info, warn};

use super::envelope;
use super::{ControlEvent, Incoming, Mailbox, PeerEvent, QueueSpec, ReplyTo, Settle, Transport, TransportError};

/// ReceiveMessage returns at most ten messages (`SQS_MAX_MESSAGES`).
const MAX_BATCH: usize = 10;

/// How to reach SQS: the URL's credentials and host, and `broker_transport_options`.
#[derive(Debug, Clone)]
pub struct SqsOptions {
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// `sqs://key:secret@host:port`: an emulator or a private endpoint (kombu builds the
    /// endpoint from the URL's host); `endpoint_url` in the transport options also works.
    pub endpoint_url: Option<String>,
    pub queue_name_prefix: String,
    pub predefined_queues: HashMap<String, PredefinedQueue>,
    pub visibility_timeout: i32,
    pub wait_time_seconds: i32,
    pub polling_interval: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PredefinedQueue {
    pub url: String,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub region: Option<String>,
}

impl SqsOptions {
    /// From the connection kombu parsed (`userid`, `password`, `hostname`, `port`) and the
    /// transport options.
    pub fn new(connection: &Map<String, Value>, o: &Map<String, Value>) -> Self {
        let text = |m: &Map<String, Value>, k: &str| {
            m.get(k).and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_owned)
        };
        let secure = o.get("is_secure").and_then(Value::as_bool).unwrap_or(false);
        let endpoint_url = text(o, "endpoint_url").or_else(|| {
            let host = text(connection, "hostname")?;
            let port = connection.get("port").and_then(Value::as_u64).map(|p| format!(":{p}")).unwrap_or_default();
            Some(format!("{}://{host}{port}", if secure { "https" } else { "http" }))
        });
        let predefined_queues = o
            .get("predefined_queues")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(name, q)| {
                        let q = q.as_object()?;
                        Some((
                            name.clone(),
                            PredefinedQueue {
                                url: text(q, "url")?,
                                access_key_id: text(q, "access_key_id"),
                                secret_access_key: text(q, "secret_access_key"),
                                region: text(q, "region"),
                            },
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let number = |k: &str| o.get(k).and_then(|v| v.as_f64().or_else(|| v.as_str().and_then(|s| s.parse().ok())));
        SqsOptions {
            region: text(o, "region"),
            access_key_id: text(connection, "userid"),
            secret_access_key: text(connection, "password"),
            endpoint_url,
            queue_name_prefix: text(o, "queue_name_prefix").unwrap_or_default(),
            predefined_queues,
            visibility_timeout: number("visibility_timeout").unwrap_or(1800.0) as i32,
            wait_time_seconds: number("wait_time_seconds").unwrap_or(10.0).clamp(0.0, 20.0) as i32,
            polling_interval: Duration::from_secs_f64(number("polling_interval").unwrap_or(1.0).clamp(0.0, 60.0)),
        }
    }

    /// `Channel.canonical_queue_name`: the SQS name of a Celery queue.
    pub fn sqs_name(&self, queue: &str) -> String {
        entity_name(&format!("{}{queue}", self.queue_name_prefix))
    }
}

/// `Channel.entity_name`: `.` → `-`, punctuation other than `-` and `_` → `_`, `.fifo` kept.
pub fn entity_name(name: &str) -> String {
    let (stem, fifo) = match name.strip_suffix(".fifo") {
        Some(stem) => (stem, true),
        None => (name, false),
    };
    let mapped: String = stem
        .chars()
        .map(|c| match c {
            '.' => '-',
            '-' | '_' => c,
            c if c.is_ascii_punctuation() => '_',
            c => c,
        })
        .collect();
    if fifo {
        format!("{mapped}.fifo")
    } else {
        mapped
    }
}

/// A message body as kombu's producer wrote it: base64 of the JSON envelope (or the JSON
/// itself with `sqs_base64_encoding=False`); a foreign producer's plain body is wrapped
/// (`Channel._envelope_payload`). The delivery tag becomes the receipt handle.
fn envelope_of(body: &str, receipt_handle: &str, queue_url: &str, message_id: &str) -> String {
    let trimmed = body.trim();
    let text = base64::engine::general_purpose::STANDARD
        .decode(trimmed.as_bytes())
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .filter(|t| t.trim_start().starts_with('{'))
        .unwrap_or_else(|| body.to_owned());
    let mut envelope = match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(m)) if m.contains_key("properties") => m,
        _ => {
            let mut m = Map::new();
            m.insert("body".into(), Value::String(text));
            m.insert("properties".into(), serde_json::json!({"delivery_info": {}}));
            m
        }
    };
    if let Some(Value::Object(props)) = envelope.get_mut("properties") {
        props.insert("delivery_tag".into(), Value::String(receipt_handle.to_owned()));
        let info = props.entry("delivery_info").or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(info) = info {
            info.insert("sqs_queue".into(), Value::String(queue_url.to_owned()));
            info.insert(
                "sqs_message".into(),
                serde_json::json!({"MessageId": message_id, "ReceiptHandle": receipt_handle}),
            );
        }
    }
    Value::Object(envelope).to_string()
}

/// Receipt handles grouped by the queue they belong to, for batched calls.
fn by_queue(held: impl Iterator<Item = (String, SqsQueue)>) -> Vec<(SqsQueue, Vec<String>)> {
    let mut groups: HashMap<String, (SqsQueue, Vec<String>)> = HashMap::new();
    for (tag, queue) in held {
        groups.entry(queue.url.clone()).or_insert_with(|| (queue, Vec::new())).1.push(tag);
    }
    groups.into_values().collect()
}

/// A queue the worker consumes: its SQS URL and the client allowed to use it.
#[derive(Clone)]
struct SqsQueue {
    url: String,
    client: Client,
}

/// A delivery this worker holds: which queue (URL) its receipt handle belongs to.
struct Held {
    queue: SqsQueue,
}

pub struct SqsTransport {
    opts: SqsOptions,
    client: Client,
    queues: tokio::sync::Mutex<HashMap<String, SqsQueue>>,
    held: Mutex<HashMap<String, Held>>,
    redrive: tokio::sync::Mutex<HashMap<String, bool>>,
    receiving: AtomicBool,
}

fn sqs_err(e: impl std::error::Error) -> TransportError {
    TransportError::Sqs(DisplayErrorContext(e).to_string())
}

/// A client for `region` with static credentials, or the standard AWS credential chain
/// (environment, shared files, web identity, container and instance roles).
async fn client(opts: &SqsOptions, region: Option<&str>, key: Option<&str>, secret: Option<&str>) -> Client {
    use aws_smithy_http_client::tls;
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::Ring))
        .build_https();
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest()).http_client(http);
    if let Some(r) = region.map(str::to_owned).or_else(|| opts.region.clone()) {
        loader = loader.region(aws_config::Region::new(r));
    }
    if let (Some(k), Some(s)) = (key, secret) {
        loader = loader.credentials_provider(aws_sdk_sqs::config::Credentials::new(k, s, None, None, "broker URL"));
    }
    let shared = loader.load().await;
    let mut conf = aws_sdk_sqs::config::Builder::from(&shared);
    if shared.region().is_none() {
        conf = conf.region(aws_config::Region::new("us-east-1"));
    }
    if let Some(url) = &opts.endpoint_url {
        conf = conf.endpoint_url(url);
    }
    Client::from_conf(conf.build())
}

impl SqsTransport {
    pub async fn connect(opts: SqsOptions) -> Result<Self, TransportError> {
        let main = client(&opts, None, opts.access_key_id.as_deref(), opts.secret_access_key.as_deref()).await;
        // One call up front, so bad credentials or an unreachable endpoint fail the start-up
        // (and its retries) instead of the first poll.
        if opts.predefined_queues.is_empty() {
            main.list_queues().queue_name_prefix(opts.sqs_name("")).max_results(1).send().await.map_err(sqs_err)?;
        }
        Ok(SqsTransport {
            opts,
            client: main,
            queues: Default::default(),
            held: Mutex::new(HashMap::new()),
            redrive: Default::default(),
            receiving: AtomicBool::new(false),
        })
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `Channel._new_queue`: the queue's URL, creating the queue if need be (never a
    /// predefined one: those are used as given).
    async fn queue(&self, name: &str) -> Result<SqsQueue, TransportError> {
        let sqs_name = self.opts.sqs_name(name);
        if let Some(q) = self.queues.lock().await.get(&sqs_name) {
            return Ok(q.clone());
        }
        let q = if let Some(p) =
            self.opts.predefined_queues.get(name).or_else(|| self.opts.predefined_queues.get(&sqs_name))
        {
            let own = p.access_key_id.is_some() || p.region.is_some();
            let client = if own {
                let key = p.access_key_id.as_deref().or(self.opts.access_key_id.as_deref());
                let secret = p.secret_access_key.as_deref().or(self.opts.secret_access_key.as_deref());
                client(&self.opts, p.region.as_deref(), key, secret).await
            } else {
                self.client.clone()
            };
            SqsQueue { url: p.url.clone(), client }
        } else if !self.opts.predefined_queues.is_empty() {
            return Err(TransportError::Sqs(format!(
                "Queue with name '{name}' must be defined in 'predefined_queues'."
            )));
        } else {
            let url = match self.client.get_queue_url().queue_name(&sqs_name).send().await {
                Ok(out) => out.queue_url().unwrap_or_default().to_owned(),
                Err(e) if e.as_service_error().is_some_and(|s| s.is_queue_does_not_exist()) => {
                    let mut create = self
                        .client
                        .create_queue()
                        .queue_name(&sqs_name)
                        .attributes(QueueAttributeName::VisibilityTimeout, self.opts.visibility_timeout.to_string());
                    if sqs_name.ends_with(".fifo") {
                        create = create.attributes(QueueAttributeName::FifoQueue, "true");
                    }
                    let out = create.send().await.map_err(sqs_err)?;
                    info!("Created SQS queue {sqs_name}");
                    out.queue_url().unwrap_or_default().to_owned()
                }
                Err(e) => return Err(sqs_err(e)),
            };
            SqsQueue { url, client: self.client.clone() }
        };
        self.queues.lock().await.insert(sqs_name, q.clone());
        Ok(q)
    }

    /// Does a rejected message go to a dead-letter queue (so it must not be deleted)?
    async fn has_redrive_policy(&self, q: &SqsQueue) -> bool {
        if let Some(known) = self.redrive.lock().await.get(&q.url) {
            return *known;
        }
        let has = match q
            .client
            .get_queue_attributes()
            .queue_url(&q.url)
            .attribute_names(QueueAttributeName::RedrivePolicy)
            .send()
            .await
        {
            Ok(out) => out.attributes().is_some_and(|a| a.contains_key(&QueueAttributeName::RedrivePolicy)),
            Err(e) => {
                warn!(
                    "Could not read the redrive policy of {}, so rejected messages are left in the queue: {}",
                    q.url,
                    DisplayErrorContext(e)
                );
                true
            }
        };
        self.redrive.lock().await.insert(q.url.clone(), has);
        has
    }

    /// Make messages visible again after `seconds` (0: at once), ten per call.
    async fn change_visibility(&self, q: &SqsQueue, handles: &[String], seconds: i32) -> Result<(), TransportError> {
        for chunk in handles.chunks(MAX_BATCH) {
            let entries = chunk
                .iter()
                .enumerate()
                .filter_map(|(i, h)| {
                    ChangeMessageVisibilityBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(h)
                        .visibility_timeout(seconds)
                        .build()
                        .ok()
                })
                .collect();
            let out = q
                .client
                .change_message_visibility_batch()
                .queue_url(&q.url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(sqs_err)?;
            for failed in out.failed() {
                debug!("ChangeMessageVisibility failed for one message of {}: {:?}", q.url, failed.message());
            }
        }
        Ok(())
    }

    async fn delete(&self, q: &SqsQueue, handles: &[String]) -> Result<(), TransportError> {
        for chunk in handles.chunks(MAX_BATCH) {
            let entries = chunk
                .iter()
                .enumerate()
                .filter_map(|(i, h)| {
                    DeleteMessageBatchRequestEntry::builder().id(i.to_string()).receipt_handle(h).build().ok()
                })
                .collect();
            let out = q
                .client
                .delete_message_batch()
                .queue_url(&q.url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(sqs_err)?;
            for failed in out.failed() {
                // The message comes back after its visibility timeout and runs again.
                error!("Could not delete an acknowledged message from {}: {:?}", q.url, failed.message());
            }
        }
        Ok(())
    }

    /// Group the receipt handles of settled deliveries by queue.
    fn take_held(&self, tags: Vec<String>) -> Vec<(SqsQueue, Vec<String>)> {
        let mut held = self.held();
        by_queue(tags.into_iter().filter_map(|tag| held.remove(&tag).map(|h| (tag, h.queue))))
    }

    /// Long-poll one queue while the prefetch window has room.
    async fn poll_queue(
        self: Arc<Self>,
        name: String,
        window: Arc<Semaphore>,
        deliveries: mpsc::Sender<Incoming>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut backoff = Duration::from_millis(500);
        let q = loop {
            match self.queue(&name).await {
                Ok(q) => break q,
                Err(e) => {
                    error!(
                        "consumer: Cannot use SQS queue {name:?}: {e}. Trying again in {:.2} seconds...",
                        backoff.as_secs_f64()
                    );
                    tokio::select! { _ = tokio::time::sleep(backoff) => {}, _ = stop.changed() => return }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        };
        loop {
            // At least one permit, then as many more as are free, up to ten.
            let first = tokio::select! {
                p = window.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                _ = stop.changed() => return,
            };
            let mut permits = vec![first];
            while permits.len() < MAX_BATCH {
                match window.clone().try_acquire_owned() {
                    Ok(p) => permits.push(p),
                    Err(_) => break,
                }
            }
            let receive = q
                .client
                .receive_message()
                .queue_url(&q.url)
                .max_number_of_messages(permits.len() as i32)
                .wait_time_seconds(self.opts.wait_time_seconds)
                .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
                .send();
            // Never abandoned half-way: messages SQS handed out would stay invisible for the
            // whole visibility timeout. A long poll ends within `wait_time_seconds`.
            let out = match receive.await {
                Ok(out) => {
                    self.receiving.store(true, Ordering::Relaxed);
                    backoff = Duration::from_millis(500);
                    out
                }
                Err(e) => {
                    self.receiving.store(false, Ordering::Relaxed);
                    error!(
                        "consumer: Cannot receive from SQS queue {name:?}: {}. Trying again in {:.2} seconds...",
                        DisplayErrorContext(e),
                        backoff.as_secs_f64()
                    );
                    drop(permits);
                    tokio::select! { _ = tokio::time::sleep(backoff) => {}, _ = stop.changed() => return }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    continue;
                }
            };
            let messages = out.messages();
            if *stop.borrow() {
                // Received after we were told to stop: visible again at once.
                let handles: Vec<String> =
                    messages.iter().filter_map(|m| m.receipt_handle().map(str::to_owned)).collect();
                if !handles.is_empty() {
                    let _ = self.change_visibility(&q, &handles, 0).await;
                }
                return;
            }
            if messages.is_empty() {
                drop(permits);
                tokio::select! { _ = tokio::time::sleep(self.opts.polling_interval) => {}, _ = stop.changed() => return }
                continue;
            }
            for m in messages {
                let Some(handle) = m.receipt_handle() else { continue };
                let raw = envelope_of(m.body().unwrap_or(""), handle, &q.url, m.message_id().unwrap_or(""));
                let Some(delivery) = envelope::decode_or_discard(&raw, &name, "SQS ") else {
                    let _ = self.delete(&q, &[handle.to_owned()]).await;
                    continue;
                };
                let Some(permit) = permits.pop() else { break };
                permit.forget();
                self.held().insert(handle.to_owned(), Held { queue: q.clone() });
                if deliveries.send(Incoming::Delivery(Box::new(delivery))).await.is_err() {
                    return;
                }
            }
        }
    }

    /// Extend the visibility of everything held, so SQS does not hand it to another worker
    /// while it waits or runs here.
    async fn extend_held(&self) -> Result<(), TransportError> {
        let groups = by_queue(self.held().iter().map(|(tag, h)| (tag.clone(), h.queue.clone())));
        for (q, handles) in groups {
            self.change_visibility(&q, &handles, self.opts.visibility_timeout).await?;
        }
        Ok(())
    }
}

impl Transport for SqsTransport {
    async fn declare(&self, queues: &[QueueSpec]) -> Result<(), TransportError> {
        for q in queues {
            self.queue(&q.name).await?;
        }
        Ok(())
    }

    fn consume(
        self: Arc<Self>,
        mut queues: watch::Receiver<Vec<QueueSpec>>,
        window: Arc<Semaphore>,
        _prefetch: watch::Receiver<usize>,
        deliveries: mpsc::Sender<Incoming>,
        mut stop: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            // Each poller has a stop of its own: a cancelled queue's poller finishes the long
            // poll it is in (aborting it would leave received messages invisible).
            let mut pollers: HashMap<String, (tokio::task::JoinHandle<()>, watch::Sender<bool>)> = HashMap::new();
            loop {
                let wanted: Vec<String> = queues.borrow_and_update().iter().map(|q| q.name.clone()).collect();
                pollers.retain(|name, (_, own_stop)| {
                    let keep = wanted.contains(name);
                    if !keep {
                        let _ = own_stop.send(true);
                    }
                    keep
                });
                for name in wanted {
                    if let std::collections::hash_map::Entry::Vacant(slot) = pollers.entry(name) {
                        let (own_stop, stopped) = watch::channel(false);
                        let name = slot.key().clone();
                        let poller = self.clone().poll_queue(name, window.clone(), deliveries.clone(), stopped);
                        slot.insert((tokio::spawn(poller), own_stop));
                    }
                }
                tokio::select! {
                    r = queues.changed() => if r.is_err() { break },
                    _ = stop.changed() => break,
                }
            }
            for (task, own_stop) in pollers.into_values() {
                let _ = own_stop.send(true);
                let _ = task.await;
            }
        })
    }

    async fn settle(&self, batch: Vec<Settle>) -> Result<(), TransportError> {
        let (mut acks, mut rejects, mut back) = (Vec::new(), Vec::new(), Vec::new());
        for op in batch {
            match op {
                Settle::Ack(tag) => acks.push(tag),
                Settle::Reject(tag) => rejects.push(tag),
                Settle::Requeue(tag) | Settle::Restore(tag) => back.push(tag),
                Settle::Forget(tag) => {
                    self.held().remove(&tag);
                }
            }
        }
        for (q, handles) in self.take_held(acks) {
            self.delete(&q, &handles).await?;
        }
        for (q, handles) in self.take_held(rejects) {
            // SQS moves a message to its dead-letter queue after maxReceiveCount receives:
            // with a redrive policy it must stay (`Channel._delete_rejected_message`).
            if self.has_redrive_policy(&q).await {
                self.change_visibility(&q, &handles, 0).await?;
            } else {
                self.delete(&q, &handles).await?;
            }
        }
        for (q, handles) in self.take_held(back) {
            self.change_visibility(&q, &handles, 0).await?;
        }
        Ok(())
    }

    async fn restore_all(&self) -> Result<usize, TransportError> {
        let tags: Vec<String> = self.held().keys().cloned().collect();
        let mut n = 0;
        for (q, handles) in self.take_held(tags) {
            self.change_visibility(&q, &handles, 0).await?;
            n += handles.len();
        }
        Ok(n)
    }

    fn pidbox(
        self: Arc<Self>,
        _mailbox: Mailbox,
        requests: mpsc::Sender<ControlEvent>,
        mut stop: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            info!("Remote control is not available on SQS (no broadcast), as with the stock worker");
            let _ = requests.send(ControlEvent::Listening).await;
            let _ = stop.changed().await;
        })
    }

    async fn broadcast(&self, _: &Mailbox, _: &str, _: Value, _: Duration) -> Result<Vec<Value>, TransportError> {
        Ok(Vec::new())
    }

    async fn reply(&self, _: &ReplyTo, _: &str, _: u64, _: &Value) -> Result<(), TransportError> {
        Ok(())
    }

    async fn publish_event(&self, _: &str, _: &str, _: &Value) -> Result<(), TransportError> {
        // No fanout on SQS: events have nowhere to go, as under the stock worker.
        Ok(())
    }

    fn subscribe_worker_events(
        self: Arc<Self>,
        _ttl_ms: u64,
        _events: mpsc::Sender<PeerEvent>,
        stop: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        super::idle_until(stop)
    }

    async fn beat_lead(&self, name: &str, _holder: &str, _ttl: Duration) -> Result<bool, TransportError> {
        // SQS has nothing to hold a lock with: every replica sends, as stock beat does.
        static WARNED: AtomicBool = AtomicBool::new(false);
        if !WARNED.swap(true, Ordering::Relaxed) {
            warn!("beat: no leader lock on SQS ({name}): run -B on one worker only, as with stock Celery");
        }
        Ok(true)
    }

    async fn beat_resign(&self, _: &str, _: &str) -> Result<(), TransportError> {
        Ok(())
    }

    async fn beat_state(&self, _: &str) -> Result<Option<Value>, TransportError> {
        Ok(None)
    }

    async fn save_beat_state(&self, _: &str, _: &Value) -> Result<(), TransportError> {
        Ok(())
    }

    fn connected(&self) -> bool {
        self.receiving.load(Ordering::Relaxed)
    }

    fn connections(&self) -> u64 {
        1
    }

    fn maintain(self: Arc<Self>, mut stop: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            // Well before the visibility timeout runs out, even for short timeouts.
            let every = Duration::from_secs_f64((self.opts.visibility_timeout as f64 / 3.0).clamp(0.5, 300.0));
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if let Err(e) = self.extend_held().await {
                            warn!("Could not extend the visibility of messages in hand: {e}");
                        }
                    }
                    _ = stop.changed() => return,
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::envelope::decode_envelope;

    #[test]
    fn queue_names_as_kombu_maps_them() {
        assert_eq!(entity_name("celery"), "celery");
        assert_eq!(entity_name("my.queue"), "my-queue");
        assert_eq!(entity_name("a:b/c@d"), "a_b_c_d");
        assert_eq!(entity_name("jobs.high.fifo"), "jobs-high.fifo");
        let opts = SqsOptions::new(
            &Map::new(),
            &serde_json::from_value(serde_json::json!({"queue_name_prefix": "dev."})).unwrap(),
        );
        assert_eq!(opts.sqs_name("celery"), "dev-celery");
    }

    #[test]
    fn endpoint_and_credentials_from_the_url() {
        let conn = serde_json::json!({"userid": "AKID", "password": "se/cret", "hostname": "127.0.0.1", "port": 5000});
        let opts = SqsOptions::new(conn.as_object().unwrap(), &Map::new());
        assert_eq!(opts.endpoint_url.as_deref(), Some("http://127.0.0.1:5000"));
        assert_eq!((opts.access_key_id.as_deref(), opts.secret_access_key.as_deref()), (Some("AKID"), Some("se/cret")));
        assert_eq!((opts.visibility_timeout, opts.wait_time_seconds), (1800, 10));
        let none = SqsOptions::new(&Map::new(), &Map::new());
        assert!(none.endpoint_url.is_none() && none.access_key_id.is_none());
    }

    #[test]
    fn bodies_unwrap_as_kombu_does() {
        let inner = r#"{"body": "W10=", "headers": {"task": "t"}, "properties": {"delivery_info": {"routing_key": "celery"}, "body_encoding": "base64"}}"#;
        let b64 = base64::engine::general_purpose::STANDARD.encode(inner);
        let raw = envelope_of(&b64, "RH", "http://q", "m1");
        let d = decode_envelope(&raw, "celery").unwrap();
        assert_eq!(d.tag, "RH");
        assert_eq!(d.headers["task"], "t");
        assert_eq!(d.properties["delivery_info"]["sqs_queue"], "http://q");
        // A foreign producer's plain body is wrapped, not refused.
        let foreign = envelope_of("hello", "RH2", "http://q", "m2");
        assert_eq!(decode_envelope(&foreign, "celery").unwrap().body, b"hello");
    }
}
