//! The envelope kombu's virtual transports (Redis, the folder transport, SQS) store a message
//! in (reference §2.1): a JSON object with the body (base64), content type and encoding,
//! headers and properties (`delivery_info`, `delivery_tag`, `priority`, ...).

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

/// Unwrap kombu's stored envelope (reference §2.1).
pub fn decode_envelope(raw: &str, queue: &str) -> Result<Delivery, EnvelopeError> {
    let v: Value = serde_json::from_str(raw).map_err(|e| EnvelopeError::NotJson(e.to_string()))?;
    let Value::Object(mut env) = v else {
        return Err(EnvelopeError::NotJson("envelope is not a mapping".into()));
    };
    let mut properties = match env.remove("properties") {
        Some(Value::Object(p)) => p,
        _ => Map::new(),
    };
    let body_encoding = properties.get("body_encoding").and_then(Value::as_str).unwrap_or("");
    let body = match env.remove("body") {
        Some(Value::String(s)) if body_encoding == "base64" => base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .map_err(|e| EnvelopeError::Body(format!("invalid base64: {e}")))?,
        Some(Value::String(s)) => s.into_bytes(),
        Some(Value::Null) | None => Vec::new(),
        Some(other) => other.to_string().into_bytes(),
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
    let text = |env: &Map<String, Value>, k: &str| env.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
    Ok(Delivery {
        tag,
        exchange,
        routing_key,
        redelivered,
        content_type: text(&env, "content-type"),
        content_encoding: text(&env, "content-encoding"),
        headers: env.remove("headers").unwrap_or(Value::Null),
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
