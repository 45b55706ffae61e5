//! A task request in the worker's hands, and the jobs pool children run.

use chrono::Utc;
use serde_json::Value;

use crate::config::TaskOptions;
use crate::protocol::{ChildMeta, TaskMessage};
use crate::transport::Delivery;

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
}

impl Request {
    pub fn is_expired(&self) -> bool {
        self.message.expires.is_some_and(|e| e <= Utc::now())
    }

    /// The request description as JSON, for outcome records a child stores for us.
    pub fn child_meta_value(&self, hostname: &str) -> Value {
        serde_json::from_slice(&ChildMeta::encode(&self.delivery, &self.message, hostname))
            .unwrap_or(Value::Null)
    }

    /// Put the body back from an encoded TASK frame whose write failed.
    pub fn restore_body(&mut self, task_frame: &[u8]) {
        // frame: u32 len | kind | u32 meta len | meta | body
        if task_frame.len() >= 9 {
            let meta_len =
                u32::from_be_bytes([task_frame[5], task_frame[6], task_frame[7], task_frame[8]])
                    as usize;
            if let Some(body) = task_frame.get(9 + meta_len..) {
                self.delivery.body = body.to_vec();
            }
        }
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
