//! Remote control (pidbox, reference §8): the request and reply formats `celery inspect`,
//! `celery control` and `app.control` use, node filtering, and the revoked-task set.
//! Transports carry the messages (`Transport::pidbox`, `Transport::reply`); the consumer runs
//! the commands against its own state (`consumer/remote_control.rs`).

pub mod events;
pub mod gossip;
pub mod revoked;

use serde_json::{Map, Value};

/// Where a client waits for replies: exchange `reply.celery.pidbox`, routing key = its oid.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplyTo {
    pub exchange: String,
    pub routing_key: String,
}

/// One broadcast command (`kombu.pidbox.Mailbox._broadcast`).
#[derive(Debug, Clone)]
pub struct ControlRequest {
    pub method: String,
    pub arguments: Map<String, Value>,
    pub destination: Option<Vec<String>>,
    pub pattern: Option<String>,
    pub matcher: Option<String>,
    pub ticket: Option<String>,
    pub reply_to: Option<ReplyTo>,
    /// The sender's Lamport clock (message header `clock`).
    pub clock: u64,
}

impl ControlRequest {
    /// Parse a decoded request body; `None` when it is not a pidbox request.
    pub fn parse(body: &Value, clock: u64) -> Option<ControlRequest> {
        let b = body.as_object()?;
        let text = |k: &str| b.get(k).and_then(Value::as_str).map(str::to_owned);
        let reply_to = b.get("reply_to").and_then(Value::as_object).and_then(|r| {
            Some(ReplyTo {
                exchange: r.get("exchange")?.as_str()?.to_owned(),
                routing_key: r.get("routing_key")?.as_str()?.to_owned(),
            })
        });
        Some(ControlRequest {
            method: text("method")?,
            arguments: b.get("arguments").and_then(Value::as_object).cloned().unwrap_or_default(),
            destination: b
                .get("destination")
                .and_then(Value::as_array)
                .map(|d| d.iter().filter_map(Value::as_str).map(str::to_owned).collect()),
            pattern: text("pattern"),
            matcher: text("matcher"),
            ticket: text("ticket"),
            reply_to,
            clock,
        })
    }

    /// `kombu.pidbox.Node.handle_message`: is this request for `node`?
    pub fn is_for(&self, node: &str) -> bool {
        if let Some(dest) = self.destination.as_ref().filter(|d| !d.is_empty()) {
            return dest.iter().any(|d| d == node);
        }
        match (&self.pattern, &self.matcher) {
            (Some(pattern), Some(matcher)) if matcher == "glob" => glob_match(pattern, node),
            // pcre patterns: only an exact match is understood.
            (Some(pattern), Some(_)) => pattern == node,
            _ => true,
        }
    }
}

/// fnmatch-style `*` and `?` (what `celery inspect -d 'w*'` uses).
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

/// `{"ok": text}`, the convention of `celery/worker/control.py`.
pub fn ok(text: impl Into<String>) -> Value {
    serde_json::json!({ "ok": text.into() })
}

/// `{"error": text}`.
pub fn error(text: impl Into<String>) -> Value {
    serde_json::json!({ "error": text.into() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_a_captured_request() {
        let body = json!({"method": "revoke", "arguments": {"task_id": "e7a0", "terminate": false, "signal": "SIGTERM"},
            "destination": null, "pattern": null, "matcher": null, "ticket": "a0ec",
            "reply_to": {"exchange": "reply.celery.pidbox", "routing_key": "f996"}});
        let r = ControlRequest::parse(&body, 3).unwrap();
        assert_eq!(r.method, "revoke");
        assert_eq!(r.arguments["task_id"], "e7a0");
        assert_eq!(r.reply_to.as_ref().unwrap().routing_key, "f996");
        assert!(r.is_for("anyone@host"));
        assert!(ControlRequest::parse(&json!([1]), 0).is_none());
    }

    #[test]
    fn node_filtering() {
        let mut r = ControlRequest::parse(&json!({"method": "ping", "destination": ["a@h"]}), 0).unwrap();
        assert!(r.is_for("a@h") && !r.is_for("b@h"));
        r.destination = None;
        r.pattern = Some("w*@h?st".into());
        r.matcher = Some("glob".into());
        assert!(r.is_for("w1@host") && !r.is_for("x@host"));
        assert!(glob_match("*", "") && glob_match("a*b*c", "aXbYc") && !glob_match("a*c", "ab"));
    }
}
