//! Events for Flower and `celery events` (reference §7): worker-online/heartbeat/offline, and
//! with `-E` the task events, buffered and sent as one `task.multi` list per loop tick (or
//! every 24 events), as the stock worker's event-loop pool does.

use serde_json::{Map, Value};
use tokio::sync::mpsc;

/// An event message for the transport: routing key and body.
pub type EventMessage = (String, Value);

const BUFFER_LIMIT: usize = 24;

pub struct Events {
    /// Task events (`-E`, `worker_send_task_events`, `enable_events`).
    pub task_events: bool,
    /// Worker events and heartbeats (off with `--without-heartbeat`).
    pub worker_events: bool,
    /// Heartbeat interval in seconds (`--heartbeat-interval`, 2.0).
    pub freq: f64,
    hostname: String,
    sw_ver: String,
    pid: u32,
    buffer: Vec<Value>,
    out: mpsc::UnboundedSender<EventMessage>,
}

fn now() -> f64 {
    chrono::Utc::now().timestamp_micros() as f64 / 1e6
}

/// `celery.utils.time.utcoffset`: hours, positive west of UTC (as `time.timezone`).
fn utcoffset() -> f64 {
    -f64::from(chrono::Local::now().offset().local_minus_utc()) / 3600.0
}

fn loadavg() -> Vec<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| {
            s.split_whitespace()
                .take(3)
                .filter_map(|v| v.parse::<f64>().ok())
                .map(|v| (v * 100.0).round() / 100.0)
                .collect()
        })
        .unwrap_or_default()
}

impl Events {
    pub fn new(
        hostname: String,
        sw_ver: String,
        task_events: bool,
        worker_events: bool,
        freq: f64,
        out: mpsc::UnboundedSender<EventMessage>,
    ) -> Self {
        Events { task_events, worker_events, freq, hostname, sw_ver, pid: std::process::id(), buffer: Vec::new(), out }
    }

    fn event(&self, clock: &mut u64, kind: &str, fields: Value) -> Value {
        *clock += 1;
        let mut e = match fields {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        e.insert("hostname".into(), Value::from(self.hostname.clone()));
        e.insert("utcoffset".into(), Value::from(utcoffset()));
        e.insert("pid".into(), Value::from(self.pid));
        e.insert("clock".into(), Value::from(*clock));
        e.insert("timestamp".into(), Value::from(now()));
        e.insert("type".into(), Value::from(kind));
        Value::Object(e)
    }

    /// Queue a task event (`task-received`, `task-succeeded`, ...) for the next flush. The
    /// fields are only built when task events are on (they are off by default).
    pub fn task(&mut self, clock: &mut u64, kind: &str, fields: impl FnOnce() -> Value) {
        if !self.task_events {
            return;
        }
        let e = self.event(clock, kind, fields());
        self.buffer.push(e);
        if self.buffer.len() >= BUFFER_LIMIT {
            self.flush();
        }
    }

    /// Send what is buffered as one `task.multi` message.
    pub fn flush(&mut self) {
        if !self.buffer.is_empty() {
            let batch = std::mem::take(&mut self.buffer);
            let _ = self.out.send(("task.multi".into(), Value::Array(batch)));
        }
    }

    /// `worker-online`, `worker-heartbeat`, `worker-offline`, sent at once.
    pub fn worker(&mut self, clock: &mut u64, kind: &str, active: usize, processed: u64) {
        if !self.worker_events {
            return;
        }
        let fields = serde_json::json!({
            "freq": self.freq,
            "active": active,
            "processed": processed,
            "loadavg": loadavg(),
            "sw_ident": "py-celery",
            "sw_ver": self.sw_ver,
            "sw_sys": "Linux",
        });
        let e = self.event(clock, kind, fields);
        let _ = self.out.send((kind.replace('-', "."), e));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_events_are_batched_and_worker_events_are_not() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut ev = Events::new("w@h".into(), "5.7.0".into(), true, true, 2.0, tx);
        let mut clock = 0;
        ev.task(&mut clock, "task-received", || serde_json::json!({"uuid": "1"}));
        ev.task(&mut clock, "task-started", || serde_json::json!({"uuid": "1"}));
        assert!(rx.try_recv().is_err());
        ev.flush();
        let (rk, body) = rx.try_recv().unwrap();
        assert_eq!(rk, "task.multi");
        assert_eq!(body[0]["type"], "task-received");
        assert_eq!(body[1]["clock"], 2);
        ev.worker(&mut clock, "worker-heartbeat", 1, 5);
        let (rk, body) = rx.try_recv().unwrap();
        assert_eq!(rk, "worker.heartbeat");
        assert_eq!(body["freq"], 2.0);
        assert_eq!(body["hostname"], "w@h");
        ev.task_events = false;
        ev.task(&mut clock, "task-received", || serde_json::json!({}));
        ev.flush();
        assert!(rx.try_recv().is_err());
    }
}
