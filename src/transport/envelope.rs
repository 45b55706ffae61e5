//! kombu's envelope on the virtual transports (Redis, the folder transport, SQS): decoding and
//! encoding live in `celeriac_protocol::envelope`; here are the transports' uses of it (pidbox
//! requests and replies, events) and the log line for a message that is not one.

use serde_json::Value;

pub use celeriac_protocol::envelope::{decode_envelope, encode_json, mark_redelivered};

use super::Delivery;

/// Decode a message just taken from `queue`. One that is not a kombu envelope can run nowhere:
/// it is logged loudly with the start of its text (`source` says which broker) and `None`
/// tells the transport to drop it.
pub fn decode_or_discard(raw: &str, queue: &str, source: &str) -> Option<Delivery> {
    match decode_envelope(raw, queue) {
        Ok(d) => Some(d),
        Err(e) => {
            tracing::error!(
                "Discarding a message from {source}queue {queue:?} that is not a kombu envelope ({e}): {}",
                raw.chars().take(512).collect::<String>()
            );
            None
        }
    }
}

/// A pidbox broadcast (`Mailbox._broadcast`): clock 1, expiring after `timeout`.
pub fn broadcast_request(body: &Value, exchange: &str, timeout: std::time::Duration) -> String {
    let headers = serde_json::json!({"clock": 1, "expires": super::now_secs() + timeout.as_secs_f64()});
    encode_json(body, headers, exchange, "", 2)
}

/// A pidbox reply to a client's reply queue.
pub fn control_reply(body: &Value, to: &super::ReplyTo, ticket: &str, clock: u64) -> String {
    encode_json(body, serde_json::json!({"ticket": ticket, "clock": clock}), &to.exchange, &to.routing_key, 1)
}

/// An event for the `celeryev` exchange.
pub fn event(body: &Value, hostname: &str, routing_key: &str) -> String {
    encode_json(body, serde_json::json!({"hostname": hostname}), "celeryev", routing_key, 1)
}

/// A mailbox delivery as the consumer takes it: the request and its sender's clock.
pub fn control_event(d: &Delivery) -> Option<super::ControlEvent> {
    let clock = d.headers.get("clock").and_then(Value::as_u64).unwrap_or(0);
    match serde_json::from_slice::<Value>(&d.body) {
        Ok(body) => Some(super::ControlEvent::Request(body, clock)),
        Err(e) => {
            tracing::warn!("pidbox: undecodable request ({e}), ignored");
            None
        }
    }
}

/// The reply a delivery carries, if it answers `ticket`.
pub fn reply_to_ticket(d: &Delivery, ticket: &str) -> Option<Value> {
    if d.headers.get("ticket").and_then(Value::as_str) != Some(ticket) {
        return None;
    }
    serde_json::from_slice(&d.body).ok()
}

/// Another node's event, as gossip follows it.
pub fn peer_event(d: &Delivery) -> Option<super::PeerEvent> {
    super::PeerEvent::new(&d.routing_key, d.headers.get("hostname").and_then(Value::as_str), &d.body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pidbox_envelopes_round_trip() {
        let to = super::super::ReplyTo { exchange: "reply.celery.pidbox".into(), routing_key: "oid".into() };
        let d = decode_envelope(&control_reply(&serde_json::json!({"w": "pong"}), &to, "t1", 7), "q").unwrap();
        assert_eq!(reply_to_ticket(&d, "t1"), Some(serde_json::json!({"w": "pong"})));
        assert_eq!(reply_to_ticket(&d, "t2"), None);
        let request = broadcast_request(&serde_json::json!({"method": "ping"}), "celery.pidbox", Default::default());
        let d = decode_envelope(&request, "q").unwrap();
        assert!(matches!(control_event(&d), Some(super::super::ControlEvent::Request(_, 1))));
    }
}
