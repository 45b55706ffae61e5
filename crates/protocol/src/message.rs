//! Telling protocol v1 from v2 and reading the scheduling fields
//! (`celery/worker/consumer/consumer.py: on_task_received`, `celery/worker/request.py`).

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use crate::frame;
use crate::marshal;
use crate::time::parse_iso8601;
use crate::Delivery;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    V1,
    V2,
}

/// What the stock consumer would do with a message it cannot turn into a request.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MessageError {
    /// Headers not a mapping, or no `task` anywhere: logged and rejected (no requeue).
    #[error("unknown message format: {0}")]
    UnknownFormat(String),
    /// The body could not be decoded: logged critical and acked.
    #[error("can't decode message body: {0}")]
    Decode(String),
    /// `InvalidTaskError`: logged and rejected (no requeue). The task's id and name, where the
    /// message has them, so the failure can be stored for whoever waits on the result.
    #[error("invalid task message: {detail}")]
    Invalid { detail: String, id: Option<String>, name: Option<String> },
}

impl MessageError {
    fn invalid(detail: String, id: Option<&str>, name: Option<&str>) -> Self {
        MessageError::Invalid { detail, id: id.map(str::to_owned), name: name.map(str::to_owned) }
    }
}

/// The fields of a task message the supervisor acts on.
#[derive(Debug, Clone)]
pub struct TaskMessage {
    pub protocol: Protocol,
    pub name: String,
    pub id: String,
    /// Display name for logs (`shadow` header), else the task name.
    pub shadow: Option<String>,
    pub eta: Option<DateTime<Utc>>,
    pub expires: Option<DateTime<Utc>>,
    pub root_id: Option<String>,
    pub parent_id: Option<String>,
    pub retries: i64,
    pub argsrepr: String,
    pub kwargsrepr: String,
    /// Stamps (`stamps` header), for `revoke_by_stamped_headers`.
    pub stamps: Map<String, Value>,
    /// The `timelimit` header, `[hard, soft]` in seconds (either may be null).
    pub timelimit: (Option<f64>, Option<f64>),
}

impl TaskMessage {
    pub fn display_name(&self) -> &str {
        self.shadow.as_deref().unwrap_or(&self.name)
    }

    /// Read a delivery. v2 when the headers carry `task`; otherwise a JSON body that is a map
    /// with `task` is v1.
    pub fn parse(delivery: &Delivery) -> Result<TaskMessage, MessageError> {
        let headers = match &delivery.headers {
            Value::Object(map) => map,
            Value::Null => &*EMPTY,
            other => {
                return Err(MessageError::UnknownFormat(format!(
                    "headers are not a mapping: {}",
                    truncate(&other.to_string(), 200)
                )))
            }
        };
        if let Some(task) = headers.get("task") {
            let name = task.as_str().ok_or_else(|| {
                let id = headers.get("id").and_then(Value::as_str);
                MessageError::invalid(format!("task name is not a string: {task}"), id, None)
            })?;
            return Self::from_fields(Protocol::V2, name, headers);
        }
        // Protocol v1: everything is in the body, which must be decoded here to find the name.
        if !delivery.content_type.is_empty() && delivery.content_type != "application/json" {
            return Err(MessageError::UnknownFormat(format!(
                "no 'task' header and a {} body (protocol v1 is read from JSON bodies only)",
                delivery.content_type
            )));
        }
        let body: Value = serde_json::from_slice(&delivery.body).map_err(|e| MessageError::Decode(e.to_string()))?;
        match body.as_object().and_then(|b| b.get("task").map(|t| (b, t))) {
            Some((fields, Value::String(name))) => Self::from_fields(Protocol::V1, name, fields),
            _ => Err(MessageError::UnknownFormat(format!("body: {}", truncate(&body.to_string(), 200)))),
        }
    }

    fn from_fields(protocol: Protocol, name: &str, f: &Map<String, Value>) -> Result<Self, MessageError> {
        let id = match f.get("id") {
            Some(Value::String(s)) => s.clone(),
            Some(other) if !other.is_null() => other.to_string(),
            _ => return Err(MessageError::invalid(format!("task {name} has no id"), None, Some(name))),
        };
        let when = |key: &str| -> Result<Option<DateTime<Utc>>, MessageError> {
            match f.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => parse_iso8601(s)
                    .map(Some)
                    .ok_or_else(|| MessageError::invalid(format!("invalid {key} value {s:?}"), Some(&id), Some(name))),
                Some(other) => {
                    Err(MessageError::invalid(format!("invalid {key} value {other}"), Some(&id), Some(name)))
                }
            }
        };
        let (eta, expires) = (when("eta")?, when("expires")?);
        let text = |key: &str| f.get(key).and_then(Value::as_str).map(str::to_owned);
        Ok(TaskMessage {
            protocol,
            name: name.to_owned(),
            id,
            shadow: text("shadow"),
            eta,
            expires,
            root_id: text("root_id"),
            timelimit: timelimit(f.get("timelimit")),
            parent_id: text("parent_id"),
            retries: f.get("retries").and_then(Value::as_i64).unwrap_or(0),
            argsrepr: text("argsrepr").unwrap_or_default(),
            kwargsrepr: text("kwargsrepr").unwrap_or_default(),
            stamps: f.get("stamps").and_then(Value::as_object).cloned().unwrap_or_default(),
        })
    }
}

/// `[hard, soft]`; anything that is not a pair of numbers/nulls means no limit from the message.
fn timelimit(v: Option<&Value>) -> (Option<f64>, Option<f64>) {
    let positive = |v: &Value| v.as_f64().filter(|s| *s > 0.0 && s.is_finite());
    match v.and_then(Value::as_array) {
        Some(pair) if pair.len() == 2 => (positive(&pair[0]), positive(&pair[1])),
        _ => (None, None),
    }
}

static EMPTY: std::sync::LazyLock<Map<String, Value>> = std::sync::LazyLock::new(Map::new);

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// The request description a pool child turns into `fast_trace_task`'s request dict
/// (`celery/worker/request.py: Request.__init__` builds the same from a kombu Message).
pub struct ChildMeta;

/// The first byte of a marshal meta (a JSON one starts with `{`).
pub const MARSHAL_PREFIX: &[u8] = b"M";

static EMPTY_OBJECT: std::sync::LazyLock<Value> = std::sync::LazyLock::new(|| Value::Object(Map::new()));
static NULL: Value = Value::Null;

/// The meta as serialised: borrowed from the delivery, so nothing is copied before writing.
#[derive(serde::Serialize)]
struct MetaOut<'a> {
    name: &'a str,
    id: &'a str,
    proto: u8,
    content_type: &'a str,
    content_encoding: &'a str,
    headers: &'a Value,
    extras: ExtrasOut<'a>,
}

#[derive(serde::Serialize)]
struct ExtrasOut<'a> {
    reply_to: &'a Value,
    correlation_id: &'a Value,
    hostname: &'a str,
    delivery_info: DeliveryInfoOut<'a>,
    properties: &'a Map<String, Value>,
}

#[derive(serde::Serialize)]
struct DeliveryInfoOut<'a> {
    exchange: &'a str,
    routing_key: &'a str,
    priority: &'a Value,
    redelivered: bool,
}

/// Where kombu's JSON decoder would turn a `{"__type__": ...}` map into a datetime, UUID, ...:
/// such a meta goes to the child as JSON, for kombu's decoder.
fn has_type_marker(v: &Value) -> bool {
    match v {
        Value::Object(map) => map.contains_key("__type__") || map.values().any(has_type_marker),
        Value::Array(items) => items.iter().any(has_type_marker),
        _ => false,
    }
}

/// Bodies larger than this are left for the child to decode: the supervisor serves every child.
const MAX_DECODED_BODY: usize = 4096;

/// A v2 JSON body as kombu's decoder would return it, so the child skips `json.loads` (its
/// costliest step after Celery's tracer); `None` where that could differ in any way, and the
/// child decodes the raw body as before: a body that is compressed, large, or could hold a
/// kombu type marker (also spelled with `\u` escapes), or is not plain JSON for serde_json
/// (Python's extras: NaN, lone surrogates), or holds a float (Python's `float()` is the only
/// rounding to trust) or an integer beyond 64 bits (serde_json would make it a float).
fn write_decoded_body(w: &mut marshal::Writer, delivery: &Delivery, msg: &TaskMessage) {
    let body = &delivery.body;
    let plain = msg.protocol == Protocol::V2
        && delivery.content_type == "application/json"
        && body.len() <= MAX_DECODED_BODY
        && delivery.headers.get("compression").is_none_or(Value::is_null)
        && !contains(body, b"__type__")
        && !contains(body, b"\\u00");
    match plain.then(|| serde_json::from_slice::<Value>(body).ok()).flatten() {
        Some(decoded) if integers_only(&decoded) => w.value(&decoded),
        _ => w.none(),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|window| window == needle)
}

fn integers_only(v: &Value) -> bool {
    match v {
        Value::Number(n) => n.is_i64() || n.is_u64(),
        Value::Array(items) => items.iter().all(integers_only),
        Value::Object(map) => map.values().all(integers_only),
        _ => true,
    }
}

/// A meta kombu's JSON decoder must read (see `has_type_marker`).
fn needs_json(delivery: &Delivery) -> bool {
    (delivery.headers.is_object() && has_type_marker(&delivery.headers))
        || delivery.properties.values().any(has_type_marker)
}

impl ChildMeta {
    /// The payload of a TASK frame (`python/celeriac/frames.py: loads_task`): `M` and one
    /// marshal tuple `(name, id, proto, content_type, content_encoding, headers, extras, body,
    /// decoded body or None, see `write_decoded_body`)`, or, when a header holds a kombu type marker, `u32 length | JSON meta | body` for kombu's
    /// decoder. A tuple, not a dict: the child unpacks it without looking anything up.
    pub fn task_frame(delivery: &Delivery, msg: &TaskMessage, hostname: &str) -> Vec<u8> {
        if needs_json(delivery) {
            return frame::encode_task(&Self::encode_json(delivery, msg, hostname), &delivery.body);
        }
        let mut w = marshal::Writer::with_prefix(&[0; 5], 1024 + delivery.body.len());
        w.raw(MARSHAL_PREFIX);
        Self::write_marshal(&mut w, delivery, msg, hostname);
        let mut out = w.finish();
        frame::write_header(&mut out, frame::Kind::Task);
        out
    }

    fn write_marshal(w: &mut marshal::Writer, delivery: &Delivery, msg: &TaskMessage, hostname: &str) {
        let headers = if delivery.headers.is_object() { &delivery.headers } else { &EMPTY_OBJECT };
        let property = |key: &str| delivery.properties.get(key).unwrap_or(&NULL);
        w.begin_tuple(9);
        w.str(&msg.name);
        w.str(&msg.id);
        w.int(if msg.protocol == Protocol::V1 { 1 } else { 2 });
        w.str(&delivery.content_type);
        w.str(&delivery.content_encoding);
        w.value(headers);
        w.begin_dict();
        w.entry("reply_to", property("reply_to"));
        w.entry("correlation_id", property("correlation_id"));
        w.entry_str("hostname", hostname);
        w.str("delivery_info");
        w.begin_dict();
        w.entry_str("exchange", &delivery.exchange);
        w.entry_str("routing_key", &delivery.routing_key);
        w.entry("priority", property("priority"));
        w.str("redelivered");
        w.bool(delivery.redelivered);
        w.end_dict();
        w.str("properties");
        w.map(&delivery.properties);
        w.end_dict();
        w.bytes(&delivery.body);
        write_decoded_body(w, delivery, msg);
    }

    /// The same meta as JSON.
    pub fn encode_json(delivery: &Delivery, msg: &TaskMessage, hostname: &str) -> Vec<u8> {
        let property = |key: &str| delivery.properties.get(key).unwrap_or(&NULL);
        let meta = MetaOut {
            name: &msg.name,
            id: &msg.id,
            proto: if msg.protocol == Protocol::V1 { 1 } else { 2 },
            content_type: &delivery.content_type,
            content_encoding: &delivery.content_encoding,
            // v2 headers are a mapping (they name the task); v1 ones may be anything.
            headers: if delivery.headers.is_object() { &delivery.headers } else { &EMPTY_OBJECT },
            extras: ExtrasOut {
                reply_to: property("reply_to"),
                correlation_id: property("correlation_id"),
                hostname,
                delivery_info: DeliveryInfoOut {
                    exchange: &delivery.exchange,
                    routing_key: &delivery.routing_key,
                    priority: property("priority"),
                    redelivered: delivery.redelivered,
                },
                properties: &delivery.properties,
            },
        };
        serde_json::to_vec(&meta).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn delivery(headers: Value, body: &[u8], content_type: &str) -> Delivery {
        Delivery {
            tag: "t".into(),
            exchange: String::new(),
            routing_key: "celery".into(),
            redelivered: false,
            content_type: content_type.into(),
            content_encoding: "utf-8".into(),
            headers,
            properties: Map::new(),
            body: body.to_vec(),
        }
    }

    #[test]
    fn v2_from_headers() {
        let d = delivery(
            json!({"task": "a.add", "id": "1", "eta": "2026-11-24T00:41:01.219773+00:00", "shadow": null}),
            b"[[1],{},{}]",
            "application/json",
        );
        let m = TaskMessage::parse(&d).unwrap();
        assert_eq!(m.protocol, Protocol::V2);
        assert_eq!(m.name, "a.add");
        assert_eq!(m.display_name(), "a.add");
        assert!(m.eta.is_some());
        assert!(m.expires.is_none());
    }

    #[test]
    fn timelimit_is_hard_then_soft() {
        let d = delivery(json!({"task": "a", "id": "1", "timelimit": [10, 5.5]}), b"[]", "application/json");
        assert_eq!(TaskMessage::parse(&d).unwrap().timelimit, (Some(10.0), Some(5.5)));
        for bad in [json!([null, null]), json!("10"), json!([1]), json!([1, 2, 3]), json!([-1, "x"])] {
            let d = delivery(json!({"task": "a", "id": "1", "timelimit": bad}), b"[]", "application/json");
            assert_eq!(TaskMessage::parse(&d).unwrap().timelimit, (None, None));
        }
    }

    #[test]
    fn v1_from_body() {
        let d = delivery(json!({}), br#"{"task": "a.add", "id": "9", "args": [1], "kwargs": {}}"#, "application/json");
        let m = TaskMessage::parse(&d).unwrap();
        assert_eq!(m.protocol, Protocol::V1);
        assert_eq!(m.id, "9");
    }

    #[test]
    fn bad_messages_map_to_stock_outcomes() {
        let d = delivery(json!([1, 2]), b"[]", "application/json");
        assert!(matches!(TaskMessage::parse(&d), Err(MessageError::UnknownFormat(_))));
        let d = delivery(json!({}), b"not json", "application/json");
        assert!(matches!(TaskMessage::parse(&d), Err(MessageError::Decode(_))));
        let d = delivery(json!({}), b"[1, 2]", "application/json");
        assert!(matches!(TaskMessage::parse(&d), Err(MessageError::UnknownFormat(_))));
        let d = delivery(json!({"task": "a", "id": "1", "eta": "soon"}), b"[]", "application/json");
        assert!(matches!(TaskMessage::parse(&d), Err(MessageError::Invalid { .. })));
        let d = delivery(json!({"task": "a"}), b"[]", "application/json");
        assert!(matches!(TaskMessage::parse(&d), Err(MessageError::Invalid { .. })));
        let d = delivery(json!({"task": 5, "id": "1"}), b"[]", "application/json");
        assert!(matches!(TaskMessage::parse(&d), Err(MessageError::Invalid { .. })));
    }

    #[test]
    fn child_meta_carries_request_fields() {
        let mut d = delivery(json!({"task": "a.add", "id": "1"}), b"[]", "application/json");
        d.properties.insert("reply_to".into(), json!("r"));
        d.properties.insert("priority".into(), json!(3));
        let m = TaskMessage::parse(&d).unwrap();
        let meta: Value = serde_json::from_slice(&ChildMeta::encode_json(&d, &m, "w@h")).unwrap();
        assert_eq!(meta["extras"]["reply_to"], "r");
        assert_eq!(meta["extras"]["delivery_info"]["priority"], 3);
        assert_eq!(meta["extras"]["hostname"], "w@h");
        assert_eq!(meta["headers"]["task"], "a.add");
    }

    #[test]
    fn only_bodies_json_loads_would_read_the_same_are_decoded() {
        let decoded = |body: &[u8], headers: Value| {
            let d = delivery(headers, body, "application/json");
            let m = TaskMessage::parse(&d).unwrap();
            let mut w = marshal::Writer::with_prefix(b"", 64);
            write_decoded_body(&mut w, &d, &m);
            w.finish()
        };
        let v2 = || json!({"task": "a.add", "id": "1"});
        assert_eq!(
            decoded(b"[[2, -3], {}, {}]", v2()),
            b"[\x03\x00\x00\x00[\x02\x00\x00\x00i\x02\x00\x00\x00i\xfd\xff\xff\xff{0{0"
        );
        for body in [
            &b"[[1.5], {}, {}]"[..],                       // a float
            b"[[123456789012345678901234567890], {}, {}]", // beyond 64 bits
            b"[[NaN], {}, {}]",                            // Python's extension
            br#"[[], {"x": {"__type__": "uuid"}}, {}]"#,   // a kombu type marker
            br#"[["\u005f"], {}, {}]"#,                    // an escape that could spell one
            b"[[\xff], {}, {}]",                           // not UTF-8
            b"",
        ] {
            assert_eq!(decoded(body, v2()), b"N", "{}", String::from_utf8_lossy(body));
        }
        assert_eq!(decoded(b"[[], {}, {}]", json!({"task": "a", "id": "1", "compression": "zlib"})), b"N");
        let big = format!("[[\"{}\"], {{}}, {{}}]", "x".repeat(MAX_DECODED_BODY));
        assert_eq!(decoded(big.as_bytes(), v2()), b"N");
    }

    #[test]
    fn task_frame_is_marshal_unless_a_header_has_a_type_marker() {
        let d = delivery(json!({"task": "a.add", "id": "1"}), b"[]", "application/json");
        let m = TaskMessage::parse(&d).unwrap();
        let frame = ChildMeta::task_frame(&d, &m, "w@h");
        assert_eq!(frame[4], frame::Kind::Task as u8);
        assert_eq!(u32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize, frame.len() - 4);
        assert!(frame[5..].starts_with(MARSHAL_PREFIX));
        // The body as bytes, then decoded (an empty list).
        assert!(frame.ends_with(b"s\x02\x00\x00\x00[][\x00\x00\x00\x00"));
        let marker = json!({"task": "a.add", "id": "1", "x": [{"__type__": "datetime", "__value__": "2024-01-02"}]});
        let d = delivery(marker, b"[]", "application/json");
        let m = TaskMessage::parse(&d).unwrap();
        let json_meta = ChildMeta::encode_json(&d, &m, "w@h");
        assert_eq!(ChildMeta::task_frame(&d, &m, "w@h"), frame::encode_task(&json_meta, b"[]"));
    }
}
