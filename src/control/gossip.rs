//! Gossip (`celery/worker/consumer/gossip.py`): follow the other workers' `worker-*` events to
//! know who is alive, log who joined, left or went silent, and keep the logical clock ahead of
//! every clock seen. Elections (`worker-elect`, unused by Celery itself) are not taken part in.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::Value;
use tracing::{debug, info};

use crate::transport::PeerEvent;

/// A worker's heartbeat counts as missed after `freq × 2` (`HEARTBEAT_EXPIRE_WINDOW` = 200%).
const EXPIRE_WINDOW: f64 = 2.0;
/// `freq` when a worker's events don't say.
const DEFAULT_FREQ: f64 = 60.0;

#[derive(Debug)]
struct Peer {
    last_seen: Instant,
    freq: f64,
}

/// The other workers this one has heard from.
#[derive(Debug)]
pub struct Peers {
    me: String,
    workers: HashMap<String, Peer>,
}

impl Peers {
    pub fn new(me: &str) -> Self {
        Peers { me: me.to_owned(), workers: HashMap::new() }
    }

    /// Take one event in; returns the sender's clock, if it has one.
    pub fn observe(&mut self, event: &PeerEvent, now: Instant) -> Option<u64> {
        let clock = event.body.get("clock").and_then(Value::as_u64);
        // Task events reach us when Redis runs without `fanout_patterns`: not ours to follow.
        if event.hostname == self.me || event.routing_key.starts_with("task.") {
            return clock;
        }
        let kind = event.body.get("type").and_then(Value::as_str).unwrap_or("");
        match kind {
            "worker-online" | "worker-heartbeat" => {
                let freq = event.body.get("freq").and_then(Value::as_f64).filter(|f| *f > 0.0).unwrap_or(DEFAULT_FREQ);
                let peer = self.workers.entry(event.hostname.clone()).or_insert_with(|| {
                    debug!("{} joined the party", event.hostname);
                    Peer { last_seen: now, freq }
                });
                peer.last_seen = now;
                peer.freq = freq;
            }
            "worker-offline" if self.workers.remove(&event.hostname).is_some() => debug!("{} left", event.hostname),
            _ => {}
        }
        clock
    }

    /// Forget the workers whose heartbeats stopped; returns their names.
    pub fn sweep(&mut self, now: Instant) -> Vec<String> {
        let lost: Vec<String> = self
            .workers
            .iter()
            .filter(|(_, p)| now.duration_since(p.last_seen) > Duration::from_secs_f64(p.freq * EXPIRE_WINDOW))
            .map(|(name, _)| name.clone())
            .collect();
        for name in &lost {
            info!("missed heartbeat from {name}");
            self.workers.remove(name);
        }
        lost
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(host: &str, kind: &str, clock: u64) -> PeerEvent {
        PeerEvent {
            routing_key: kind.replace('-', "."),
            hostname: host.into(),
            body: json!({"type": kind, "hostname": host, "freq": 2.0, "clock": clock}),
        }
    }

    #[test]
    fn join_heartbeat_leave_and_lose() {
        let t0 = Instant::now();
        let mut peers = Peers::new("me@h");
        assert_eq!(peers.observe(&event("a@h", "worker-online", 5), t0), Some(5));
        peers.observe(&event("b@h", "worker-heartbeat", 6), t0);
        peers.observe(&event("me@h", "worker-heartbeat", 7), t0);
        let mut alive: Vec<&str> = peers.workers.keys().map(String::as_str).collect();
        alive.sort();
        assert_eq!(alive, ["a@h", "b@h"]);
        peers.observe(&event("a@h", "worker-offline", 8), t0);
        // b's heartbeats (every 2 s) stop: lost after 4 s, not before.
        peers.observe(&event("b@h", "worker-heartbeat", 9), t0 + Duration::from_secs(3));
        assert!(peers.sweep(t0 + Duration::from_secs(6)).is_empty());
        assert_eq!(peers.sweep(t0 + Duration::from_secs(8)), ["b@h"]);
        assert!(peers.workers.is_empty());
    }
}
