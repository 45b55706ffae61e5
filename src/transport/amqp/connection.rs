//! The connection that consumes tasks: an AMQP 0-9-1 client of celeriac's own, on the worker's
//! tokio runtime, with one channel.
//!
//! lapin (which the other RabbitMQ connections use) runs every connection's I/O on a thread of
//! its own, so each delivery and each ack crossed threads twice; on two CPUs that hand-off and
//! lapin's per-frame bookkeeping were a third of the supervisor's time per task, and the ack →
//! next delivery round trip it lengthened left the prefetch window idle. Here one task reads
//! the socket and hands whole deliveries over; acks are written to the socket by the caller.
//! Frames are written, and all but deliveries parsed, with `amq-protocol` (lapin's own codec);
//! a delivery's method and content header are read by `content`. Any frame size the
//! broker sends is accepted, so headers larger than the negotiated frame (never split) do not
//! close the connection.

use std::sync::Arc;
use std::time::Duration;

use amq_protocol::frame::{gen_frame, AMQPFrame, WriteContext};
use amq_protocol::protocol::{basic, channel, connection, exchange, queue, AMQPClass};
use amq_protocol::types::{AMQPValue, FieldTable, LongString};
use amq_protocol::uri::{AMQPScheme, AMQPUri};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

use super::content::{self, Content, Deliver};

const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_BODY: u8 = 3;
const FRAME_HEARTBEAT: u8 = 8;
const FRAME_END: u8 = 0xCE;
/// The one channel.
const CHANNEL: u16 = 1;
/// Larger frames than this are a broken stream, not a message.
const MAX_FRAME: usize = 256 * 1024 * 1024;

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Io(String),
    #[error("connection closed by the broker: {code} {text}")]
    ConnectionClosed { code: u16, text: String },
    #[error("channel closed by the broker: {code} {text}")]
    ChannelClosed { code: u16, text: String },
    #[error("missed heartbeats from the broker")]
    MissedHeartbeats,
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("the connection is closed")]
    Closed,
    #[error("connect timeout")]
    Timeout,
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e.to_string())
    }
}

/// A message as the broker delivered it: `basic.deliver`, its content header, its body.
pub struct RawDelivery {
    pub deliver: Deliver,
    pub content: Content,
    pub body: Vec<u8>,
}

/// What the reading task hands the consumer.
pub enum Event {
    Delivery(Box<RawDelivery>),
    /// The broker cancelled a consumer (its queue was deleted, ...).
    Cancelled(String),
    /// The connection or the channel is gone; nothing more comes.
    Closed(Error),
}

type Stream = Box<dyn AsyncReadWrite>;
trait AsyncReadWrite: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> AsyncReadWrite for T {}
type Writer = tokio::io::WriteHalf<Stream>;

/// Replies to synchronous methods, in the order the broker sent them; the reader's last word
/// is why it stopped.
type Replies = mpsc::UnboundedReceiver<Result<AMQPClass, Error>>;

pub struct TaskConnection {
    writer: Arc<tokio::sync::Mutex<Writer>>,
    /// One synchronous method (declare, qos, consume, cancel, close) at a time, holding this
    /// while it waits for its reply.
    replies: tokio::sync::Mutex<Replies>,
    reader: tokio::task::JoinHandle<()>,
    heartbeat: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for TaskConnection {
    fn drop(&mut self) {
        self.reader.abort();
        if let Some(h) = &self.heartbeat {
            h.abort();
        }
    }
}

fn encode(frame: &AMQPFrame) -> Result<Vec<u8>, Error> {
    gen_frame(frame)(WriteContext::from(Vec::with_capacity(64)))
        .map(|ctx| ctx.write)
        .map_err(|e| Error::Protocol(format!("cannot encode a frame: {e:?}")))
}

/// A method on the one channel.
fn method(class: AMQPClass) -> Result<Vec<u8>, Error> {
    encode(&AMQPFrame::Method(CHANNEL, class))
}

/// A method on channel 0, the connection's own.
fn connection_method(m: connection::AMQPMethod) -> Result<Vec<u8>, Error> {
    encode(&AMQPFrame::Method(0, AMQPClass::Connection(m)))
}

/// One frame: (type, channel, payload); the payload is read into `buf`.
async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> Result<(u8, u16), Error> {
    let mut head = [0u8; 7];
    r.read_exact(&mut head).await?;
    let kind = head[0];
    let channel = u16::from_be_bytes([head[1], head[2]]);
    let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
    if size > MAX_FRAME {
        return Err(Error::Protocol(format!("a frame of {size} bytes")));
    }
    buf.clear();
    buf.resize(size + 1, 0);
    r.read_exact(buf).await?;
    if buf.pop() != Some(FRAME_END) {
        return Err(Error::Protocol("a frame without its end marker".into()));
    }
    Ok((kind, channel))
}

fn parse_method(payload: &[u8]) -> Result<AMQPClass, Error> {
    amq_protocol::protocol::parse_class(payload)
        .map(|(_, class)| class)
        .map_err(|e| Error::Protocol(format!("cannot parse a method: {e}")))
}

/// During the handshake: the next method, or the broker's reason for closing.
async fn expect_method<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> Result<AMQPClass, Error> {
    loop {
        let (kind, _) = read_frame(r, buf).await?;
        match kind {
            FRAME_METHOD => {
                return match parse_method(buf)? {
                    AMQPClass::Connection(connection::AMQPMethod::Close(c)) => {
                        Err(Error::ConnectionClosed { code: c.reply_code, text: c.reply_text.as_str().to_owned() })
                    }
                    other => Ok(other),
                }
            }
            FRAME_HEARTBEAT => continue,
            other => return Err(Error::Protocol(format!("unexpected frame type {other} while connecting"))),
        }
    }
}

async fn open_stream(uri: &AMQPUri, tls_ca_file: Option<&str>) -> Result<Stream, Error> {
    let tcp = tokio::net::TcpStream::connect((uri.authority.host.as_str(), uri.authority.port)).await?;
    tcp.set_nodelay(true)?;
    if uri.scheme != AMQPScheme::AMQPS {
        return Ok(Box::new(tcp));
    }
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    match tls_ca_file {
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| Error::Io(format!("cannot read broker_use_ssl ca_certs {path}: {e}")))?;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|e| Error::Io(format!("{path}: {e}")))?;
                roots.add(cert).map_err(|e| Error::Io(format!("{path}: {e}")))?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Io(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from(uri.authority.host.clone())
        .map_err(|e| Error::Io(format!("{}: {e}", uri.authority.host)))?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await?;
    Ok(Box::new(tls))
}

fn client_properties(name: &str) -> FieldTable {
    let mut capabilities = FieldTable::default();
    for cap in ["consumer_cancel_notify", "connection.blocked", "authentication_failure_close", "basic.nack"] {
        capabilities.insert(cap.into(), AMQPValue::Boolean(true));
    }
    let mut props = FieldTable::default();
    props.insert("product".into(), AMQPValue::LongString("celeriac".into()));
    props.insert("version".into(), AMQPValue::LongString(env!("CARGO_PKG_VERSION").into()));
    props.insert("platform".into(), AMQPValue::LongString("Rust".into()));
    props.insert("connection_name".into(), AMQPValue::LongString(name.into()));
    props.insert("capabilities".into(), AMQPValue::FieldTable(capabilities));
    props
}

/// A delivery being put together from its method, header and body frames.
struct Assembling {
    deliver: Deliver,
    content: Option<Content>,
    body: Vec<u8>,
}

impl TaskConnection {
    /// Connect, log in, tune (asking for `frame_max`-byte frames and the URL's heartbeat, else
    /// the broker's) and open the channel. Deliveries and the end of the connection arrive on
    /// `events`.
    pub async fn open(
        uri: &AMQPUri,
        name: &str,
        frame_max: u32,
        tls_ca_file: Option<&str>,
        events: mpsc::Sender<Event>,
    ) -> Result<TaskConnection, Error> {
        let timeout = Duration::from_millis(uri.query.connection_timeout.unwrap_or(10_000).max(1));
        let handshake = async {
            let stream = open_stream(uri, tls_ca_file).await?;
            let (read, mut write) = tokio::io::split(stream);
            let mut read = BufReader::with_capacity(64 * 1024, read);
            let mut buf = Vec::with_capacity(4096);
            write.write_all(b"AMQP\x00\x00\x09\x01").await?;
            let AMQPClass::Connection(connection::AMQPMethod::Start(start)) =
                expect_method(&mut read, &mut buf).await?
            else {
                return Err(Error::Protocol("expected connection.start".into()));
            };
            let mechanisms = String::from_utf8_lossy(start.mechanisms.as_bytes()).into_owned();
            if !mechanisms.split_whitespace().any(|m| m == "PLAIN") {
                return Err(Error::Protocol(format!("the broker offers no PLAIN login ({mechanisms})")));
            }
            let user = &uri.authority.userinfo;
            let response = format!("\0{}\0{}", user.username, user.password);
            let start_ok = connection::StartOk {
                client_properties: client_properties(name),
                mechanism: "PLAIN".into(),
                response: LongString::from(response),
                locale: "en_US".into(),
            };
            write.write_all(&connection_method(connection::AMQPMethod::StartOk(start_ok))?).await?;
            // A refused login ends here: RabbitMQ says why (`authentication_failure_close`).
            let AMQPClass::Connection(connection::AMQPMethod::Tune(tune)) = expect_method(&mut read, &mut buf).await?
            else {
                return Err(Error::Protocol("expected connection.tune".into()));
            };
            let frame_max = match tune.frame_max {
                0 => frame_max,
                server => frame_max.min(server),
            };
            let heartbeat = uri.query.heartbeat.unwrap_or(tune.heartbeat);
            let tune_ok = connection::TuneOk { channel_max: tune.channel_max, frame_max, heartbeat };
            write.write_all(&connection_method(connection::AMQPMethod::TuneOk(tune_ok))?).await?;
            let open = connection::Open { virtual_host: uri.vhost.as_str().into() };
            write.write_all(&connection_method(connection::AMQPMethod::Open(open))?).await?;
            let AMQPClass::Connection(connection::AMQPMethod::OpenOk(_)) = expect_method(&mut read, &mut buf).await?
            else {
                return Err(Error::Protocol("expected connection.open-ok".into()));
            };
            write.write_all(&method(AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})))?).await?;
            let AMQPClass::Channel(channel::AMQPMethod::OpenOk(_)) = expect_method(&mut read, &mut buf).await? else {
                return Err(Error::Protocol("expected channel.open-ok".into()));
            };
            let (reply, replies) = mpsc::unbounded_channel();
            let writer = Arc::new(tokio::sync::Mutex::new(write));
            let every = (heartbeat > 0).then(|| Duration::from_secs(u64::from(heartbeat)));
            let reader = tokio::spawn(read_loop(read, buf, reply, events, every));
            let heartbeat = every.map(|every| tokio::spawn(send_heartbeats(Arc::downgrade(&writer), every)));
            Ok(TaskConnection { writer, replies: tokio::sync::Mutex::new(replies), reader, heartbeat })
        };
        tokio::time::timeout(timeout, handshake).await.map_err(|_| Error::Timeout)?
    }

    /// Write raw frame bytes.
    async fn send(&self, bytes: &[u8]) -> Result<(), Error> {
        let mut w = self.writer.lock().await;
        w.write_all(bytes).await.map_err(Error::from)
    }

    /// A synchronous method: send it and wait for the reply `is_reply` accepts. A reply to a
    /// method whose caller gave up waiting (a timeout) comes first and is passed over.
    async fn call(&self, class: AMQPClass, is_reply: fn(&AMQPClass) -> bool) -> Result<AMQPClass, Error> {
        let mut replies = self.replies.lock().await;
        self.send(&method(class)?).await?;
        loop {
            match replies.recv().await {
                Some(Ok(reply)) if is_reply(&reply) => return Ok(reply),
                Some(Ok(_stale)) => continue,
                Some(Err(e)) => return Err(e),
                None => return Err(Error::Closed),
            }
        }
    }

    pub async fn exchange_declare(
        &self,
        name: &str,
        kind: &str,
        durable: bool,
        auto_delete: bool,
        arguments: FieldTable,
    ) -> Result<(), Error> {
        let m = exchange::Declare {
            exchange: name.into(),
            kind: kind.into(),
            passive: false,
            durable,
            auto_delete,
            internal: false,
            nowait: false,
            arguments,
        };
        let is_reply = |c: &AMQPClass| matches!(c, AMQPClass::Exchange(exchange::AMQPMethod::DeclareOk(_)));
        self.call(AMQPClass::Exchange(exchange::AMQPMethod::Declare(m)), is_reply).await.map(drop)
    }

    pub async fn queue_declare(
        &self,
        name: &str,
        durable: bool,
        exclusive: bool,
        auto_delete: bool,
        arguments: FieldTable,
    ) -> Result<(), Error> {
        let m = queue::Declare {
            queue: name.into(),
            passive: false,
            durable,
            exclusive,
            auto_delete,
            nowait: false,
            arguments,
        };
        let is_reply = |c: &AMQPClass| matches!(c, AMQPClass::Queue(queue::AMQPMethod::DeclareOk(_)));
        self.call(AMQPClass::Queue(queue::AMQPMethod::Declare(m)), is_reply).await.map(drop)
    }

    pub async fn queue_bind(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<(), Error> {
        let m = queue::Bind {
            queue: queue.into(),
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            nowait: false,
            arguments,
        };
        let is_reply = |c: &AMQPClass| matches!(c, AMQPClass::Queue(queue::AMQPMethod::BindOk(_)));
        self.call(AMQPClass::Queue(queue::AMQPMethod::Bind(m)), is_reply).await.map(drop)
    }

    pub async fn basic_qos(&self, prefetch_count: u16, global: bool) -> Result<(), Error> {
        let m = basic::Qos { prefetch_count, global };
        let is_reply = |c: &AMQPClass| matches!(c, AMQPClass::Basic(basic::AMQPMethod::QosOk(_)));
        self.call(AMQPClass::Basic(basic::AMQPMethod::Qos(m)), is_reply).await.map(drop)
    }

    pub async fn basic_consume(&self, queue: &str, consumer_tag: &str) -> Result<(), Error> {
        let m = basic::Consume {
            queue: queue.into(),
            consumer_tag: consumer_tag.into(),
            no_local: false,
            no_ack: false,
            exclusive: false,
            nowait: false,
            arguments: FieldTable::default(),
        };
        let is_reply = |c: &AMQPClass| matches!(c, AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(_)));
        self.call(AMQPClass::Basic(basic::AMQPMethod::Consume(m)), is_reply).await.map(drop)
    }

    pub async fn basic_cancel(&self, consumer_tag: &str) -> Result<(), Error> {
        let m = basic::Cancel { consumer_tag: consumer_tag.into(), nowait: false };
        let is_reply = |c: &AMQPClass| matches!(c, AMQPClass::Basic(basic::AMQPMethod::CancelOk(_)));
        self.call(AMQPClass::Basic(basic::AMQPMethod::Cancel(m)), is_reply).await.map(drop)
    }

    /// Acks, rejects and requeues: written in one go, no reply.
    pub async fn settle(&self, acks: &[(u64, bool)], rejects: &[(u64, bool)]) -> Result<(), Error> {
        let mut bytes = Vec::with_capacity((acks.len() + rejects.len()) * 21);
        for &(delivery_tag, multiple) in acks {
            bytes.extend(method(AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack { delivery_tag, multiple })))?);
        }
        for &(delivery_tag, requeue) in rejects {
            bytes.extend(method(AMQPClass::Basic(basic::AMQPMethod::Reject(basic::Reject { delivery_tag, requeue })))?);
        }
        self.send(&bytes).await
    }

    /// Close the channel and the connection (the broker requeues whatever is unacked).
    pub async fn close(&self, reason: &str) {
        let close = channel::Close { reply_code: 200, reply_text: reason.into(), class_id: 0, method_id: 0 };
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            self.call(AMQPClass::Channel(channel::AMQPMethod::Close(close)), |c| {
                matches!(c, AMQPClass::Channel(channel::AMQPMethod::CloseOk(_)))
            }),
        )
        .await;
        let close = connection::Close { reply_code: 200, reply_text: reason.into(), class_id: 0, method_id: 0 };
        if let Ok(bytes) = connection_method(connection::AMQPMethod::Close(close)) {
            let _ = self.send(&bytes).await;
        }
        let mut w = self.writer.lock().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), w.shutdown()).await;
    }
}

/// RabbitMQ counts a connection dead after two silent heartbeat intervals: beat every half.
async fn send_heartbeats(writer: std::sync::Weak<tokio::sync::Mutex<Writer>>, every: Duration) {
    let mut tick = tokio::time::interval(every / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(writer) = writer.upgrade() else { return };
        let mut w = writer.lock().await;
        if w.write_all(&[FRAME_HEARTBEAT, 0, 0, 0, 0, 0, 0, FRAME_END]).await.is_err() {
            return;
        }
    }
}

/// Read frames until the connection ends: deliveries and cancellations to `events`, replies
/// to the method waiting for one.
async fn read_loop<R: AsyncRead + Unpin>(
    mut read: R,
    mut buf: Vec<u8>,
    replies: mpsc::UnboundedSender<Result<AMQPClass, Error>>,
    events: mpsc::Sender<Event>,
    heartbeat: Option<Duration>,
) {
    let error = read_frames(&mut read, &mut buf, &replies, &events, heartbeat).await;
    let _ = replies.send(Err(error.clone()));
    let _ = events.send(Event::Closed(error)).await;
}

async fn read_frames<R: AsyncRead + Unpin>(
    read: &mut R,
    buf: &mut Vec<u8>,
    replies: &mpsc::UnboundedSender<Result<AMQPClass, Error>>,
    events: &mpsc::Sender<Event>,
    heartbeat: Option<Duration>,
) -> Error {
    // Any frame shows the broker alive; two heartbeat intervals of silence mean it is not.
    let silence = heartbeat.map(|h| h * 2).unwrap_or(Duration::from_secs(365 * 24 * 3600));
    let mut assembling: Option<Assembling> = None;
    loop {
        let (kind, channel) = match tokio::time::timeout(silence, read_frame(read, buf)).await {
            Ok(Ok(frame)) => frame,
            Ok(Err(e)) => return e,
            Err(_) => return Error::MissedHeartbeats,
        };
        match kind {
            FRAME_HEARTBEAT => {}
            FRAME_METHOD => {
                // Deliveries, nearly every frame, are read by `content`; the rest in general.
                if let Some(deliver) = content::parse_deliver(buf) {
                    assembling = Some(Assembling { deliver, content: None, body: Vec::new() });
                    continue;
                }
                let class = match parse_method(buf) {
                    Ok(c) => c,
                    Err(e) => return e,
                };
                match class {
                    AMQPClass::Basic(basic::AMQPMethod::Cancel(c)) => {
                        if events.send(Event::Cancelled(c.consumer_tag.as_str().to_owned())).await.is_err() {
                            return Error::Closed;
                        }
                    }
                    AMQPClass::Connection(connection::AMQPMethod::Close(c)) => {
                        return Error::ConnectionClosed { code: c.reply_code, text: c.reply_text.as_str().to_owned() }
                    }
                    AMQPClass::Channel(channel::AMQPMethod::Close(c)) if channel == CHANNEL => {
                        return Error::ChannelClosed { code: c.reply_code, text: c.reply_text.as_str().to_owned() }
                    }
                    AMQPClass::Connection(connection::AMQPMethod::Blocked(b)) => {
                        tracing::warn!("RabbitMQ blocked the connection: {}", b.reason.as_str());
                    }
                    AMQPClass::Connection(connection::AMQPMethod::Unblocked(_)) => {
                        tracing::info!("RabbitMQ unblocked the connection");
                    }
                    other => {
                        let _ = replies.send(Ok(other));
                    }
                }
            }
            FRAME_HEADER => {
                let Some(a) = assembling.as_mut() else {
                    return Error::Protocol("a content header without a delivery".into());
                };
                let header = match content::parse_content_header(buf) {
                    Ok(h) => h,
                    Err(e) => return Error::Protocol(format!("cannot parse a content header: {e}")),
                };
                a.body = Vec::with_capacity(usize::try_from(header.body_size).unwrap_or(usize::MAX).min(MAX_FRAME));
                a.content = Some(header);
            }
            FRAME_BODY => {
                let Some(a) = assembling.as_mut() else {
                    return Error::Protocol("a content body without a delivery".into());
                };
                if a.content.is_none() {
                    return Error::Protocol("a content body before its header".into());
                }
                a.body.extend_from_slice(buf);
            }
            other => return Error::Protocol(format!("unknown frame type {other}")),
        }
        let complete = |a: &Assembling| a.content.as_ref().is_some_and(|c| a.body.len() as u64 >= c.body_size);
        if matches!(kind, FRAME_HEADER | FRAME_BODY) && assembling.as_ref().is_some_and(complete) {
            if let Some(Assembling { deliver, content: Some(content), body }) = assembling.take() {
                if events.send(Event::Delivery(Box::new(RawDelivery { deliver, content, body }))).await.is_err() {
                    return Error::Closed;
                }
            }
        }
    }
}
