//! One message as a transport hands it to the consumer.

use serde_json::{Map, Value};

/// One message handed to the worker by the broker, not yet settled.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Broker-specific delivery tag (a uuid4 string on Redis, as kombu's producer sets it).
    pub tag: String,
    pub exchange: String,
    pub routing_key: String,
    pub redelivered: bool,
    pub content_type: String,
    pub content_encoding: String,
    /// Message headers; a mapping unless the producer was broken.
    pub headers: Value,
    /// All message properties, including `delivery_info` on Redis.
    pub properties: Map<String, Value>,
    /// The serialized body, already unwrapped from the transport's envelope.
    pub body: Vec<u8>,
}
