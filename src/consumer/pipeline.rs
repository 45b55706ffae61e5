//! Pipelining: writing the next request to a busy child behind its running one, so a child
//! that finishes a short task starts the next at once instead of waiting for the supervisor to
//! hear of it and answer (at thousands of tasks a second that round trip leaves children idle
//! half the time).
//!
//! A queued request is not started: it is not acked, has no time-limit clocks and is reported
//! as reserved; it starts when the child reports its running job done. Since it cannot be taken
//! back from the child's socket, only requests behind a task that has always run briefly are
//! queued: a revoke that arrives for one in that window is at most `MAX_QUEUED` × `max_runtime`
//! late. Stock's `-O fair` never writes to a busy child; `--pipeline-max-ms 0` does the same.

use std::collections::{HashMap, VecDeque};

use super::Request;

/// At most this many requests wait in a child's socket behind its running job.
pub const MAX_QUEUED: usize = 3;

/// The most bytes of frames queued behind a running job: they must fit the socket's buffer,
/// or the write would wait for the child.
pub const MAX_QUEUED_BYTES: usize = 64 * 1024;

/// The requests written to one busy child behind its running job, oldest first, with the
/// size of each one's frame.
pub struct Queued<R = Box<Request>> {
    requests: VecDeque<(R, usize)>,
    bytes: usize,
}

impl<R> Default for Queued<R> {
    fn default() -> Self {
        Queued { requests: VecDeque::new(), bytes: 0 }
    }
}

impl<R> Queued<R> {
    /// May another request be written behind these?
    pub fn has_room(&self) -> bool {
        self.requests.len() < MAX_QUEUED
    }

    /// Would a frame of `len` bytes still fit the socket's buffer behind these?
    pub fn fits(&self, len: usize) -> bool {
        self.bytes + len <= MAX_QUEUED_BYTES
    }

    pub fn push(&mut self, request: R, len: usize) {
        self.bytes += len;
        self.requests.push_back((request, len));
    }

    /// The next one the child starts, when it reports its running job done.
    pub fn pop(&mut self) -> Option<R> {
        let (request, len) = self.requests.pop_front()?;
        self.bytes -= len;
        Some(request)
    }

    pub fn into_requests(self) -> impl DoubleEndedIterator<Item = R> {
        self.requests.into_iter().map(|(r, _)| r)
    }
}

impl Queued {
    pub fn iter(&self) -> impl Iterator<Item = &Request> {
        self.requests.iter().map(|(r, _)| &**r)
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Request> {
        self.requests.iter_mut().map(|(r, _)| &mut **r)
    }
}

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
    fn queued_in_order_up_to_the_count_and_the_bytes() {
        let mut q: Queued<u32> = Queued::default();
        for i in 0..MAX_QUEUED as u32 {
            assert!(q.has_room());
            q.push(i, 100);
        }
        assert!(!q.has_room());
        assert_eq!(q.pop(), Some(0));
        assert!(q.has_room());
        assert!(q.fits(MAX_QUEUED_BYTES - 200));
        assert!(!q.fits(MAX_QUEUED_BYTES - 199));
        assert_eq!(q.into_requests().collect::<Vec<_>>(), (1..MAX_QUEUED as u32).collect::<Vec<_>>());
    }

    #[test]
    fn off_means_no_history() {
        let mut p = Pipeline::new(Some(0.0));
        p.observe("a", 0.001);
        assert!(p.typical.is_empty());
        assert!(Pipeline::new(None).max_runtime.is_none());
    }
}
