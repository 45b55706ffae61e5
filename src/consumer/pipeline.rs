//! Pipelining: writing the next request to a busy child behind its running one, so a child
//! that finishes a short task starts the next at once instead of waiting for the supervisor to
//! hear of it and answer (at thousands of tasks a second that round trip leaves children idle
//! half the time).
//!
//! A queued request is not started: it is not acked, has no time-limit clocks and is reported
//! as reserved; it starts when the child reports its running job done. Since it cannot be taken
//! back from the child's socket, only requests behind a task that has always run briefly are
//! queued: a revoke that arrives for one in that window is at most `max_runtime` late. Stock's
//! `-O fair` never writes to a busy child; `--pipeline-max-ms 0` does the same here.

use std::collections::HashMap;

use super::Request;

/// The largest frame queued behind a running job: it must fit the socket's buffer, or the
/// write would wait for the child.
pub const MAX_QUEUED_FRAME: usize = 64 * 1024;

pub struct Pipeline {
    /// Queue behind tasks whose runs take less than this (seconds); `None`: never.
    max_runtime: Option<f64>,
    /// Typical runtime by task name: follows each slower run at once, faster ones slowly.
    typical: HashMap<String, f64>,
}

impl Pipeline {
    pub fn new(max_runtime: Option<f64>) -> Self {
        Pipeline { max_runtime: max_runtime.filter(|m| *m > 0.0), typical: HashMap::new() }
    }

    /// A run of `task` took `runtime` seconds.
    pub fn observe(&mut self, task: &str, runtime: f64) {
        if self.max_runtime.is_none() {
            return;
        }
        match self.typical.get_mut(task) {
            Some(t) if runtime >= *t => *t = runtime,
            Some(t) => *t = 0.9 * *t + 0.1 * runtime,
            None => {
                self.typical.insert(task.to_owned(), runtime);
            }
        }
    }

    /// May a request be queued behind `running`, at `now` (epoch seconds)? Only behind a task
    /// known to be short that has not yet run longer than that.
    pub fn may_queue_behind(&self, running: &Request, now: f64) -> bool {
        let Some(max) = self.max_runtime else { return false };
        let short = self.typical.get(&running.message.name).is_some_and(|t| *t < max);
        let running_for = running.time_start.map_or(f64::INFINITY, |start| now - start);
        short && running_for < max && !running.timed_out && running.terminated.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typical_runtime_follows_slow_runs_at_once() {
        let mut p = Pipeline::new(Some(0.005));
        p.observe("a", 0.001);
        assert_eq!(p.typical["a"], 0.001);
        p.observe("a", 0.5);
        assert_eq!(p.typical["a"], 0.5);
        for _ in 0..100 {
            p.observe("a", 0.001);
        }
        assert!(p.typical["a"] < 0.005);
    }

    #[test]
    fn off_means_no_history() {
        let mut p = Pipeline::new(Some(0.0));
        p.observe("a", 0.001);
        assert!(p.typical.is_empty());
        assert!(Pipeline::new(None).max_runtime.is_none());
    }
}
