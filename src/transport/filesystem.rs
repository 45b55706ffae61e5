//! kombu's folder transport (`filesystem://`, `kombu/transport/filesystem.py`): no server at
//! all, for local use and first runs. Laid out exactly as kombu lays it out, so stock
//! producers, `celery inspect` and stock workers share the folders with celeriac:
//!
//! - a message is one file `<monotonic ms>_<uuid4>.<queue>.msg` holding the virtual
//!   transport's JSON envelope (reference §2.1); producers write into `data_folder_out`,
//!   consumers read `data_folder_in` (the same folder when producer and worker share one);
//! - exchanges are binding tables `control_folder/<exchange>.exchange`: a JSON list of
//!   `[routing_key, pattern, queue]`, read under a shared and written under an exclusive
//!   `flock`, so direct, topic and fanout routing (pidbox, events) work across processes.
//!
//! Beyond stock: a message taken from the folder is moved, not deleted, until it is
//! acknowledged — into `data_folder_in/.celeriac-unacked/<node>/` — so a worker that is killed
//! gets it back when it starts again (kombu keeps unacked messages in memory only and loses
//! them with the process). Messages are written under a temporary name and renamed into
//! place, so no reader ever sees half a file.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::sync::{mpsc, watch, Semaphore};
use tracing::{error, info, warn};

use super::envelope::{self, decode_envelope, mark_redelivered};
use super::{
    control_request, ControlEvent, Incoming, Mailbox, PeerEvent, QueueSpec, ReplyTo, Settle, Transport, TransportError,
};

const UNACKED_DIR: &str = ".celeriac-unacked";
/// Inside a node's unacked folder: where no-ack consumers move a message while reading it.
const NO_ACK_DIR: &str = ".no-ack";
/// A writer that opened its file but has not locked it yet leaves it empty for an instant.
const EMPTY_FILE_RETRIES: u32 = 50;

/// `broker_transport_options` kombu reads for the folder transport.
#[derive(Debug, Clone)]
pub struct FilesystemOptions {
    pub data_folder_in: PathBuf,
    pub data_folder_out: PathBuf,
    pub control_folder: PathBuf,
    pub store_processed: bool,
    pub processed_folder: PathBuf,
    /// How long to wait between looks at an empty folder (kombu's default is 1 s; ours 0.1 s).
    pub polling_interval: Duration,
}

impl FilesystemOptions {
    pub fn from_transport_options(o: &Map<String, Value>) -> Self {
        let path = |k: &str, d: &str| PathBuf::from(o.get(k).and_then(Value::as_str).unwrap_or(d));
        FilesystemOptions {
            data_folder_in: path("data_folder_in", "data_in"),
            data_folder_out: path("data_folder_out", "data_out"),
            control_folder: path("control_folder", "control"),
            store_processed: o.get("store_processed").and_then(Value::as_bool).unwrap_or(false),
            processed_folder: path("processed_folder", "processed"),
            polling_interval: Duration::from_secs_f64(
                o.get("polling_interval").and_then(Value::as_f64).unwrap_or(0.1).clamp(0.005, 60.0),
            ),
        }
    }
}

/// How an exchange routes (`kombu/transport/virtual/exchange.py`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ExchangeType {
    Direct,
    Topic,
    Fanout,
}

/// One row of an exchange's binding table.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Binding {
    routing_key: String,
    pattern: String,
    queue: String,
}

/// A message this worker holds unsettled.
struct Held {
    queue: String,
    /// Its file name in the folder (kept, so a message given back goes to the front again).
    name: String,
    envelope: String,
}

/// The folders, with blocking file operations; the transport runs them off the async loop.
struct Folders {
    opts: FilesystemOptions,
    /// Where this node keeps the messages it holds: `data_folder_in/.celeriac-unacked/<node>`.
    unacked: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum FolderError {
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("invalid exchange name {0:?}")]
    ExchangeName(String),
}

impl From<FolderError> for TransportError {
    fn from(e: FolderError) -> Self {
        TransportError::Folder(e.to_string())
    }
}

fn io_err(what: &Path) -> impl FnOnce(std::io::Error) -> FolderError + '_ {
    move |e| FolderError::Io(what.display().to_string(), e)
}

/// kombu's file name clock: `time.monotonic()` in milliseconds, the same clock for every
/// process on the machine.
fn monotonic_ms() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

fn message_name(queue: &str) -> String {
    format!("{}_{}.{queue}.msg", monotonic_ms(), uuid::Uuid::new_v4())
}

/// `<ms>_<uuid>.<queue>.msg` → (ms, queue); anything else (our own subfolders, temporary
/// files, other files) is not a message.
fn parse_message_name(name: &str) -> Option<(u64, &str)> {
    let (stamp, rest) = name.split_once('.')?;
    let queue = rest.strip_suffix(".msg")?;
    let ms = stamp.split('_').next()?.parse().ok()?;
    Some((ms, queue))
}

/// Topic matching as kombu's `TopicExchange.key_to_pattern` builds it: `*` is one word
/// (no dots, not empty), `#` any text at all.
fn topic_matches(binding: &str, key: &str) -> bool {
    fn glob(pattern: &[&str], key: &str) -> bool {
        match pattern.split_first() {
            None => key.is_empty(),
            Some((&"#", rest)) => (0..=key.len()).filter(|i| key.is_char_boundary(*i)).any(|i| glob(rest, &key[i..])),
            Some((&"*", rest)) => {
                let word = key.find('.').unwrap_or(key.len());
                (1..=word).any(|i| glob(rest, &key[i..]))
            }
            Some((literal, rest)) => key.strip_prefix(literal).is_some_and(|k| glob(rest, k)),
        }
    }
    // Words joined by literal dots; wildcards are whole words.
    let mut tokens = Vec::new();
    for (i, word) in binding.split('.').enumerate() {
        if i > 0 {
            tokens.push(".");
        }
        tokens.push(word);
    }
    glob(&tokens, key)
}

fn lock(file: &File, how: libc::c_int) -> std::io::Result<()> {
    // SAFETY: flock on a descriptor we own; the lock goes with the file.
    if unsafe { libc::flock(file.as_raw_fd(), how) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl Folders {
    fn new(opts: FilesystemOptions, node: &str) -> Result<Folders, FolderError> {
        // kombu wants the folders made by hand; a newcomer is better served by making them.
        for dir in [&opts.data_folder_in, &opts.data_folder_out, &opts.control_folder] {
            fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        if opts.store_processed {
            fs::create_dir_all(&opts.processed_folder).map_err(io_err(&opts.processed_folder))?;
        }
        let safe_node: String =
            node.chars().map(|c| if c.is_ascii_alphanumeric() || "@._-".contains(c) { c } else { '_' }).collect();
        let unacked = opts.data_folder_in.join(UNACKED_DIR).join(safe_node);
        // What a no-ack consumer (mailbox, replies) had in hand when it last died is stale.
        let _ = fs::remove_dir_all(unacked.join(NO_ACK_DIR));
        fs::create_dir_all(&unacked).map_err(io_err(&unacked))?;
        Ok(Folders { opts, unacked })
    }

    fn exchange_file(&self, exchange: &str) -> Result<PathBuf, FolderError> {
        // `Channel._is_valid_exchange_name`: the name becomes a file name in the control folder.
        let valid = exchange.is_empty()
            || (exchange.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
                && !exchange.chars().all(|c| c == '.'));
        if !valid {
            return Err(FolderError::ExchangeName(exchange.to_owned()));
        }
        Ok(self.opts.control_folder.join(format!("{exchange}.exchange")))
    }

    /// `Channel.get_table`.
    fn table(&self, exchange: &str) -> Result<Vec<Binding>, FolderError> {
        let path = self.exchange_file(exchange)?;
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&path)(e)),
        };
        lock(&file, libc::LOCK_SH).map_err(io_err(&path))?;
        let mut text = String::new();
        file.read_to_string(&mut text).map_err(io_err(&path))?;
        Ok(parse_table(&text))
    }

    /// Add (`Channel._queue_bind`: at the front, once) or remove (`Channel._delete`) a row.
    fn change_binding(&self, exchange: &str, binding: &Binding, add: bool) -> Result<(), FolderError> {
        let path = self.exchange_file(exchange)?;
        let mut file = match OpenOptions::new().read(true).write(true).create(add).truncate(false).open(&path) {
            Ok(f) => f,
            Err(e) if !add && e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err(&path)(e)),
        };
        lock(&file, libc::LOCK_EX).map_err(io_err(&path))?;
        let mut text = String::new();
        file.read_to_string(&mut text).map_err(io_err(&path))?;
        let mut rows = parse_table(&text);
        let present = rows.contains(binding);
        match (add, present) {
            (true, false) => rows.insert(0, binding.clone()),
            (false, true) => rows.retain(|r| r != binding),
            _ => return Ok(()),
        }
        let json: Vec<Value> = rows.iter().map(|r| serde_json::json!([r.routing_key, r.pattern, r.queue])).collect();
        let bytes = serde_json::to_vec(&json).unwrap_or_else(|_| b"[]".to_vec());
        file.rewind().map_err(io_err(&path))?;
        file.write_all(&bytes).map_err(io_err(&path))?;
        file.set_len(bytes.len() as u64).map_err(io_err(&path))?;
        Ok(())
    }

    /// The queues a message published to `exchange` with `routing_key` goes to.
    fn route(&self, exchange: &str, kind: ExchangeType, routing_key: &str) -> Result<Vec<String>, FolderError> {
        let mut queues: Vec<String> = self
            .table(exchange)?
            .into_iter()
            .filter(|b| match kind {
                ExchangeType::Direct => b.routing_key == routing_key,
                ExchangeType::Topic => topic_matches(&b.routing_key, routing_key),
                ExchangeType::Fanout => true,
            })
            .map(|b| b.queue)
            .collect();
        queues.dedup();
        Ok(queues)
    }

    /// Write a message file: under a temporary name first, then renamed into place.
    fn put(&self, dir: &Path, name: &str, envelope: &str) -> Result<(), FolderError> {
        let tmp = dir.join(format!(".celeriac-tmp-{}", uuid::Uuid::new_v4()));
        fs::write(&tmp, envelope).map_err(io_err(&tmp))?;
        let target = dir.join(name);
        fs::rename(&tmp, &target).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            io_err(&target)(e)
        })
    }

    /// Publish (`basic_publish` → `_put` per routed queue) into `data_folder_out`.
    fn publish(
        &self,
        exchange: &str,
        kind: ExchangeType,
        routing_key: &str,
        envelope: &str,
    ) -> Result<usize, FolderError> {
        let queues = self.route(exchange, kind, routing_key)?;
        for queue in &queues {
            self.put(&self.opts.data_folder_out, &message_name(queue), envelope)?;
        }
        Ok(queues.len())
    }

    /// The messages waiting in `data_folder_in` for any of `queues`, oldest first.
    fn waiting(&self, queues: &[String]) -> Result<Vec<String>, FolderError> {
        let dir = &self.opts.data_folder_in;
        let mut found: Vec<(u64, String)> = fs::read_dir(dir)
            .map_err(io_err(dir))?
            .filter_map(Result::ok)
            .filter_map(|entry| entry.file_name().into_string().ok())
            .filter_map(|name| {
                let (ms, queue) = parse_message_name(&name)?;
                queues.iter().any(|q| q == queue).then_some((ms, name.clone()))
            })
            .collect();
        found.sort();
        Ok(found.into_iter().map(|(_, name)| name).collect())
    }

    /// Take one message: move it out of the queue into `into` (the unacked folder, or a
    /// scratch place for no-ack consumers) and read it. `None` if another consumer took it.
    fn take(&self, name: &str, into: &Path) -> Result<Option<String>, FolderError> {
        let from = self.opts.data_folder_in.join(name);
        let to = into.join(name);
        match fs::rename(&from, &to) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&from)(e)),
        }
        read_locked(&to).map(Some)
    }

    /// Take every waiting message of `queue` for a no-ack consumer (mailbox, replies, events):
    /// each is moved aside, read and removed.
    fn take_no_ack(&self, queue: &str) -> Result<Vec<String>, FolderError> {
        let scratch = self.unacked.join(NO_ACK_DIR);
        fs::create_dir_all(&scratch).map_err(io_err(&scratch))?;
        let mut out = Vec::new();
        for name in self.waiting(&[queue.to_owned()])? {
            if let Some(raw) = self.take(&name, &scratch)? {
                out.push(raw);
            }
            let _ = fs::remove_file(scratch.join(&name));
        }
        Ok(out)
    }

    /// Settle a held message: gone (or kept in `processed_folder` with `store_processed`).
    fn finish(&self, name: &str) {
        let path = self.unacked.join(name);
        let done = if self.opts.store_processed {
            fs::rename(&path, self.opts.processed_folder.join(name))
        } else {
            fs::remove_file(&path)
        };
        if let Err(e) = done {
            warn!("Could not remove acknowledged message file {}: {e}", path.display());
        }
    }

    /// Back into the queue, marked redelivered: under its own name (front of the queue) or a
    /// new one (back of the queue).
    fn give_back(&self, held: &Held, to_front: bool) -> Result<(), FolderError> {
        let name = if to_front { held.name.clone() } else { message_name(&held.queue) };
        self.put(&self.opts.data_folder_in, &name, &mark_redelivered(&held.envelope))?;
        let _ = fs::remove_file(self.unacked.join(&held.name));
        Ok(())
    }

    /// Messages a previous run of this node held when it died: back to the front of their queues.
    fn restore_orphans(&self) -> Result<usize, FolderError> {
        let mut n = 0;
        for entry in fs::read_dir(&self.unacked).map_err(io_err(&self.unacked))?.filter_map(Result::ok) {
            let Ok(name) = entry.file_name().into_string() else { continue };
            let Some((_, queue)) = parse_message_name(&name) else { continue };
            let envelope = read_locked(&entry.path())?;
            let held = Held { queue: queue.to_owned(), name: name.clone(), envelope };
            self.give_back(&held, true)?;
            n += 1;
        }
        Ok(n)
    }

    /// Drop every waiting message of `queue` (a mailbox's stale requests).
    fn purge(&self, queue: &str) -> Result<usize, FolderError> {
        let names = self.waiting(&[queue.to_owned()])?;
        Ok(names.iter().filter(|n| fs::remove_file(self.opts.data_folder_in.join(n)).is_ok()).count())
    }
}

/// Read a message file once no writer holds it (kombu's producer writes under `LOCK_EX`).
fn read_locked(path: &Path) -> Result<String, FolderError> {
    for _ in 0..EMPTY_FILE_RETRIES {
        let mut file = File::open(path).map_err(io_err(path))?;
        lock(&file, libc::LOCK_SH).map_err(io_err(path))?;
        let mut text = String::new();
        file.read_to_string(&mut text).map_err(io_err(path))?;
        if !text.is_empty() {
            return Ok(text);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(String::new())
}

/// A binding table's JSON; unreadable rows are skipped.
fn parse_table(text: &str) -> Vec<Binding> {
    let Ok(Value::Array(rows)) = serde_json::from_str::<Value>(text) else { return Vec::new() };
    rows.iter()
        .filter_map(|row| {
            let cell = |i: usize| row.get(i).and_then(Value::as_str).map(str::to_owned);
            Some(Binding { routing_key: cell(0)?, pattern: cell(1).unwrap_or_default(), queue: cell(2)? })
        })
        .collect()
}

/// `TopicExchange.prepare_bind` stores the regex kombu matches with; other types store "".
fn binding(kind: ExchangeType, routing_key: &str, queue: &str) -> Binding {
    let pattern = if kind == ExchangeType::Topic {
        let words: Vec<String> = routing_key
            .split('.')
            .map(|w| match w {
                "*" => r"[^\.]+".to_owned(),
                "#" => ".*?".to_owned(),
                w => {
                    w.chars()
                        .map(|c| {
                            if c.is_ascii_alphanumeric() || "_-".contains(c) {
                                c.to_string()
                            } else {
                                format!("\\{c}")
                            }
                        })
                        .collect()
                }
            })
            .collect();
        format!("^{}$", words.join(r"\."))
    } else {
        String::new()
    };
    Binding { routing_key: routing_key.to_owned(), pattern, queue: queue.to_owned() }
}

fn exchange_type(name: &str) -> ExchangeType {
    match name {
        "fanout" => ExchangeType::Fanout,
        "topic" => ExchangeType::Topic,
        _ => ExchangeType::Direct,
    }
}

pub struct FilesystemTransport {
    folders: Arc<Folders>,
    held: Mutex<HashMap<String, Held>>,
    /// Beat's leader lock: an exclusive `flock` on a file in the control folder, held open.
    beat_lock: Mutex<Option<File>>,
}

/// Run a blocking folder operation off the async loop.
async fn blocking<R: Send + 'static>(
    folders: &Arc<Folders>,
    f: impl FnOnce(&Folders) -> Result<R, FolderError> + Send + 'static,
) -> Result<R, TransportError> {
    let folders = folders.clone();
    match tokio::task::spawn_blocking(move || f(&folders)).await {
        Ok(r) => r.map_err(TransportError::from),
        Err(e) => Err(TransportError::Folder(format!("folder operation failed: {e}"))),
    }
}

impl FilesystemTransport {
    /// Open (and create, if need be) the folders; `node` names this worker's unacked folder.
    pub fn open(opts: FilesystemOptions, node: &str) -> Result<Self, TransportError> {
        let folders = Folders::new(opts, node)?;
        Ok(FilesystemTransport {
            folders: Arc::new(folders),
            held: Mutex::new(HashMap::new()),
            beat_lock: Mutex::new(None),
        })
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Consume `queue` without acknowledgements (mailboxes, reply and event queues): each
    /// message is taken and removed, and handed on decoded.
    fn follow_queue(
        self: Arc<Self>,
        queue: String,
        out: mpsc::Sender<super::Delivery>,
        mut stop: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let interval = self.folders.opts.polling_interval;
            loop {
                let q = queue.clone();
                match blocking(&self.folders, move |f| f.take_no_ack(&q)).await {
                    Ok(raws) => {
                        for raw in raws {
                            match decode_envelope(&raw, &queue) {
                                Ok(d) => {
                                    if out.send(d).await.is_err() {
                                        return;
                                    }
                                }
                                Err(e) => warn!("{queue}: not a kombu envelope ({e}), ignored"),
                            }
                        }
                    }
                    Err(e) => warn!("{queue}: {e}"),
                }
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = stop.changed() => return,
                }
            }
        })
    }

    /// Bind `queue` for the duration of a no-ack subscription; purge and unbind it after.
    async fn bind(
        &self,
        exchange: &str,
        kind: ExchangeType,
        routing_key: &str,
        queue: &str,
    ) -> Result<(), TransportError> {
        let (exchange, row) = (exchange.to_owned(), binding(kind, routing_key, queue));
        let q = queue.to_owned();
        blocking(&self.folders, move |f| {
            f.purge(&q)?;
            f.change_binding(&exchange, &row, true)
        })
        .await
    }

    async fn unbind(&self, exchange: &str, kind: ExchangeType, routing_key: &str, queue: &str) {
        let (exchange, row) = (exchange.to_owned(), binding(kind, routing_key, queue));
        let q = queue.to_owned();
        if let Err(e) = blocking(&self.folders, move |f| {
            f.change_binding(&exchange, &row, false)?;
            f.purge(&q).map(|_| ())
        })
        .await
        {
            warn!("Could not unbind queue {queue}: {e}");
        }
    }

    async fn publish(
        &self,
        exchange: &str,
        kind: ExchangeType,
        routing_key: &str,
        envelope: String,
    ) -> Result<usize, TransportError> {
        let (exchange, routing_key) = (exchange.to_owned(), routing_key.to_owned());
        blocking(&self.folders, move |f| f.publish(&exchange, kind, &routing_key, &envelope)).await
    }
}

impl Transport for FilesystemTransport {
    async fn declare(&self, queues: &[QueueSpec]) -> Result<(), TransportError> {
        let rows: Vec<(String, Binding)> = queues
            .iter()
            .map(|q| {
                let exchange = if q.exchange.is_empty() { q.name.clone() } else { q.exchange.clone() };
                (exchange, binding(exchange_type(&q.exchange_type), &q.routing_key, &q.name))
            })
            .collect();
        blocking(&self.folders, move |f| {
            rows.iter().try_for_each(|(exchange, row)| f.change_binding(exchange, row, true))
        })
        .await
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
            match blocking(&self.folders, |f| f.restore_orphans()).await {
                Ok(0) => {}
                Ok(n) => {
                    info!("Restored {n} message(s) this worker held when it last stopped without giving them back")
                }
                Err(e) => error!("Could not restore the messages this worker held before: {e}"),
            }
            let interval = self.folders.opts.polling_interval;
            let mut names: Vec<String> = queues.borrow_and_update().iter().map(|q| q.name.clone()).collect();
            loop {
                if queues.has_changed().unwrap_or(false) {
                    let wanted = queues.borrow_and_update().clone();
                    if let Err(e) = self.declare(&wanted).await {
                        warn!("Could not declare the bindings of {:?}: {e}", wanted.iter().map(|q| &q.name));
                    }
                    names = wanted.iter().map(|q| q.name.clone()).collect();
                }
                let list = names.clone();
                let waiting = match blocking(&self.folders, move |f| f.waiting(&list)).await {
                    Ok(w) => w,
                    Err(e) => {
                        error!("consumer: Cannot read the queue folder: {e}");
                        Vec::new()
                    }
                };
                let mut took_any = false;
                for name in waiting {
                    let permit = tokio::select! {
                        p = window.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                        _ = stop.changed() => return,
                    };
                    if *stop.borrow() || queues.has_changed().unwrap_or(false) {
                        break;
                    }
                    let file = name.clone();
                    let taken = blocking(&self.folders, move |f| f.take(&file, &f.unacked)).await;
                    let raw = match taken {
                        Ok(Some(raw)) => raw,
                        Ok(None) => continue, // another consumer took it first
                        Err(e) => {
                            error!("consumer: Cannot take message {name}: {e}");
                            continue;
                        }
                    };
                    let queue = parse_message_name(&name).map(|(_, q)| q.to_owned()).unwrap_or_default();
                    let Some(delivery) = envelope::decode_or_discard(&raw, &queue, "") else {
                        self.folders.finish(&name);
                        continue;
                    };
                    took_any = true;
                    self.held().insert(delivery.tag.clone(), Held { queue, name, envelope: raw });
                    permit.forget();
                    if deliveries.send(Incoming::Delivery(Box::new(delivery))).await.is_err() {
                        return;
                    }
                }
                if !took_any {
                    tokio::select! {
                        _ = tokio::time::sleep(interval) => {}
                        // Seen by `changed`; marked again so the loop's check picks it up.
                        Ok(()) = queues.changed() => queues.mark_changed(),
                        _ = stop.changed() => return,
                    }
                }
            }
        })
    }

    async fn settle(&self, batch: Vec<Settle>) -> Result<(), TransportError> {
        let mut done = Vec::new();
        let mut back = Vec::new();
        {
            let mut held = self.held();
            for op in batch {
                match op {
                    Settle::Ack(tag) | Settle::Reject(tag) => done.extend(held.remove(&tag).map(|h| h.name)),
                    Settle::Forget(tag) => {
                        held.remove(&tag);
                    }
                    Settle::Requeue(tag) => back.extend(held.remove(&tag).map(|h| (h, false))),
                    Settle::Restore(tag) => back.extend(held.remove(&tag).map(|h| (h, true))),
                }
            }
        }
        blocking(&self.folders, move |f| {
            for name in done {
                f.finish(&name);
            }
            back.iter().try_for_each(|(held, to_front)| f.give_back(held, *to_front))
        })
        .await
    }

    async fn restore_all(&self) -> Result<usize, TransportError> {
        let all: Vec<Held> = self.held().drain().map(|(_, h)| h).collect();
        let n = all.len();
        blocking(&self.folders, move |f| all.iter().try_for_each(|held| f.give_back(held, true))).await?;
        Ok(n)
    }

    fn pidbox(
        self: Arc<Self>,
        mailbox: Mailbox,
        requests: mpsc::Sender<ControlEvent>,
        mut stop: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let (exchange, queue) = (mailbox.exchange(), mailbox.queue());
            // Requests left from an earlier run of this node are stale: dropped on binding.
            if let Err(e) = self.bind(&exchange, ExchangeType::Fanout, "", &queue).await {
                error!("pidbox: cannot bind the mailbox {queue}: {e}; remote control is off");
                let _ = requests.send(ControlEvent::Listening).await;
                return;
            }
            let _ = requests.send(ControlEvent::Listening).await;
            let (tx, mut rx) = mpsc::channel(64);
            let follower = self.clone().follow_queue(queue.clone(), tx, stop.clone());
            loop {
                let d = tokio::select! {
                    d = rx.recv() => match d { Some(d) => d, None => break },
                    _ = stop.changed() => break,
                };
                let Some(event) = envelope::control_event(&d) else { continue };
                if requests.send(event).await.is_err() {
                    break;
                }
            }
            follower.abort();
            self.unbind(&exchange, ExchangeType::Fanout, "", &queue).await;
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
        self.bind(&reply_exchange, ExchangeType::Direct, &oid, &reply_queue).await?;
        let (body, ticket) = control_request(method, arguments, &reply_exchange, &oid);
        let request = envelope::broadcast_request(&body, &mailbox.exchange(), timeout);
        self.publish(&mailbox.exchange(), ExchangeType::Fanout, "", request).await?;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut replies = Vec::new();
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(self.folders.opts.polling_interval).await;
            let q = reply_queue.clone();
            for raw in blocking(&self.folders, move |f| f.take_no_ack(&q)).await? {
                if let Ok(d) = decode_envelope(&raw, &reply_queue) {
                    replies.extend(envelope::reply_to_ticket(&d, &ticket));
                }
            }
        }
        self.unbind(&reply_exchange, ExchangeType::Direct, &oid, &reply_queue).await;
        Ok(replies)
    }

    async fn reply(&self, to: &ReplyTo, ticket: &str, clock: u64, body: &Value) -> Result<(), TransportError> {
        let reply = envelope::control_reply(body, to, ticket, clock);
        self.publish(&to.exchange, ExchangeType::Direct, &to.routing_key, reply).await?;
        Ok(())
    }

    async fn publish_event(&self, routing_key: &str, hostname: &str, body: &Value) -> Result<(), TransportError> {
        self.publish("celeryev", ExchangeType::Topic, routing_key, envelope::event(body, hostname, routing_key))
            .await?;
        Ok(())
    }

    fn subscribe_worker_events(
        self: Arc<Self>,
        _ttl_ms: u64,
        events: mpsc::Sender<PeerEvent>,
        stop: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let queue = format!("celeryev.{}", uuid::Uuid::new_v4());
            if let Err(e) = self.bind("celeryev", ExchangeType::Topic, "worker.#", &queue).await {
                warn!("gossip: cannot bind {queue}: {e}");
                return;
            }
            let (tx, mut rx) = mpsc::channel(256);
            let follower = self.clone().follow_queue(queue.clone(), tx, stop.clone());
            let mut stop = stop;
            loop {
                let d = tokio::select! {
                    d = rx.recv() => match d { Some(d) => d, None => break },
                    _ = stop.changed() => break,
                };
                let Some(event) = envelope::peer_event(&d) else { continue };
                if events.send(event).await.is_err() {
                    break;
                }
            }
            follower.abort();
            self.unbind("celeryev", ExchangeType::Topic, "worker.#", &queue).await;
        })
    }

    async fn beat_lead(&self, name: &str, _holder: &str, _ttl: Duration) -> Result<bool, TransportError> {
        let mut held = self.beat_lock.lock().unwrap_or_else(|p| p.into_inner());
        if held.is_some() {
            return Ok(true);
        }
        let path = self.folders.opts.control_folder.join(format!("{name}.lock"));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| TransportError::Folder(format!("{}: {e}", path.display())))?;
        // The lock dies with the process that holds it: no expiry needed.
        if lock(&file, libc::LOCK_EX | libc::LOCK_NB).is_err() {
            return Ok(false);
        }
        *held = Some(file);
        Ok(true)
    }

    async fn beat_resign(&self, _name: &str, _holder: &str) -> Result<(), TransportError> {
        self.beat_lock.lock().unwrap_or_else(|p| p.into_inner()).take();
        Ok(())
    }

    async fn beat_state(&self, name: &str) -> Result<Option<Value>, TransportError> {
        let path = self.folders.opts.control_folder.join(format!("{name}.state"));
        Ok(fs::read_to_string(path).ok().and_then(|t| serde_json::from_str(&t).ok()))
    }

    async fn save_beat_state(&self, name: &str, state: &Value) -> Result<(), TransportError> {
        let (name, text) = (format!("{name}.state"), state.to_string());
        blocking(&self.folders, move |f| {
            let dir = f.opts.control_folder.clone();
            f.put(&dir, &name, &text)
        })
        .await
    }

    fn connected(&self) -> bool {
        self.folders.opts.data_folder_in.is_dir()
    }

    fn connections(&self) -> u64 {
        1
    }

    fn maintain(self: Arc<Self>, stop: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
        // Nothing expires in a folder.
        super::idle_until(stop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_names_as_kombu_writes_them() {
        assert_eq!(parse_message_name("1234_0f0e.celery.msg"), Some((1234, "celery")));
        assert_eq!(parse_message_name("99_ab.w1@host.celery.pidbox.msg"), Some((99, "w1@host.celery.pidbox")));
        assert_eq!(parse_message_name(".celeriac-unacked"), None);
        assert_eq!(parse_message_name(".celeriac-tmp-1234"), None);
        let name = message_name("celery");
        assert_eq!(parse_message_name(&name).map(|(_, q)| q), Some("celery"));
    }

    #[test]
    fn topic_matching_follows_kombu() {
        assert!(topic_matches("#", "worker.heartbeat"));
        assert!(topic_matches("worker.#", "worker.heartbeat"));
        assert!(topic_matches("worker.#", "worker."));
        assert!(!topic_matches("worker.#", "task.multi"));
        assert!(topic_matches("*.multi", "task.multi"));
        assert!(!topic_matches("*.multi", "a.task.multi"));
        assert!(!topic_matches("*", ""));
        assert!(topic_matches("task.*", "task.succeeded"));
        assert!(!topic_matches("task.*", "task.a.b"));
    }

    #[test]
    fn bindings_store_kombu_patterns() {
        assert_eq!(binding(ExchangeType::Topic, "worker.#", "q").pattern, r"^worker\..*?$");
        assert_eq!(binding(ExchangeType::Direct, "celery", "celery").pattern, "");
        let rows = parse_table(r#"[["celery", "", "celery"], ["bad"], ["rk", null, "q"]]"#);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].queue, "q");
    }

    #[test]
    fn a_message_goes_round_the_folders() {
        let dir = std::env::temp_dir().join(format!("celeriac-fs-{}", uuid::Uuid::new_v4()));
        let opts = FilesystemOptions::from_transport_options(
            &serde_json::from_value(serde_json::json!({
                "data_folder_in": dir.join("q"), "data_folder_out": dir.join("q"), "control_folder": dir.join("c"),
            }))
            .unwrap(),
        );
        let folders = Folders::new(opts, "w1@host").unwrap();
        folders.change_binding("celery", &binding(ExchangeType::Direct, "celery", "celery"), true).unwrap();
        folders.change_binding("celery", &binding(ExchangeType::Direct, "celery", "celery"), true).unwrap();
        assert_eq!(folders.table("celery").unwrap().len(), 1);
        let message = envelope::encode_json(&serde_json::json!([1]), serde_json::json!({}), "celery", "celery", 2);
        assert_eq!(folders.publish("celery", ExchangeType::Direct, "celery", &message).unwrap(), 1);
        let waiting = folders.waiting(&["celery".into()]).unwrap();
        assert_eq!(waiting.len(), 1);
        let raw = folders.take(&waiting[0], &folders.unacked).unwrap().unwrap();
        assert_eq!(raw, message);
        assert!(folders.take(&waiting[0], &folders.unacked).unwrap().is_none());
        assert_eq!(folders.restore_orphans().unwrap(), 1);
        let again = folders.waiting(&["celery".into()]).unwrap();
        assert_eq!(again, waiting); // back under its own name: the front of the queue
        assert!(folders.exchange_file("../evil").is_err());
        let _ = fs::remove_dir_all(dir);
    }
}
