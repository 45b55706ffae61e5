//! A task request in the worker's hands, and the jobs pool children run.

use chrono::Utc;
use serde_json::Value;

use crate::config::TaskOptions;
use crate::transport::Delivery;
use celeriac_protocol::{ChildMeta, TaskMessage};

/// A received task message with the options of its task (`celery/worker/request.py: Request`).
#[derive(Debug)]
pub struct Request {
    pub delivery: Delivery,
    pub message: TaskMessage,
    pub options: TaskOptions,
    /// It waited for its ETA, which already gave its prefetch slot back.
    pub eta_bumped: bool,
    /// Terminated on purpose after a connection loss: the broker redelivers it, so its end
    /// is neither a worker loss nor something to settle.
    pub cancelled: bool,
    /// When the soft / hard time limit falls due while it runs (set at dispatch).
    pub soft_deadline: Option<tokio::time::Instant>,
    pub hard_deadline: Option<tokio::time::Instant>,
    /// Killed for exceeding its hard time limit: already recorded and settled.
    pub timed_out: bool,
    /// Terminated by `revoke(terminate=True)` with this signal number.
    pub terminated: Option<i32>,
    /// When it started in a child (epoch seconds), for `inspect active`.
    pub time_start: Option<f64>,
    /// When it became ready to run (receipt, or its ETA), for the queue-wait metric.
    pub ready_since: tokio::time::Instant,
}

impl Request {
    /// A fresh request, not yet scheduled.
    pub fn new(delivery: Delivery, message: TaskMessage, options: TaskOptions) -> Self {
        Request {
            delivery,
            message,
            options,
            eta_bumped: false,
            cancelled: false,
            soft_deadline: None,
            hard_deadline: None,
            timed_out: false,
            terminated: None,
            time_start: None,
            ready_since: tokio::time::Instant::now(),
        }
    }

    /// `(hard, soft)` in seconds: the message's `timelimit`, else the task's options, else the
    /// worker's `--time-limit` / `--soft-time-limit` (`Request.execute_using_pool`).
    pub fn time_limits(&self, worker_hard: Option<f64>, worker_soft: Option<f64>) -> (Option<f64>, Option<f64>) {
        let (hard, soft) = self.message.timelimit;
        (hard.or(self.options.time_limit).or(worker_hard), soft.or(self.options.soft_time_limit).or(worker_soft))
    }

    /// Start the time-limit clocks: the task starts now.
    pub fn start_clocks(&mut self, worker_hard: Option<f64>, worker_soft: Option<f64>) {
        self.time_start = Some(chrono::Utc::now().timestamp_micros() as f64 / 1e6);
        let now = tokio::time::Instant::now();
        let (hard, soft) = self.time_limits(worker_hard, worker_soft);
        let at = |s: f64| now + std::time::Duration::from_secs_f64(s);
        self.hard_deadline = hard.map(at);
        self.soft_deadline = soft.map(at);
    }

    pub fn is_expired(&self) -> bool {
        self.message.expires.is_some_and(|e| e <= Utc::now())
    }

    /// The request description as JSON, for outcome records a child stores for us.
    pub fn child_meta_value(&self, hostname: &str) -> Value {
        serde_json::from_slice(&ChildMeta::encode_json(&self.delivery, &self.message, hostname)).unwrap_or(Value::Null)
    }

    /// `Request.info()`, what `inspect active/reserved/scheduled` show.
    pub fn info(&self, hostname: &str, worker_pid: Option<i32>) -> Value {
        serde_json::json!({
            "id": self.message.id,
            "name": self.message.display_name(),
            "args": self.message.argsrepr,
            "kwargs": self.message.kwargsrepr,
            "type": self.message.name,
            "hostname": hostname,
            "time_start": self.time_start,
            "acknowledged": !self.options.acks_late && self.time_start.is_some(),
            "delivery_info": {
                "exchange": self.delivery.exchange,
                "routing_key": self.delivery.routing_key,
                "priority": self.delivery.properties.get("priority"),
                "redelivered": self.delivery.redelivered,
            },
            "worker_pid": worker_pid,
        })
    }
}

/// Work for a pool child.
#[derive(Debug)]
pub enum Job {
    /// Run a task.
    Task(Box<Request>),
    /// Store an outcome no task run produced (unregistered, expired, worker lost), through the
    /// app's own backend in the child, exactly as Celery writes it.
    Record(Value),
}

impl Job {
    /// The task request, unless this is an outcome record.
    pub fn task(&self) -> Option<&Request> {
        match self {
            Job::Task(r) => Some(r),
            Job::Record(_) => None,
        }
    }
}
