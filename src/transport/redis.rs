//! Redis, laid out exactly as kombu lays it out (`kombu/transport/redis.py`), so a stock worker,
//! stock producers and celeriac share one broker.
//!
//! Queues are lists (`LPUSH` by producers, `BRPOP` here), priorities are extra lists named
//! `<queue>\x06\x16<step>`, and acks are emulated with the `unacked` hash and `unacked_index`
//! sorted set, which a visibility-timeout sweep restores when their worker died.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionManager, MultiplexedConnection};
use redis::{AsyncCommands, Script};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, watch, Semaphore};
use tracing::{debug, error, info, warn};

use super::envelope::{self, decode_envelope, mark_redelivered};
use super::{
    control_request, now_secs, ControlEvent, Delivery, Incoming, Mailbox, PeerEvent, QueueSpec, ReplyTo, Settle,
    Transport, TransportError,
};

const SEP: &str = "\x06\x16";
const PRIORITY_STEPS: [u8; 4] = [0, 3, 6, 9];
const BRPOP_TIMEOUT: f64 = 1.0;

/// Most messages one `TAKE_SCRIPT` call takes (bounded by the free prefetch slots).
const TAKE_BATCH: usize = 64;

/// Take up to ARGV[1] waiting messages from the queue lists KEYS[4..] (in BRPOP's order) and
/// record each kombu envelope as unacked (KEYS[1] hash, KEYS[2] index, score ARGV[2]) in the
/// same atomic step: one round trip for a batch, and no window in which a message popped but not
/// yet recorded can be lost (kombu's BRPOP-then-HSET has one). Returns key, envelope, recorded
/// tag ('' when the envelope is not one we can record here) for each message. The batch's keys
/// and tags are also left in this worker's receipt (KEYS[3], under token ARGV[3]): if the reply
/// is lost with the connection, the worker takes the batch up again from the unacked records
/// (`RECOVER_SCRIPT`) instead of leaving it there until the visibility timeout.
const TAKE_SCRIPT: &str = r"
local out, want, receipt = {}, tonumber(ARGV[1]), {ARGV[3]}
for i = 4, #KEYS do
    while #out < want * 3 do
        local raw = redis.call('RPOP', KEYS[i])
        if not raw then break end
        local tag = ''
        local ok, env = pcall(cjson.decode, raw)
        if ok and type(env) == 'table' and type(env.properties) == 'table' then
            local p = env.properties
            local info = p.delivery_info
            if type(p.delivery_tag) == 'string' and type(info) == 'table'
                and type(info.routing_key) == 'string' then
                local exchange = info.exchange
                if type(exchange) ~= 'string' then exchange = '' end
                tag = p.delivery_tag
                redis.call('ZADD', KEYS[2], ARGV[2], tag)
                redis.call('HSET', KEYS[1], tag,
                    '[' .. raw .. ', ' .. cjson.encode(exchange) .. ', ' .. cjson.encode(info.routing_key) .. ']')
                receipt[#receipt + 1] = KEYS[i] .. '\t' .. tag
            end
        end
        out[#out + 1] = KEYS[i]
        out[#out + 1] = raw
        out[#out + 1] = tag
    end
end
if #receipt > 1 then
    redis.call('SET', KEYS[3], table.concat(receipt, '\n'), 'EX', 600)
end
return out
";

/// The batch of a take whose reply was lost (receipt KEYS[3] under token ARGV[1]): the unacked
/// record of each message still there (no sweep gave it back meanwhile) is refreshed (score
/// ARGV[2], so no sweep takes it now) and returned: key, stored record, tag for each. The
/// receipt stays (the next take replaces it): if this reply is lost too, asking again works.
const RECOVER_SCRIPT: &str = r"
local receipt = redis.call('GET', KEYS[3])
if not receipt then return {} end
local out, first = {}, true
for line in string.gmatch(receipt, '[^\n]+') do
    if first then
        if line ~= ARGV[1] then return {} end
        first = false
    else
        local sep = string.find(line, '\t', 1, true)
        local key, tag = string.sub(line, 1, sep - 1), string.sub(line, sep + 1)
        local stored = redis.call('HGET', KEYS[1], tag)
        if stored then
            redis.call('ZADD', KEYS[2], ARGV[2], tag)
            out[#out + 1] = key
            out[#out + 1] = stored
            out[#out + 1] = tag
        end
    end
end
return out
";

/// Beat's leader lock: renew it if we hold it, else take it if nobody does.
const BEAT_LEAD: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return 1
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    return 1
end
return 0
";

/// Release the lock, only if it is ours.
const BEAT_RESIGN: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
";

/// Moves a held message back into a queue, atomically with removing it from the unacked
/// records, and only if it is still there (another worker's sweep may have restored it).
const RESTORE_SCRIPT: &str = r#"
if redis.call('HDEL', KEYS[1], ARGV[1]) == 1 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  if ARGV[3] == 'left' then
    redis.call('LPUSH', KEYS[3], ARGV[2])
  else
    redis.call('RPUSH', KEYS[3], ARGV[2])
  end
  return 1
end
return 0
"#;

/// Transport options kombu reads for Redis (`broker_transport_options`).
#[derive(Debug, Clone)]
pub struct RedisOptions {
    pub visibility_timeout: f64,
    pub global_keyprefix: String,
    pub unacked_key: String,
    pub unacked_index_key: String,
    pub unacked_mutex_key: String,
    pub unacked_mutex_expire: u64,
    /// Seconds between sweeps for messages whose worker died (kombu: 10 s × throttle 10).
    pub restore_interval: f64,
    /// TLS (`rediss://`, `broker_use_ssl`); set by the worker from the zygote's report.
    pub tls: Option<RedisTls>,
}

impl RedisOptions {
    pub fn from_transport_options(o: &Map<String, Value>) -> Self {
        let num = |k: &str, d: f64| o.get(k).and_then(Value::as_f64).unwrap_or(d);
        let text = |k: &str, d: &str| o.get(k).and_then(Value::as_str).unwrap_or(d).to_owned();
        RedisOptions {
            visibility_timeout: num("visibility_timeout", 3600.0),
            global_keyprefix: text("global_keyprefix", ""),
            unacked_key: text("unacked_key", "unacked"),
            unacked_index_key: text("unacked_index_key", "unacked_index"),
            unacked_mutex_key: text("unacked_mutex_key", "unacked_mutex"),
            unacked_mutex_expire: num("unacked_mutex_expire", 300.0) as u64,
            restore_interval: num("unacked_restore_interval", 10.0) * num("unacked_restore_throttle", 10.0),
            tls: None,
        }
    }
}

/// A delivery this worker holds unsettled: what is needed to give it back.
struct Held {
    queue: String,
    priority: u8,
    envelope: String,
}

pub struct RedisTransport {
    client: redis::Client,
    /// Acks, refreshes, restores and publishing; reconnects by itself after a lost connection
    /// (the consumer keeps its own, blocking connection).
    conn: ConnectionManager,
    opts: RedisOptions,
    held: Mutex<HashMap<String, Held>>,
    restore: Script,
    take: Script,
    recover: Script,
    /// Where this worker's takes leave their receipt (`TAKE_SCRIPT`).
    receipt_key: String,
    consuming: std::sync::atomic::AtomicBool,
    shared_ok: std::sync::atomic::AtomicBool,
    connections: std::sync::atomic::AtomicU64,
}

/// kombu's `redis+socket://` is the redis crate's `redis+unix://`.
fn to_client_url(url: &str) -> String {
    if let Some(rest) = url.strip_prefix("redis+socket://") {
        return format!("redis+unix://{rest}");
    }
    url.to_owned()
}

/// TLS to Redis, as kombu sets it up: for `rediss://`, or `redis://` with `broker_use_ssl`,
/// from the `ssl` options kombu's connection settled on (`ssl_cert_reqs`, `ssl_ca_certs`,
/// `ssl_certfile`, `ssl_keyfile`), which the zygote reports.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RedisTls {
    /// Verify the server's certificate and host name (`ssl_cert_reqs` other than CERT_NONE).
    pub verify: bool,
    /// PEM file of the CAs to trust; without one, the system's roots.
    pub ca_certs: Option<String>,
    /// A client certificate and its key (PEM), for servers that ask for one.
    pub certfile: Option<String>,
    pub keyfile: Option<String>,
}

impl RedisTls {
    /// `None`: plain TCP. `ssl` is kombu's `Connection.ssl`: a mapping, `true`, or nothing.
    pub fn from_kombu(url: &str, ssl: Option<&Value>) -> Option<RedisTls> {
        let options = match ssl {
            Some(Value::Object(m)) => m.clone(),
            Some(Value::Bool(true)) => Map::new(),
            // kombu: `rediss` without ssl options means CERT_NONE (it warns).
            _ if url.starts_with("rediss://") => return Some(RedisTls::default()),
            _ => return None,
        };
        // CERT_NONE, CERT_OPTIONAL, CERT_REQUIRED are 0, 1, 2; redis-py requires by default.
        let verify = match options.get("ssl_cert_reqs") {
            None | Some(Value::Null) => true,
            Some(Value::Number(n)) => n.as_i64() != Some(0),
            Some(Value::String(s)) => !matches!(s.as_str(), "CERT_NONE" | "none"),
            Some(_) => true,
        };
        let path = |k: &str| options.get(k).and_then(Value::as_str).map(str::to_owned);
        Some(RedisTls {
            verify,
            ca_certs: path("ssl_ca_certs"),
            certfile: path("ssl_certfile"),
            keyfile: path("ssl_keyfile"),
        })
    }
}

/// A client for `url`, over TLS when `tls` says so.
fn open_client(url: &str, tls: Option<&RedisTls>) -> Result<redis::Client, TransportError> {
    let url = to_client_url(url);
    let Some(tls) = tls else {
        return Ok(redis::Client::open(url)?);
    };
    let base = match url.split_once("://") {
        Some((_, rest)) => format!("rediss://{}", rest.split(['?', '#']).next().unwrap_or(rest)),
        None => return Err(TransportError::UnsupportedUrl(url)),
    };
    if !tls.verify {
        return Ok(redis::Client::open(format!("{base}#insecure"))?);
    }
    let read = |what: &str, path: &str| {
        std::fs::read(path).map_err(|e| TransportError::Tls(format!("cannot read {what} {path}: {e}")))
    };
    let root_cert = tls.ca_certs.as_deref().map(|p| read("ssl_ca_certs", p)).transpose()?;
    let client_tls = match (&tls.certfile, &tls.keyfile) {
        (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
            client_cert: read("ssl_certfile", cert)?,
            client_key: read("ssl_keyfile", key)?,
        }),
        _ => None,
    };
    if root_cert.is_none() && client_tls.is_none() {
        return Ok(redis::Client::open(base)?); // the system's roots
    }
    Ok(redis::Client::build_with_tls(base, redis::TlsCertificates { client_tls, root_cert })?)
}

/// `Channel._q_for_pri`: priority step 0 is the bare queue name.
fn queue_for_priority(queue: &str, step: u8) -> String {
    if step == 0 {
        queue.to_owned()
    } else {
        format!("{queue}{SEP}{step}")
    }
}

/// `Channel.priority`: clamp to 0..9 and round down to a step.
pub fn priority_step(priority: i64) -> u8 {
    let p = priority.clamp(0, 9) as u8;
    PRIORITY_STEPS.iter().copied().filter(|s| *s <= p).max().unwrap_or(0)
}

/// The key BRPOP returned, back to its queue name (strip the priority suffix).
fn queue_of_key(key: &str) -> &str {
    match key.rfind(SEP) {
        Some(i) if key[i + SEP.len()..].parse::<u8>().is_ok() => &key[..i],
        _ => key,
    }
}

/// The BRPOP key list: priority-major, queue-minor (`Channel._brpop_start`).
/// Take `add_consumer` / `cancel_consumer` changes into the round-robin order: dropped
/// queues leave it, new ones join at the back.
fn follow_queue_set(names: &mut Vec<String>, wanted: &[QueueSpec]) {
    names.retain(|n| wanted.iter().any(|q| &q.name == n));
    for q in wanted {
        if !names.contains(&q.name) {
            names.push(q.name.clone());
        }
    }
}

fn brpop_keys(prefix: &str, queues: &[String]) -> Vec<String> {
    PRIORITY_STEPS
        .iter()
        .flat_map(|step| queues.iter().map(move |q| format!("{prefix}{}", queue_for_priority(q, *step))))
        .collect()
}

fn envelope_priority(envelope_props: &Map<String, Value>) -> u8 {
    priority_step(envelope_props.get("priority").and_then(Value::as_i64).unwrap_or(0))
}

impl RedisTransport {
    pub async fn connect(url: &str, opts: RedisOptions) -> Result<Self, TransportError> {
        let client = open_client(url, opts.tls.as_ref())?;
        // Bounded waits: a command on a connection that went silent fails (and reconnects)
        // instead of holding up acks, and with them the prefetch window, for good.
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Duration::from_secs(5))
            .set_response_timeout(Duration::from_secs(10))
            .set_max_delay(2000)
            // One attempt per failed command: a first connect fails at once (the worker's own
            // start-up retries decide), and a later failure reconnects on the next command.
            .set_number_of_retries(1);
        let conn = ConnectionManager::new_with_config(client.clone(), config).await?;
        let receipt_key = format!("{}celeriac.taken.{}", opts.global_keyprefix, uuid::Uuid::new_v4());
        Ok(RedisTransport {
            client,
            conn,
            opts,
            held: Mutex::new(HashMap::new()),
            restore: Script::new(RESTORE_SCRIPT),
            take: Script::new(TAKE_SCRIPT),
            recover: Script::new(RECOVER_SCRIPT),
            receipt_key,
            consuming: Default::default(),
            shared_ok: std::sync::atomic::AtomicBool::new(true),
            connections: Default::default(),
        })
    }

    fn key(&self, name: &str) -> String {
        format!("{}{}", self.opts.global_keyprefix, name)
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The unacked record (`QoS.append`: hash and index) of a delivery BRPOP popped, to be sent
    /// on the connection acks go through, so Redis applies it before the delivery's ack. Nothing
    /// is sent until it is polled; it logs its own failure.
    fn unacked_record(&self, d: &Delivery, raw: &str) -> impl std::future::Future<Output = ()> + Send + 'static {
        let stored =
            format!("[{raw}, {}, {}]", Value::String(d.exchange.clone()), Value::String(d.routing_key.clone()));
        let mut pipe = redis::pipe();
        pipe.atomic()
            .zadd(self.key(&self.opts.unacked_index_key), &d.tag, now_secs())
            .ignore()
            .hset(self.key(&self.opts.unacked_key), &d.tag, stored)
            .ignore();
        let mut conn = self.conn.clone();
        let tag = d.tag.clone();
        async move {
            if let Err(e) = pipe.query_async::<()>(&mut conn).await {
                error!("Could not record delivery {tag} as unacked ({e}); it runs, unrecorded until its ack");
            }
        }
    }

    /// Take up to `max` waiting messages from `keys` (full key names, BRPOP's order) and record
    /// them as unacked in one atomic step (`TAKE_SCRIPT`): (key, envelope, recorded tag).
    /// `token` names the take in the receipt it leaves (see `recover_take`).
    async fn take_waiting(
        &self,
        c: &mut MultiplexedConnection,
        keys: &[String],
        max: usize,
        token: &str,
    ) -> Result<Vec<(String, String, Option<String>)>, TransportError> {
        let flat: Vec<String> = self
            .take
            .key(self.key(&self.opts.unacked_key))
            .key(self.key(&self.opts.unacked_index_key))
            .key(&self.receipt_key)
            .key(keys)
            .arg(max)
            .arg(now_secs())
            .arg(token)
            .invoke_async(c)
            .await?;
        let mut taken = Vec::with_capacity(flat.len() / 3);
        let mut parts = flat.into_iter();
        while let (Some(key), Some(raw), Some(tag)) = (parts.next(), parts.next(), parts.next()) {
            taken.push((key, raw, Some(tag).filter(|t| !t.is_empty())));
        }
        Ok(taken)
    }

    /// The take named `token` failed without a reply: if Redis ran it, its messages are
    /// recorded as unacked and nobody has them. Take them up again from those records (an
    /// empty list when the take never ran).
    async fn recover_take(
        &self,
        c: &mut MultiplexedConnection,
        token: &str,
    ) -> Result<Vec<(String, String, Option<String>)>, TransportError> {
        let flat: Vec<String> = self
            .recover
            .key(self.key(&self.opts.unacked_key))
            .key(self.key(&self.opts.unacked_index_key))
            .key(&self.receipt_key)
            .arg(token)
            .arg(now_secs())
            .invoke_async(c)
            .await?;
        let mut taken = Vec::with_capacity(flat.len() / 3);
        let mut parts = flat.into_iter();
        while let (Some(key), Some(stored), Some(tag)) = (parts.next(), parts.next(), parts.next()) {
            // The record is `[envelope, exchange, routing_key]` (`unacked_record`).
            match serde_json::from_str::<Value>(&stored) {
                Ok(Value::Array(mut record)) if !record.is_empty() => {
                    taken.push((key, record.swap_remove(0).to_string(), Some(tag)))
                }
                _ => warn!("Could not read the unacked record of {tag}; the visibility timeout brings it back"),
            }
        }
        Ok(taken)
    }

    /// Taken messages that will not be handed over (a stop, a cancelled queue): unrecorded and
    /// back at the front of their queues, in order.
    async fn put_back(&self, c: &mut MultiplexedConnection, taken: Vec<(String, String, Option<String>)>) {
        for (key, raw, recorded) in taken.into_iter().rev() {
            if let Some(tag) = recorded {
                self.unrecord(c, &tag).await;
            }
            let _: Result<(), _> = c.rpush(&key, &raw).await;
        }
    }

    fn connection_lost(&self, e: &dyn std::fmt::Display) {
        error!("consumer: Connection to broker lost: {e}. Trying to re-establish the connection...");
        self.consuming.store(false, std::sync::atomic::Ordering::Relaxed);
    }

    async fn unrecord(&self, c: &mut MultiplexedConnection, tag: &str) {
        let _: Result<(), _> = redis::pipe()
            .atomic()
            .zrem(self.key(&self.opts.unacked_index_key), tag)
            .ignore()
            .hdel(self.key(&self.opts.unacked_key), tag)
            .ignore()
            .query_async(c)
            .await;
    }

    /// One taken message (`key` as Redis named it, recorded as unacked under `recorded` if the
    /// take did so) to the consumer: decoded, recorded, remembered as held.
    async fn hand_over(
        &self,
        c: &mut MultiplexedConnection,
        full_key: &str,
        raw: String,
        recorded: Option<String>,
        names: &mut Vec<String>,
        deliveries: &mpsc::Sender<Incoming>,
    ) -> Handed {
        let key = full_key.strip_prefix(&self.opts.global_keyprefix).unwrap_or(full_key).to_owned();
        let queue = queue_of_key(&key).to_owned();
        if !names.contains(&queue) {
            // `cancel_consumer` came while the take was on its way: not ours any more.
            self.put_back(c, vec![(full_key.to_owned(), raw, recorded)]).await;
            return Handed::Skipped;
        }
        // Round-robin: the queue just served goes to the back (`queue_order_strategy`).
        if let Some(i) = names.iter().position(|n| *n == queue) {
            let n = names.remove(i);
            names.push(n);
        }
        let Some(delivery) = envelope::decode_or_discard(&raw, &queue, "") else {
            // Keep no unacked record of what nothing can run.
            if let Some(tag) = &recorded {
                self.unrecord(c, tag).await;
            }
            return Handed::Skipped;
        };
        // Popped by BRPOP, not recorded yet: recorded once the task is on its way to a child;
        // a crash in between loses it, as one right after the pop would.
        let record = (recorded.as_deref() != Some(delivery.tag.as_str())).then(|| self.unacked_record(&delivery, &raw));
        let priority = envelope_priority(&delivery.properties);
        self.held().insert(delivery.tag.clone(), Held { queue, priority, envelope: raw });
        let sent = deliveries.send(Incoming::Delivery(Box::new(delivery))).await;
        if let Some(record) = record {
            // Polled once with no await since the send, so it is on the connection before the
            // consumer can have the delivery (its ack follows it); the reply is awaited in the
            // background: the task does not wait a round trip for it.
            let mut record = Box::pin(record);
            if futures_lite::future::poll_once(&mut record).await.is_none() {
                tokio::spawn(record);
            }
        }
        if sent.is_err() {
            return Handed::ConsumerGone;
        }
        Handed::Delivered
    }

    async fn give_back(&self, tag: &str, held: Held, leftmost: bool) -> Result<bool, TransportError> {
        let mut conn = self.conn.clone();
        let target = self.key(&queue_for_priority(&held.queue, held.priority));
        let moved: i64 = self
            .restore
            .key(self.key(&self.opts.unacked_key))
            .key(self.key(&self.opts.unacked_index_key))
            .key(target)
            .arg(tag)
            .arg(mark_redelivered(&held.envelope))
            .arg(if leftmost { "left" } else { "right" })
            .invoke_async(&mut conn)
            .await?;
        Ok(moved == 1)
    }

    /// Stock sweeps every `unacked_restore_interval`; sweeping again as soon as the oldest
    /// unacked entry passes the visibility timeout brings a dead worker's messages back that
    /// much sooner (at most the interval, at least a second).
    async fn until_next_sweep(&self) -> Duration {
        let interval = self.opts.restore_interval.max(1.0);
        let mut conn = self.conn.clone();
        let oldest: Result<Vec<(String, f64)>, _> =
            conn.zrange_withscores(self.key(&self.opts.unacked_index_key), 0, 0).await;
        let due = match oldest {
            Ok(o) => match o.into_iter().next() {
                Some((_, score)) => score + self.opts.visibility_timeout - now_secs(),
                None => interval,
            },
            // The broker is out of reach: look again soon, not a whole interval later.
            Err(_) => 1.0,
        };
        Duration::from_secs_f64(due.clamp(1.0, interval))
    }

    /// `QoS.restore_visible`: give back messages unacked for longer than the visibility
    /// timeout whose worker is gone. Messages this worker holds are kept fresh instead.
    async fn restore_visible(&self) -> Result<usize, TransportError> {
        let mut conn = self.conn.clone();
        let token = uuid::Uuid::new_v4().to_string();
        let mutex = self.key(&self.opts.unacked_mutex_key);
        let locked: Option<String> = redis::cmd("SET")
            .arg(&mutex)
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(self.opts.unacked_mutex_expire * 1000)
            .query_async(&mut conn)
            .await?;
        if locked.is_none() {
            return Ok(0);
        }
        let ceil = now_secs() - self.opts.visibility_timeout;
        let stale: Vec<String> = conn.zrangebyscore(self.key(&self.opts.unacked_index_key), "-inf", ceil).await?;
        let mut restored = 0;
        for tag in stale {
            if self.held().contains_key(&tag) {
                continue;
            }
            let stored: Option<String> = conn.hget(self.key(&self.opts.unacked_key), &tag).await?;
            let Some(stored) = stored else {
                // Acked meanwhile, or an index entry without a message (kombu drops those too).
                let _: i64 = conn.zrem(self.key(&self.opts.unacked_index_key), &tag).await?;
                continue;
            };
            match parse_stored(&stored) {
                Some(held) => {
                    if self.give_back(&tag, held, false).await? {
                        restored += 1;
                    }
                }
                None => warn!("Could not restore message {tag}: unreadable unacked entry"),
            }
        }
        // Release the mutex only if it is still ours (redis-py's Lock does the same).
        let _: i64 =
            Script::new("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0")
                .key(&mutex)
                .arg(&token)
                .invoke_async(&mut conn)
                .await?;
        Ok(restored)
    }

    /// Keep the unacked index entries of messages we hold fresh, so no sweep (ours or a stock
    /// worker's) redelivers a task that is merely waiting or running here.
    async fn refresh_held(&self) -> Result<(), TransportError> {
        let tags: Vec<String> = self.held().keys().cloned().collect();
        if tags.is_empty() {
            return Ok(());
        }
        let now = now_secs();
        let mut pipe = redis::pipe();
        let index = self.key(&self.opts.unacked_index_key);
        for chunk in tags.chunks(500) {
            let mut cmd = redis::cmd("ZADD");
            cmd.arg(&index).arg("XX");
            for tag in chunk {
                cmd.arg(now).arg(tag);
            }
            pipe.add_command(cmd).ignore();
        }
        let mut conn = self.conn.clone();
        let refreshed = pipe.query_async::<()>(&mut conn).await;
        self.note_shared(&refreshed);
        Ok(refreshed?)
    }

    /// Whether the shared connection (acks, refreshes) works, for `/readyz`: with it down the
    /// worker cannot settle anything, whatever its consumer's connection says.
    fn note_shared<T>(&self, outcome: &redis::RedisResult<T>) {
        self.shared_ok.store(outcome.is_ok(), std::sync::atomic::Ordering::Relaxed);
    }
}

/// An `unacked` hash value: `[envelope, exchange, routing_key]`.
fn parse_stored(stored: &str) -> Option<Held> {
    let v: Value = serde_json::from_str(stored).ok()?;
    let arr = v.as_array()?;
    let envelope = arr.first()?;
    let exchange = arr.get(1).and_then(Value::as_str).unwrap_or("");
    let routing_key = arr.get(2).and_then(Value::as_str).unwrap_or("");
    // Anonymous exchange: the routing key is the queue. Named exchanges route by their
    // binding table; the queue a Celery task message came from is its routing key's queue.
    let _ = exchange;
    let props = envelope.get("properties").and_then(Value::as_object).cloned().unwrap_or_default();
    Some(Held { queue: routing_key.to_owned(), priority: envelope_priority(&props), envelope: envelope.to_string() })
}

/// What became of a message handed to the consumer.
enum Handed {
    Delivered,
    /// Not for this worker (cancelled queue, not an envelope): its slot stays free.
    Skipped,
    ConsumerGone,
}

/// What a fanout subscription hands on.
enum Fanout {
    /// (Re)subscribed: messages published from now on arrive.
    Subscribed,
    Message(Box<Delivery>),
}

impl RedisTransport {
    /// Take in `add_consumer` / `cancel_consumer` changes, declaring the bindings of queues
    /// added so producers routing through their exchanges reach them.
    async fn follow_queue_changes(&self, queues: &mut watch::Receiver<Vec<QueueSpec>>, names: &mut Vec<String>) {
        if !queues.has_changed().unwrap_or(false) {
            return;
        }
        let wanted = queues.borrow_and_update().clone();
        if let Err(e) = self.declare(&wanted).await {
            warn!("Could not declare the bindings of {:?}: {e}", wanted.iter().map(|q| &q.name));
        }
        follow_queue_set(names, &wanted);
    }

    /// Follow a fanout exchange (PSUBSCRIBE `pattern`) until `stop`, reconnecting with back-off;
    /// kombu envelopes are decoded, anything else is logged and skipped.
    fn follow_fanout(
        self: Arc<Self>,
        pattern: String,
        what: &'static str,
        out: mpsc::Sender<Fanout>,
        mut stop: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(200);
            loop {
                let subscribed = async {
                    let mut pubsub = self.client.get_async_pubsub().await?;
                    pubsub.psubscribe(&pattern).await?;
                    Ok::<_, redis::RedisError>(pubsub)
                };
                let mut pubsub = tokio::select! {
                    r = subscribed => match r {
                        Ok(p) => p,
                        Err(e) => {
                            warn!("{what}: cannot subscribe to {pattern:?}: {e}");
                            tokio::select! { _ = tokio::time::sleep(delay) => {}, _ = stop.changed() => return }
                            delay = (delay * 2).min(Duration::from_secs(10));
                            continue;
                        }
                    },
                    _ = stop.changed() => return,
                };
                delay = Duration::from_millis(200);
                if out.send(Fanout::Subscribed).await.is_err() {
                    return;
                }
                let mut messages = pubsub.on_message();
                loop {
                    let msg = tokio::select! {
                        m = futures_lite::StreamExt::next(&mut messages) => m,
                        _ = stop.changed() => return,
                    };
                    let Some(msg) = msg else { break };
                    let Ok(payload) = msg.get_payload::<String>() else { continue };
                    match decode_envelope(&payload, "") {
                        Ok(d) => {
                            if out.send(Fanout::Message(Box::new(d))).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => warn!("{what}: not a kombu envelope ({e}), ignored"),
                    }
                }
                warn!("{what}: subscription to {pattern:?} lost; reconnecting");
            }
        })
    }
}

impl Transport for RedisTransport {
    async fn declare(&self, queues: &[QueueSpec]) -> Result<(), TransportError> {
        // `_kombu.binding.<exchange>` and, since kombu 5.7, the permanent twin for queues
        // without `x-expires`, so producers routing through the exchange reach the queue.
        let mut pipe = redis::pipe();
        for q in queues {
            let exchange = if q.exchange.is_empty() { q.name.clone() } else { q.exchange.clone() };
            let member = format!("{}{SEP}{SEP}{}", q.routing_key, q.name);
            pipe.sadd(self.key(&format!("_kombu.binding.{exchange}")), &member).ignore();
            if !q.queue_arguments.contains_key("x-expires") {
                pipe.sadd(self.key(&format!("_kombu.binding_permanent.{exchange}")), &member).ignore();
            }
        }
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn).await?;
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
            let mut names: Vec<String> = queues.borrow_and_update().iter().map(|q| q.name.clone()).collect();
            let mut conn: Option<MultiplexedConnection> = None;
            let mut client_id: Option<i64> = None;
            let mut backoff = Duration::from_millis(100);
            // A take that failed without a reply (see `recover_take`).
            let mut unconfirmed_take: Option<String> = None;
            loop {
                if *stop.borrow() {
                    return;
                }
                let permit = tokio::select! {
                    p = window.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                    _ = stop.changed() => return,
                };
                if conn.is_none() {
                    // A connect that hangs (the broker accepts and never answers) is retried.
                    // No response timeout: BRPOP blocks, bounded by its own timeout.
                    let config = redis::AsyncConnectionConfig::new().set_connection_timeout(Duration::from_secs(5));
                    match self.client.get_multiplexed_async_connection_with_config(&config).await {
                        Ok(mut c) => {
                            // Its id lets a stop wake the BRPOP (CLIENT UNBLOCK, Redis >= 5).
                            client_id = redis::cmd("CLIENT").arg("ID").query_async(&mut c).await.ok();
                            conn = Some(c);
                            backoff = Duration::from_millis(100);
                            self.consuming.store(true, std::sync::atomic::Ordering::Relaxed);
                            self.connections.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        Err(e) => {
                            error!(
                                "consumer: Cannot connect to redis: {e}. Trying again in {:.2} seconds...",
                                backoff.as_secs_f64()
                            );
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(30));
                            continue;
                        }
                    }
                }
                self.follow_queue_changes(&mut queues, &mut names).await;
                if names.is_empty() {
                    // Every queue was cancelled: idle until one is added.
                    drop(permit);
                    tokio::select! {
                        // Seen by `changed`; marked again for `follow_queue_changes`.
                        Ok(()) = queues.changed() => queues.mark_changed(),
                        _ = stop.changed() => return,
                    }
                    continue;
                }
                let Some(c) = conn.as_mut() else { continue };
                if let Some(token) = unconfirmed_take.take() {
                    match self.recover_take(c, &token).await {
                        Ok(recovered) if !recovered.is_empty() => {
                            warn!("Took up {} message(s) whose take was cut off with the connection", recovered.len());
                            drop(permit);
                            for (key, raw, recorded) in recovered {
                                let Ok(permit) = window.clone().acquire_owned().await else { return };
                                match self.hand_over(c, &key, raw, recorded, &mut names, &deliveries).await {
                                    Handed::Delivered => permit.forget(),
                                    Handed::ConsumerGone => return,
                                    Handed::Skipped => {}
                                }
                            }
                            continue;
                        }
                        Ok(_) => {}
                        Err(e) => {
                            unconfirmed_take = Some(token);
                            self.connection_lost(&e);
                            conn = None;
                            continue;
                        }
                    }
                }
                let keys = brpop_keys(&self.opts.global_keyprefix, &names);
                // Every free prefetch slot, for one batched take of what is already waiting.
                let mut permits = vec![permit];
                while permits.len() < TAKE_BATCH {
                    match window.clone().try_acquire_owned() {
                        Ok(p) => permits.push(p),
                        Err(_) => break,
                    }
                }
                let token = uuid::Uuid::new_v4().to_string();
                let taken = match self.take_waiting(c, &keys, permits.len(), &token).await {
                    Ok(t) => t,
                    Err(e) => {
                        // Redis may have run it: look for its receipt once reconnected.
                        unconfirmed_take = Some(token);
                        self.connection_lost(&e);
                        conn = None;
                        continue;
                    }
                };
                if !taken.is_empty() {
                    if *stop.borrow() {
                        self.put_back(c, taken).await;
                        return;
                    }
                    self.follow_queue_changes(&mut queues, &mut names).await;
                    let mut taken = taken.into_iter();
                    for ((key, raw, recorded), permit) in taken.by_ref().zip(permits) {
                        match self.hand_over(c, &key, raw, recorded, &mut names, &deliveries).await {
                            Handed::Delivered => permit.forget(),
                            Handed::Skipped => {}
                            Handed::ConsumerGone => {
                                self.put_back(c, taken.collect()).await;
                                return;
                            }
                        }
                    }
                    continue;
                }
                // Nothing waiting: block for the next message with one slot.
                permits.truncate(1);
                let Some(permit) = permits.pop() else { continue };
                let mut brpop = redis::cmd("BRPOP");
                brpop.arg(&keys).arg(BRPOP_TIMEOUT);
                // Never abandoned half-way: a BRPOP dropped after Redis popped would lose the
                // message. It returns within BRPOP_TIMEOUT, or at once when a stop unblocks it.
                let popped: Result<Option<(String, String)>, _> = {
                    let pop = brpop.query_async(c);
                    tokio::pin!(pop);
                    tokio::select! {
                        popped = &mut pop => popped,
                        _ = stop.changed() => {
                            if let Some(id) = client_id {
                                let mut other = self.conn.clone();
                                let _: Result<i64, _> =
                                    redis::cmd("CLIENT").arg("UNBLOCK").arg(id).query_async(&mut other).await;
                            }
                            pop.await
                        }
                    }
                };
                if *stop.borrow() {
                    if let Ok(Some((key, raw))) = popped {
                        // Popped after we were told to stop: back to the front of its queue.
                        let _: Result<(), _> = c.rpush(&key, &raw).await;
                    }
                    return;
                }
                let (key, raw) = match popped {
                    Ok(Some(item)) => item,
                    Ok(None) => continue,
                    Err(e) => {
                        self.connection_lost(&e);
                        conn = None;
                        continue;
                    }
                };
                self.follow_queue_changes(&mut queues, &mut names).await;
                match self.hand_over(c, &key, raw, None, &mut names, &deliveries).await {
                    Handed::Delivered => permit.forget(),
                    Handed::Skipped => {}
                    Handed::ConsumerGone => return,
                }
            }
        })
    }

    async fn settle(&self, batch: Vec<Settle>) -> Result<(), TransportError> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        let mut give_back = Vec::new();
        for op in batch {
            match op {
                Settle::Ack(tag) | Settle::Reject(tag) => {
                    self.held().remove(&tag);
                    pipe.zrem(self.key(&self.opts.unacked_index_key), &tag).ignore();
                    pipe.hdel(self.key(&self.opts.unacked_key), &tag).ignore();
                }
                Settle::Forget(tag) => {
                    self.held().remove(&tag);
                }
                Settle::Requeue(tag) => give_back.push((tag, true)),
                Settle::Restore(tag) => give_back.push((tag, false)),
            }
        }
        let mut conn = self.conn.clone();
        let settled = pipe.query_async::<()>(&mut conn).await;
        self.note_shared(&settled);
        settled?;
        for (tag, leftmost) in give_back {
            let held = self.held().remove(&tag);
            if let Some(held) = held {
                self.give_back(&tag, held, leftmost).await?;
            }
        }
        Ok(())
    }

    async fn restore_all(&self) -> Result<usize, TransportError> {
        let all: Vec<(String, Held)> = self.held().drain().collect();
        let mut n = 0;
        for (tag, held) in all {
            if self.give_back(&tag, held, false).await? {
                n += 1;
            }
        }
        Ok(n)
    }

    fn pidbox(
        self: Arc<Self>,
        mailbox: Mailbox,
        requests: mpsc::Sender<ControlEvent>,
        stop: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        // Fanout on Redis is PUBLISH to `/<db>.<exchange>` (`fanout_prefix`); kombu's
        // `_kombu.binding.celery.pidbox` member is kept for tools that list mailboxes.
        let db = self.client.get_connection_info().redis.db;
        let topic = format!("{}/{db}.{}", self.opts.global_keyprefix, mailbox.exchange());
        let (tx, mut rx) = mpsc::channel(64);
        let follower = self.clone().follow_fanout(topic, "pidbox", tx, stop.clone());
        tokio::spawn(async move {
            let member = format!("{SEP}{SEP}{}", mailbox.queue());
            let mut conn = self.conn.clone();
            let _: Result<(), _> =
                conn.sadd(self.key(&format!("_kombu.binding.{}", mailbox.exchange())), &member).await;
            while let Some(item) = rx.recv().await {
                let event = match item {
                    Fanout::Subscribed => ControlEvent::Listening,
                    Fanout::Message(d) => match envelope::control_event(&d) {
                        Some(event) => event,
                        None => continue,
                    },
                };
                if requests.send(event).await.is_err() {
                    break;
                }
            }
            follower.abort();
        })
    }

    async fn broadcast(
        &self,
        mailbox: &Mailbox,
        method: &str,
        arguments: Value,
        timeout: Duration,
    ) -> Result<Vec<Value>, TransportError> {
        let oid = uuid::Uuid::new_v4().to_string();
        let reply_exchange = format!("reply.{}.pidbox", mailbox.namespace);
        let reply_queue = format!("{oid}.{reply_exchange}");
        let binding = self.key(&format!("_kombu.binding.{reply_exchange}"));
        let member = format!("{oid}{SEP}{SEP}{reply_queue}");
        let mut conn = self.conn.clone();
        let _: () = conn.sadd(&binding, &member).await?;
        let (body, ticket) = control_request(method, arguments, &reply_exchange, &oid);
        let db = self.client.get_connection_info().redis.db;
        let envelope = envelope::broadcast_request(&body, &mailbox.exchange(), timeout);
        let topic = format!("{}/{db}.{}", self.opts.global_keyprefix, mailbox.exchange());
        // PUBLISH answers how many subscribers (every worker's pidbox) received the request.
        let receivers: usize = conn.publish(topic, envelope).await?;
        // Collect from the reply list until the deadline, on a connection of our own (BRPOP blocks).
        let mut blocking = self.client.get_multiplexed_async_connection().await?;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut replies = Vec::new();
        while replies.len() < receivers {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now()).as_secs_f64();
            if left <= 0.0 {
                break;
            }
            let popped: Option<(String, String)> =
                redis::cmd("BRPOP").arg(self.key(&reply_queue)).arg(left.max(0.01)).query_async(&mut blocking).await?;
            let Some((_, raw)) = popped else { break };
            if let Ok(d) = decode_envelope(&raw, &reply_queue) {
                replies.extend(envelope::reply_to_ticket(&d, &ticket));
            }
        }
        let _: () = conn.srem(&binding, &member).await?;
        let _: () = conn.del(self.key(&reply_queue)).await?;
        Ok(replies)
    }

    async fn reply(&self, to: &ReplyTo, ticket: &str, clock: u64, body: &Value) -> Result<(), TransportError> {
        // A direct exchange on Redis: its binding table names the client's reply queue.
        let mut conn = self.conn.clone();
        let members: Vec<String> = conn.smembers(self.key(&format!("_kombu.binding.{}", to.exchange))).await?;
        let envelope = envelope::control_reply(body, to, ticket, clock);
        for member in members {
            let mut parts = member.split(SEP);
            let (Some(rk), Some(_pattern), Some(queue)) = (parts.next(), parts.next(), parts.next()) else { continue };
            if rk == to.routing_key {
                let _: () = conn.lpush(self.key(queue), &envelope).await?;
            }
        }
        Ok(())
    }

    async fn publish_event(&self, routing_key: &str, hostname: &str, body: &Value) -> Result<(), TransportError> {
        let db = self.client.get_connection_info().redis.db;
        let topic = format!("{}/{db}.celeryev/{routing_key}", self.opts.global_keyprefix);
        let envelope = envelope::event(body, hostname, routing_key);
        let mut conn = self.conn.clone();
        let _: i64 = conn.publish(topic, envelope).await?;
        Ok(())
    }

    fn subscribe_worker_events(
        self: Arc<Self>,
        _ttl_ms: u64,
        events: mpsc::Sender<PeerEvent>,
        stop: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        // kombu's `fanout_patterns`: events go to `/<db>.celeryev/<routing key>`, `#` → `*`.
        let db = self.client.get_connection_info().redis.db;
        let pattern = format!("{}/{db}.celeryev/worker.*", self.opts.global_keyprefix);
        let (tx, mut rx) = mpsc::channel(256);
        let follower = self.follow_fanout(pattern, "gossip", tx, stop);
        tokio::spawn(async move {
            while let Some(item) = rx.recv().await {
                let Fanout::Message(d) = item else { continue };
                let Some(event) = envelope::peer_event(&d) else { continue };
                if events.send(event).await.is_err() {
                    break;
                }
            }
            follower.abort();
        })
    }

    async fn beat_lead(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, TransportError> {
        let mut conn = self.conn.clone();
        let held: i64 = Script::new(BEAT_LEAD)
            .key(self.key(name))
            .arg(holder)
            .arg(ttl.as_millis() as u64)
            .invoke_async(&mut conn)
            .await?;
        Ok(held == 1)
    }

    async fn beat_resign(&self, name: &str, holder: &str) -> Result<(), TransportError> {
        let mut conn = self.conn.clone();
        let _: i64 = Script::new(BEAT_RESIGN).key(self.key(name)).arg(holder).invoke_async(&mut conn).await?;
        Ok(())
    }

    async fn beat_state(&self, name: &str) -> Result<Option<Value>, TransportError> {
        let mut conn = self.conn.clone();
        let raw: Option<String> = conn.get(self.key(&format!("{name}.state"))).await?;
        Ok(raw.and_then(|r| serde_json::from_str(&r).ok()))
    }

    async fn save_beat_state(&self, name: &str, state: &Value) -> Result<(), TransportError> {
        let mut conn = self.conn.clone();
        let _: () = conn.set(self.key(&format!("{name}.state")), state.to_string()).await?;
        Ok(())
    }

    fn connections(&self) -> u64 {
        self.connections.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn connected(&self) -> bool {
        self.consuming.load(std::sync::atomic::Ordering::Relaxed)
            && self.shared_ok.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn maintain(self: Arc<Self>, mut stop: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let refresh_every = Duration::from_secs_f64((self.opts.visibility_timeout / 4.0).clamp(1.0, 300.0));
            let mut refresh = tokio::time::interval(refresh_every);
            let mut next_sweep = tokio::time::Instant::now();
            loop {
                tokio::select! {
                    _ = refresh.tick() => {
                        if let Err(e) = self.refresh_held().await {
                            warn!("Could not refresh unacked messages: {e}");
                        }
                    }
                    _ = tokio::time::sleep_until(next_sweep) => {
                        match self.restore_visible().await {
                            Ok(0) => {}
                            Ok(n) => info!("Restored {n} unacknowledged message(s) past the visibility timeout"),
                            Err(e) => debug!("Visibility restore skipped: {e}"),
                        }
                        next_sweep = tokio::time::Instant::now() + self.until_next_sweep().await;
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

    #[test]
    fn tls_as_kombu_settles_it() {
        use serde_json::json;
        assert_eq!(RedisTls::from_kombu("redis://h/0", None), None);
        // rediss:// without options: CERT_NONE, as kombu.
        assert_eq!(RedisTls::from_kombu("rediss://h/0", None), Some(RedisTls::default()));
        let ssl = json!({"ssl_cert_reqs": 2, "ssl_ca_certs": "/ca.pem"});
        let tls = RedisTls::from_kombu("rediss://h/0", Some(&ssl)).unwrap();
        assert!(tls.verify);
        assert_eq!(tls.ca_certs.as_deref(), Some("/ca.pem"));
        // broker_use_ssl on a redis:// URL turns TLS on too; redis-py requires by default.
        let tls = RedisTls::from_kombu("redis://h/0", Some(&json!({"ssl_certfile": "c", "ssl_keyfile": "k"}))).unwrap();
        assert!(tls.verify && tls.certfile.is_some() && tls.keyfile.is_some());
        for none in
            [json!({"ssl_cert_reqs": 0}), json!({"ssl_cert_reqs": "none"}), json!({"ssl_cert_reqs": "CERT_NONE"})]
        {
            assert!(!RedisTls::from_kombu("rediss://h/0", Some(&none)).unwrap().verify);
        }
        assert!(RedisTls::from_kombu("rediss://h/0", Some(&json!({"ssl_cert_reqs": 1}))).unwrap().verify);
    }

    #[test]
    fn priority_steps_round_down() {
        assert_eq!(priority_step(0), 0);
        assert_eq!(priority_step(2), 0);
        assert_eq!(priority_step(5), 3);
        assert_eq!(priority_step(9), 9);
        assert_eq!(priority_step(42), 9);
        assert_eq!(priority_step(-1), 0);
    }

    #[test]
    fn brpop_order_is_priority_major() {
        let keys = brpop_keys("", &["a".into(), "b".into()]);
        assert_eq!(keys[0], "a");
        assert_eq!(keys[1], "b");
        assert_eq!(keys[2], "a\x06\x163");
        assert_eq!(keys[7], "b\x06\x169");
        assert_eq!(queue_of_key("a\x06\x163"), "a");
        assert_eq!(queue_of_key("plain"), "plain");
    }

    #[test]
    fn parses_unacked_entries() {
        let h = parse_stored(r#"[{"properties": {"priority": 6}}, "", "celery"]"#).unwrap();
        assert_eq!(h.queue, "celery");
        assert_eq!(h.priority, 6);
        assert!(parse_stored("garbage").is_none());
    }
}
