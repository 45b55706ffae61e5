//! The prefork pool, supervisor side: asks the zygote for children, writes jobs to idle
//! children, and turns their frames and exits into [`PoolEvent`]s for the consumer.

mod child_socket;
pub mod frame;
pub mod zygote;

use std::collections::{HashMap, VecDeque};
use std::os::unix::net::UnixStream as StdUnixStream;

use tokio::sync::mpsc;
use tracing::{debug, error};

use child_socket::ChildWriter;
use frame::Kind;
pub use zygote::{ExitStatus, Zygote};

pub use celeriac_protocol::frame::DoneReport;

#[derive(Debug)]
pub enum PoolEvent {
    /// A new child finished its initialisation and waits for work.
    Ready { index: usize, pid: i32 },
    /// A child finished its job.
    Done { index: usize, report: DoneReport },
    /// A child's socket closed: it exited or is about to.
    Gone { index: usize },
    /// The zygote reaped a child.
    Exited { pid: i32, status: ExitStatus },
    /// The zygote ran the handlers of a MainProcess signal we asked for (its name).
    SignalSent(String),
    /// The zygote itself is gone: nothing more can be forked.
    ZygoteGone,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Starting,
    Idle,
    Busy,
    /// Exiting after its last job (recycled); replaced when its socket closes.
    Retiring,
}

struct Slot {
    pid: Option<i32>,
    state: SlotState,
    /// `None` once we closed it to make the child leave (pool shrink).
    writer: Option<ChildWriter>,
    /// Jobs it reported done.
    jobs_done: u64,
    /// billiard's process index: the lowest free from 0, a dead child's reused by the next
    /// (Celery's `%i` in file names is this plus one).
    process_index: usize,
}

pub struct Pool {
    zygote: Zygote,
    slots: HashMap<usize, Slot>,
    idle: VecDeque<usize>,
    next_index: usize,
    events: mpsc::UnboundedSender<PoolEvent>,
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("could not create a socket pair for a child: {0}")]
    Socket(std::io::Error),
    #[error("could not ask the zygote to fork: {0}")]
    Fork(String),
    #[error("child {0} is not idle")]
    NotIdle(usize),
    #[error("writing to child {0}: {1}")]
    Write(usize, std::io::Error),
}

impl Pool {
    pub fn new(zygote: Zygote, events: mpsc::UnboundedSender<PoolEvent>) -> Self {
        Pool { zygote, slots: HashMap::new(), idle: VecDeque::new(), next_index: 1, events }
    }

    /// Ask the zygote for one more child. It reports `Ready` once initialised.
    pub async fn spawn_child(&mut self) -> Result<usize, PoolError> {
        let (ours, theirs) = StdUnixStream::pair().map_err(PoolError::Socket)?;
        let index = self.next_index;
        self.next_index += 1;
        let process_index = self.free_process_index();
        self.zygote.fork(index, process_index, &theirs).await.map_err(|e| PoolError::Fork(e.to_string()))?;
        drop(theirs);
        let (reader, writer) = child_socket::split(ours).map_err(PoolError::Socket)?;
        // Buffered: a frame's header and payload, and frames queued behind it, in one read.
        let mut reader = tokio::io::BufReader::new(reader);
        let events = self.events.clone();
        tokio::spawn(async move {
            loop {
                match frame::read(&mut reader).await {
                    Ok(Some((Kind::Ready, payload))) => {
                        let pid = serde_json::from_slice::<serde_json::Value>(&payload)
                            .ok()
                            .and_then(|v| v["pid"].as_i64())
                            .unwrap_or(0) as i32;
                        let _ = events.send(PoolEvent::Ready { index, pid });
                    }
                    Ok(Some((Kind::Done, payload))) => {
                        match serde_json::from_slice::<DoneReport>(&payload) {
                            Ok(report) => {
                                let _ = events.send(PoolEvent::Done { index, report });
                            }
                            Err(e) => {
                                // Still free the child; settle as a failure of unknown cause.
                                error!("ForkPoolWorker-{index} sent an unreadable report: {e}");
                                let report = DoneReport { outcome: "failure".into(), ..Default::default() };
                                let _ = events.send(PoolEvent::Done { index, report });
                            }
                        }
                    }
                    Ok(Some((Kind::Succeeded, payload))) => {
                        let report = DoneReport::succeeded(&payload).unwrap_or_else(|| {
                            error!("ForkPoolWorker-{index} sent a short success report");
                            DoneReport { outcome: "success".into(), ..Default::default() }
                        });
                        let _ = events.send(PoolEvent::Done { index, report });
                    }
                    Ok(Some((kind, _))) => {
                        error!("ForkPoolWorker-{index} sent an unexpected {kind:?} frame")
                    }
                    Ok(None) => break,
                    Err(e) => {
                        error!("ForkPoolWorker-{index}: broken frame stream: {e}");
                        break;
                    }
                }
            }
            let _ = events.send(PoolEvent::Gone { index });
        });
        self.slots.insert(
            index,
            Slot { pid: None, state: SlotState::Starting, writer: Some(writer), jobs_done: 0, process_index },
        );
        Ok(index)
    }

    /// The lowest process index no child has (billiard's `Pool._avail_index`).
    fn free_process_index(&self) -> usize {
        lowest_free(self.slots.values().map(|s| s.process_index).collect())
    }

    pub fn on_ready(&mut self, index: usize, pid: i32) {
        if let Some(slot) = self.slots.get_mut(&index) {
            slot.pid = Some(pid);
            slot.state = SlotState::Idle;
            self.idle.push_back(index);
        }
    }

    /// A child finished its job; it gets more work unless it said it is leaving, or it
    /// started the job queued behind (`starts_queued`). Returns whether that was the child's
    /// first job (which also paid for its one-time set-up: backend connection, lazy imports).
    pub fn on_done(&mut self, index: usize, exiting: bool, starts_queued: bool) -> bool {
        let Some(slot) = self.slots.get_mut(&index) else { return false };
        slot.jobs_done += 1;
        if exiting {
            slot.state = SlotState::Retiring;
        } else if starts_queued {
            slot.state = SlotState::Busy;
        } else if slot.state == SlotState::Busy {
            slot.state = SlotState::Idle;
            self.idle.push_back(index);
        }
        slot.jobs_done == 1
    }

    /// Forget a child whose socket closed; returns its pid if it had reported one.
    pub fn on_gone(&mut self, index: usize) -> Option<i32> {
        self.idle.retain(|i| *i != index);
        self.slots.remove(&index).and_then(|s| s.pid)
    }

    pub fn pid(&self, index: usize) -> Option<i32> {
        self.slots.get(&index).and_then(|s| s.pid)
    }

    pub fn pids(&self) -> Vec<i32> {
        let mut pids: Vec<i32> = self.slots.values().filter_map(|s| s.pid).collect();
        pids.sort();
        pids
    }

    pub fn has_pid(&self, pid: i32) -> bool {
        self.slots.values().any(|s| s.pid == Some(pid))
    }

    /// Children that finished starting (idle or busy).
    pub fn ready_count(&self) -> usize {
        self.slots.values().filter(|s| s.state != SlotState::Starting).count()
    }

    /// Make one idle child leave (pool shrink): its socket is closed, it exits on end of
    /// stream. Returns false when no child is idle right now.
    pub fn retire_idle(&mut self) -> bool {
        let Some(index) = self.idle.pop_back() else { return false };
        if let Some(slot) = self.slots.get_mut(&index) {
            slot.state = SlotState::Retiring;
            slot.writer = None;
        }
        true
    }

    /// Children not on their way out.
    pub fn serving(&self) -> usize {
        self.slots.values().filter(|s| s.state != SlotState::Retiring).count()
    }

    /// An idle child, taken out of the idle list (fair scheduling: only idle children get work).
    pub fn take_idle(&mut self) -> Option<usize> {
        self.idle.pop_front()
    }

    /// Give a child taken with `take_idle` back without work.
    pub fn put_back_idle(&mut self, index: usize) {
        self.idle.push_front(index);
    }

    pub async fn send(&mut self, index: usize, bytes: &[u8]) -> Result<(), PoolError> {
        let slot = self.slots.get_mut(&index).ok_or(PoolError::NotIdle(index))?;
        slot.state = SlotState::Busy;
        let writer = slot.writer.as_mut().ok_or(PoolError::NotIdle(index))?;
        writer.write_all(bytes).await.map_err(|e| PoolError::Write(index, e))
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Warm stop: close every child's socket; each finishes and exits on end of stream.
    pub fn close_all(&mut self) {
        debug!("closing {} pool children", self.slots.len());
        self.idle.clear();
        self.slots.clear();
    }

    /// Send a signal to one child: SIGUSR1 (soft time limit), SIGTERM (cancel), SIGKILL (hard).
    pub fn signal(&self, index: usize, signal: nix::sys::signal::Signal) {
        if let Some(pid) = self.slots.get(&index).and_then(|s| s.pid) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
        }
    }

    /// Cold stop: kill every child now.
    pub fn kill_all(&mut self) {
        for slot in self.slots.values() {
            if let Some(pid) = slot.pid {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
        self.close_all();
    }

    pub fn zygote(&mut self) -> &mut Zygote {
        &mut self.zygote
    }
}

/// The lowest number from 0 not in `taken`.
fn lowest_free(mut taken: Vec<usize>) -> usize {
    taken.sort_unstable();
    let mut free = 0;
    for index in taken {
        if index == free {
            free += 1;
        } else if index > free {
            break;
        }
    }
    free
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_indexes_are_reused_lowest_first() {
        assert_eq!(lowest_free(vec![]), 0);
        assert_eq!(lowest_free(vec![0, 1]), 2);
        assert_eq!(lowest_free(vec![1, 0, 3]), 2);
        assert_eq!(lowest_free(vec![2, 1]), 0);
    }
}
