//! What the worker counts for `/metrics` (Prometheus text format) and `/readyz`. The consumer
//! updates it as things happen; the HTTP endpoint only reads it.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// Upper bounds (seconds) of the runtime and queue-wait histograms.
const BUCKETS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0];

#[derive(Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        for (i, le) in BUCKETS.iter().enumerate() {
            if v <= *le {
                self.counts[i] += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        for (i, le) in BUCKETS.iter().enumerate() {
            let _ = writeln!(out, "{name}_bucket{{{labels}le=\"{le}\"}} {}", self.counts[i]);
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum{{{}}} {}", labels.trim_end_matches(','), self.sum);
        let _ = writeln!(out, "{name}_count{{{}}} {}", labels.trim_end_matches(','), self.count);
    }
}

#[derive(Default)]
struct PerTask {
    events: BTreeMap<String, BTreeMap<&'static str, u64>>,
    runtime: BTreeMap<String, Histogram>,
    wait: BTreeMap<String, Histogram>,
}

/// The entry for `name`, allocating its key only the first time (this runs several times per task).
fn per_name<'a, V: Default>(map: &'a mut BTreeMap<String, V>, name: &str) -> Option<&'a mut V> {
    if !map.contains_key(name) {
        map.insert(name.to_owned(), V::default());
    }
    map.get_mut(name)
}

#[derive(Default)]
pub struct Metrics {
    per_task: Mutex<PerTask>,
    pub prefetched: AtomicU64,
    pub eta_waiting: AtomicU64,
    pub active: AtomicU64,
    pub children_alive: AtomicU64,
    pub child_restarts: AtomicU64,
    pub pipelined: AtomicU64,
    pub broker_reconnects: AtomicU64,
    pub broker_connected: AtomicBool,
    pub children_ready: AtomicBool,
}

/// Prometheus label values escape `\`, `"` and newlines.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

impl Metrics {
    fn tasks(&self) -> std::sync::MutexGuard<'_, PerTask> {
        self.per_task.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Count a task event: received, started, succeeded, failed, retried, revoked, rejected.
    pub fn task(&self, name: &str, event: &'static str) {
        if let Some(events) = per_name(&mut self.tasks().events, name) {
            *events.entry(event).or_default() += 1;
        }
    }

    pub fn runtime(&self, name: &str, seconds: f64) {
        if let Some(h) = per_name(&mut self.tasks().runtime, name) {
            h.observe(seconds);
        }
    }

    /// Time from receipt (or ETA) to start in a child.
    pub fn queue_wait(&self, name: &str, seconds: f64) {
        if let Some(h) = per_name(&mut self.tasks().wait, name) {
            h.observe(seconds);
        }
    }

    pub fn set(gauge: &AtomicU64, v: usize) {
        gauge.store(v as u64, Ordering::Relaxed);
    }

    pub fn ready(&self) -> bool {
        self.broker_connected.load(Ordering::Relaxed) && self.children_ready.load(Ordering::Relaxed)
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let t = self.tasks();
        let _ = writeln!(out, "# HELP celeriac_tasks_total Task events seen by this worker.");
        let _ = writeln!(out, "# TYPE celeriac_tasks_total counter");
        for (name, events) in &t.events {
            for (event, n) in events {
                let _ = writeln!(out, "celeriac_tasks_total{{task=\"{}\",event=\"{event}\"}} {n}", label(name));
            }
        }
        let _ = writeln!(out, "# HELP celeriac_task_runtime_seconds Task run time in the pool child.");
        let _ = writeln!(out, "# TYPE celeriac_task_runtime_seconds histogram");
        for (name, h) in &t.runtime {
            h.render(&mut out, "celeriac_task_runtime_seconds", &format!("task=\"{}\",", label(name)));
        }
        let _ = writeln!(out, "# HELP celeriac_task_queue_wait_seconds Time from receipt (or ETA) to start.");
        let _ = writeln!(out, "# TYPE celeriac_task_queue_wait_seconds histogram");
        for (name, h) in &t.wait {
            h.render(&mut out, "celeriac_task_queue_wait_seconds", &format!("task=\"{}\",", label(name)));
        }
        drop(t);
        let gauges = [
            ("celeriac_prefetched_messages", "Messages held, not started (ready or rate limited).", &self.prefetched),
            ("celeriac_eta_waiting_messages", "Messages held until their ETA.", &self.eta_waiting),
            ("celeriac_active_tasks", "Tasks running in pool children.", &self.active),
            ("celeriac_children_alive", "Pool children alive.", &self.children_alive),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}", v.load(Ordering::Relaxed));
        }
        let counters = [
            ("celeriac_child_restarts_total", "Pool children replaced.", &self.child_restarts),
            (
                "celeriac_tasks_pipelined_total",
                "Tasks written to a busy child behind its running one.",
                &self.pipelined,
            ),
            ("celeriac_broker_reconnects_total", "Broker connections re-established.", &self.broker_reconnects),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", v.load(Ordering::Relaxed));
        }
        let _ = writeln!(
            out,
            "# HELP celeriac_ready 1 when connected to the broker with every pool child up.\n# TYPE celeriac_ready gauge\nceleriac_ready {}",
            u8::from(self.ready())
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.task("a.add", "succeeded");
        m.task("a.add", "succeeded");
        m.runtime("a.add", 0.003);
        m.queue_wait("a.add", 0.2);
        Metrics::set(&m.children_alive, 2);
        let text = m.render();
        assert!(text.contains("celeriac_tasks_total{task=\"a.add\",event=\"succeeded\"} 2"));
        assert!(text.contains("celeriac_task_runtime_seconds_bucket{task=\"a.add\",le=\"0.005\"} 1"));
        assert!(text.contains("celeriac_task_runtime_seconds_bucket{task=\"a.add\",le=\"0.001\"} 0"));
        assert!(text.contains("celeriac_task_runtime_seconds_count{task=\"a.add\"} 1"));
        assert!(text.contains("celeriac_children_alive 2"));
        assert!(text.contains("celeriac_ready 0"));
        assert_eq!(label("a\"b"), "a\\\"b");
    }
}
