//! A task message as any transport hands it over (RabbitMQ's headers and properties are JSON
//! by then): headers, properties and body separated by 0x01 bytes, content type picked by the
//! first byte. Parsing decides v1/v2 and reads ETA, expiry, time limits and ids; it must never
//! panic, and whatever it accepts must reach the child as a whole TASK frame.
#![no_main]

mod task_frame;

use celeriac_protocol::{Delivery, TaskMessage};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};

const CONTENT_TYPES: [&str; 4] = ["application/json", "", "application/x-msgpack", "application/x-python-serialize"];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else { return };
    let mut parts = rest.splitn(3, |b| *b == 1);
    let headers = parts.next().unwrap_or_default();
    let properties = parts.next().unwrap_or_default();
    let body = parts.next().unwrap_or_default();
    let headers: Value =
        serde_json::from_slice(headers).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(headers).into()));
    let properties = match serde_json::from_slice(properties) {
        Ok(Value::Object(map)) => map,
        _ => Map::new(),
    };
    let delivery = Delivery {
        tag: "1".into(),
        exchange: String::new(),
        routing_key: "celery".into(),
        redelivered: selector & 0x80 != 0,
        content_type: CONTENT_TYPES[usize::from(selector) % CONTENT_TYPES.len()].into(),
        content_encoding: "utf-8".into(),
        headers,
        properties,
        body: body.to_vec(),
    };
    if let Ok(msg) = TaskMessage::parse(&delivery) {
        task_frame::check(&delivery, &msg);
        if let (Some(hard), Some(soft)) = msg.timelimit {
            assert!(hard > 0.0 && soft > 0.0 && hard.is_finite() && soft.is_finite());
        }
    }
});
