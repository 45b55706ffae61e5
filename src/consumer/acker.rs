//! Settling deliveries off the hot path: acks and rejects are batched into one broker round
//! trip each time the consumer hands over more than one. An early ack (`acks_late=False`) may
//! wait a moment (`EARLY_ACK_DELAY`) while the prefetch window has room, so the broker's work
//! on it does not take the CPU from the child starting that very task. A batch's prefetch slots
//! go back once its settlement is on its way to the broker, not after the broker's reply.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Semaphore};
use tracing::error;

use crate::transport::{Settle, Transport};

/// One settlement as the consumer hands it over.
#[derive(Debug, Clone)]
pub struct SettleOp {
    pub settle: Settle,
    /// Frees a prefetch slot (an ETA request already got one back when it started waiting,
    /// see `Consumer::hold_until_eta`).
    pub frees_slot: bool,
    /// The early ack of a task that has just started: it may wait `EARLY_ACK_DELAY`.
    pub early_ack: bool,
}

impl SettleOp {
    pub fn now(settle: Settle, frees_slot: bool) -> Self {
        SettleOp { settle, frees_slot, early_ack: false }
    }

    pub fn early_ack(tag: String, frees_slot: bool) -> Self {
        SettleOp { settle: Settle::Ack(tag), frees_slot, early_ack: true }
    }
}

const MAX_BATCH: usize = 512;

/// How long an early ack may be held back. Sent at once, the ack wakes the broker while the
/// child is still starting the task (Celery's tracer, cold after an idle wait): on two cores
/// RabbitMQ's scheduler took the child's CPU for ~0.1 ms in a quarter of the tasks at 200/s.
/// Stock acks only once the child's "accepted" message reaches the MainProcess, also after the
/// task has begun; a crash inside this millisecond redelivers the message, as it does there.
const EARLY_ACK_DELAY: Duration = Duration::from_millis(1);

pub async fn run<T: Transport>(transport: Arc<T>, mut ops: mpsc::UnboundedReceiver<SettleOp>, window: Arc<Semaphore>) {
    while let Some(first) = ops.recv().await {
        // Let the reports and deliveries already waiting be handled first (one scheduler
        // turn, no timer): the acks they lead to leave in the same write.
        tokio::task::yield_now().await;
        let mut batch = vec![first];
        take_waiting(&mut ops, &mut batch);
        let deadline = tokio::time::Instant::now() + EARLY_ACK_DELAY;
        while may_wait(&batch, window.available_permits()) {
            tokio::select! {
                op = ops.recv() => match op {
                    Some(op) => {
                        batch.push(op);
                        take_waiting(&mut ops, &mut batch);
                    }
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        // Taken (left at 0) when given back, so the slots go back once.
        let mut slots = batch.iter().filter(|op| op.frees_slot).count();
        let settles: Vec<Settle> = batch.into_iter().map(|op| op.settle).collect();
        let mut delay = Duration::from_millis(100);
        // Keep trying: an ack that never reaches the broker means a duplicate run later.
        loop {
            let settled = transport.settle(settles.clone());
            tokio::pin!(settled);
            let outcome = match futures_lite::future::poll_once(&mut settled).await {
                Some(outcome) => outcome,
                None => {
                    // The acks are on their way (handed to the connection): their slots go
                    // back now, as on RabbitMQ, where an ack has no reply. Waiting for Redis's
                    // reply kept them from the next take for another round trip.
                    window.add_permits(std::mem::take(&mut slots));
                    settled.await
                }
            };
            match outcome {
                Ok(()) => break,
                Err(e) => {
                    error!(
                        "Could not acknowledge {} message(s): {e}. Retrying in {:.1}s",
                        settles.len(),
                        delay.as_secs_f64()
                    );
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
        window.add_permits(slots);
    }
}

fn take_waiting(ops: &mut mpsc::UnboundedReceiver<SettleOp>, batch: &mut Vec<SettleOp>) {
    while batch.len() < MAX_BATCH {
        match ops.try_recv() {
            Ok(op) => batch.push(op),
            Err(_) => break,
        }
    }
}

/// Hold the batch back only while it is all early acks and the prefetch window still has at
/// least as many free slots as the batch would give back: under load (a full window) acks
/// leave at once, so the broker never waits for them to send more.
fn may_wait(batch: &[SettleOp], free_slots: usize) -> bool {
    let freed = batch.iter().filter(|op| op.frees_slot).count();
    batch.len() < MAX_BATCH && batch.iter().all(|op| op.early_ack) && free_slots >= freed.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn early() -> SettleOp {
        SettleOp::early_ack("1.1".into(), true)
    }

    #[test]
    fn early_acks_wait_while_the_window_has_room() {
        assert!(may_wait(&[early()], 7));
        assert!(may_wait(&[early(), early()], 2));
    }

    #[test]
    fn a_full_window_sends_at_once() {
        assert!(!may_wait(&[early()], 0));
        assert!(!may_wait(&[early(), early(), early()], 2));
    }

    #[test]
    fn anything_but_an_early_ack_sends_at_once() {
        assert!(!may_wait(&[early(), SettleOp::now(Settle::Ack("1.2".into()), true)], 7));
        assert!(!may_wait(&[SettleOp::now(Settle::Reject("1.2".into()), true)], 7));
        assert!(!may_wait(&[SettleOp::now(Settle::Restore("1.2".into()), true)], 7));
    }

    #[test]
    fn an_eta_ack_that_frees_nothing_still_needs_one_free_slot() {
        assert!(may_wait(&[SettleOp::early_ack("1.1".into(), false)], 1));
        assert!(!may_wait(&[SettleOp::early_ack("1.1".into(), false)], 0));
    }
}
