//! The envelope kombu's virtual transports (Redis, the folder transport, SQS) store a message
//! in (reference §2.1): a JSON object with the body (base64), content type and encoding,
//! headers and properties (`delivery_info`, `delivery_tag`, `priority`, ...).

use std::borrow::Cow;

use base64::Engine;
use serde_json::{Map, Value};

use crate::Delivery;

#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("not a JSON object: {0}")]
    NotJson(String),
    #[error("body: {0}")]
    Body(String),
}

/// An envelope's fields, read in one pass without a map for the envelope itself and with the
/// body borrowed from the text (base64 has nothing to unescape). Anything unusual (a field of
/// another type, a key given twice) fails here and is read by `Parts::from_value` instead.
#[derive(serde::Deserialize)]
struct Fields<'a> {
    #[serde(borrow)]
    body: Option<Cow<'a, str>>,
    #[serde(rename = "content-type", borrow)]
    content_type: Option<Cow<'a, str>>,
    #[serde(rename = "content-encoding", borrow)]
    content_encoding: Option<Cow<'a, str>>,
    headers: Option<Value>,
    properties: Option<Map<String, Value>>,
}

/// The envelope taken apart, however it was read.
struct Parts<'a> {
    /// The body's text, or the JSON of a body that was not a string.
    body: Option<Cow<'a, str>>,
    body_is_text: bool,
    content_type: String,
    content_encoding: String,
    headers: Value,
    properties: Map<String, Value>,
}

impl<'a> Parts<'a> {
    fn from_fields(f: Fields<'a>) -> Self {
        Parts {
            body_is_text: true,
            body: f.body,
            content_type: f.content_type.map(Cow::into_owned).unwrap_or_default(),
            content_encoding: f.content_encoding.map(Cow::into_owned).unwrap_or_default(),
            headers: f.headers.unwrap_or(Value::Null),
            properties: f.properties.unwrap_or_default(),
        }
    }

    /// Any JSON object, as kombu would read it: fields of the wrong type count as absent.
    fn from_value(v: Value) -> Result<Self, EnvelopeError> {
        let Value::Object(mut env) = v else {
            return Err(EnvelopeError::NotJson("envelope is not a mapping".into()));
        };
        let text = |env: &Map<String, Value>, k: &str| env.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
        let (body, body_is_text) = match env.remove("body") {
            Some(Value::String(s)) => (Some(Cow::Owned(s)), true),
            Some(Value::Null) | None => (None, true),
            Some(other) => (Some(Cow::Owned(other.to_string())), false),
        };
        Ok(Parts {
            body,
            body_is_text,
            content_type: text(&env, "content-type"),
            content_encoding: text(&env, "content-encoding"),
            headers: env.remove("headers").unwrap_or(Value::Null),
            properties: match env.remove("properties") {
                Some(Value::Object(p)) => p,
                _ => Map::new(),
            },
        })
    }
}

/// Unwrap kombu's stored envelope (reference §2.1).
pub fn decode_envelope(raw: &str, queue: &str) -> Result<Delivery, EnvelopeError> {
    let parts = match serde_json::from_str::<Fields>(raw) {
        Ok(fields) => Parts::from_fields(fields),
        Err(_) => Parts::from_value(serde_json::from_str(raw).map_err(|e| EnvelopeError::NotJson(e.to_string()))?)?,
    };
    let mut properties = parts.properties;
    let body_encoding = properties.get("body_encoding").and_then(Value::as_str).unwrap_or("");
    let body = match parts.body {
        Some(s) if parts.body_is_text && body_encoding == "base64" => base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .map_err(|e| EnvelopeError::Body(format!("invalid base64: {e}")))?,
        Some(s) => s.into_owned().into_bytes(),
        None => Vec::new(),
    };
    let delivery_info = properties.get("delivery_info").and_then(Value::as_object);
    let exchange = delivery_info.and_then(|d| d.get("exchange")).and_then(Value::as_str).unwrap_or("").to_owned();
    let routing_key =
        delivery_info.and_then(|d| d.get("routing_key")).and_then(Value::as_str).unwrap_or(queue).to_owned();
    let redelivered = delivery_info.and_then(|d| d.get("redelivered")).and_then(Value::as_bool).unwrap_or(false);
    let tag = match properties.get("delivery_tag").and_then(Value::as_str) {
        Some(t) => t.to_owned(),
        None => {
            let t = uuid::Uuid::new_v4().to_string();
            properties.insert("delivery_tag".into(), Value::String(t.clone()));
            t
        }
    };
    Ok(Delivery {
        tag,
        exchange,
        routing_key,
        redelivered,
        content_type: parts.content_type,
        content_encoding: parts.content_encoding,
        headers: parts.headers,
        properties,
        body,
    })
}

/// `Channel._do_restore_message`: mark a stored envelope as redelivered.
pub fn mark_redelivered(envelope: &str) -> String {
    let Ok(Value::Object(mut env)) = serde_json::from_str::<Value>(envelope) else {
        return envelope.to_owned();
    };
    if let Some(Value::Object(h)) = env.get_mut("headers") {
        h.insert("redelivered".into(), Value::Bool(true));
    }
    if let Some(Value::Object(p)) = env.get_mut("properties") {
        if let Some(Value::Object(d)) = p.get_mut("delivery_info") {
            d.insert("redelivered".into(), Value::Bool(true));
        }
    }
    serde_json::to_string(&Value::Object(env)).unwrap_or_else(|_| envelope.to_owned())
}

/// A JSON body wrapped as kombu's producer wraps it (pidbox requests and replies, events).
pub fn encode_json(body: &Value, headers: Value, exchange: &str, routing_key: &str, delivery_mode: u8) -> String {
    serde_json::json!({
        "body": base64::engine::general_purpose::STANDARD.encode(serde_json::to_vec(body).unwrap_or_else(|_| b"null".to_vec())),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": {
            "delivery_mode": delivery_mode,
            "delivery_info": {"exchange": exchange, "routing_key": routing_key},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": uuid::Uuid::new_v4().to_string(),
        },
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_a_captured_kombu_envelope() {
        let raw = r#"{"body": "W1syLCAzXSwge30sIHsiY2FsbGJhY2tzIjogbnVsbCwgImVycmJhY2tzIjogbnVsbCwgImNoYWluIjogbnVsbCwgImNob3JkIjogbnVsbH1d", "content-encoding": "utf-8", "content-type": "application/json", "headers": {"lang": "py", "task": "refapp.add", "id": "11111111-1111-1111-1111-111111111111"}, "properties": {"correlation_id": "11111111-1111-1111-1111-111111111111", "reply_to": "847919b4", "delivery_mode": 2, "delivery_info": {"exchange": "", "routing_key": "celery"}, "priority": 0, "body_encoding": "base64", "delivery_tag": "640b6710-3948-4add-a3e8-a2047847dc53"}}"#;
        let d = decode_envelope(raw, "celery").unwrap();
        assert_eq!(d.tag, "640b6710-3948-4add-a3e8-a2047847dc53");
        assert_eq!(d.routing_key, "celery");
        assert_eq!(d.content_type, "application/json");
        assert!(d.body.starts_with(b"[[2, 3], {}"));
        assert_eq!(d.headers["task"], "refapp.add");
        let again = mark_redelivered(raw);
        let v: Value = serde_json::from_str(&again).unwrap();
        assert_eq!(v["headers"]["redelivered"], true);
        assert_eq!(v["properties"]["delivery_info"]["redelivered"], true);
    }

    #[test]
    fn unusual_envelopes_read_as_kombu_reads_them() {
        // Fields of other types, a key given twice (the last one wins, as in Python's json).
        let raw = r#"{"body": {"a": 1}, "content-type": 5, "headers": {"task": "t"}, "properties": [1],
                      "content-encoding": "utf-8", "content-encoding": "binary"}"#;
        let d = decode_envelope(raw, "q").unwrap();
        assert_eq!(d.body, br#"{"a":1}"#);
        assert_eq!((d.content_type.as_str(), d.content_encoding.as_str()), ("", "binary"));
        assert_eq!(d.headers["task"], "t");
        assert_eq!(d.routing_key, "q");
        // An escaped body is unescaped, then base64-decoded.
        let d = decode_envelope(r#"{"body": "aGk\u003d", "properties": {"body_encoding": "base64"}}"#, "q").unwrap();
        assert_eq!(d.body, b"hi");
        let d = decode_envelope(r#"{"body": null}"#, "q").unwrap();
        assert!(d.body.is_empty() && d.headers.is_null());
    }

    #[test]
    fn rejects_broken_envelopes() {
        assert!(decode_envelope("nope", "q").is_err());
        assert!(decode_envelope("[1]", "q").is_err());
        assert!(decode_envelope(r#"{"body": "!!", "properties": {"body_encoding": "base64"}}"#, "q").is_err());
    }

    #[test]
    fn encoded_envelopes_decode() {
        let raw = encode_json(&serde_json::json!({"ok": "pong"}), serde_json::json!({"ticket": "t"}), "x", "rk", 1);
        let d = decode_envelope(&raw, "q").unwrap();
        assert_eq!((d.exchange.as_str(), d.routing_key.as_str()), ("x", "rk"));
        assert_eq!(d.body, br#"{"ok":"pong"}"#);
        assert_eq!(d.headers["ticket"], "t");
    }
}
