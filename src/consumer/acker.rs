//! Settling deliveries off the hot path: acks and rejects are batched into one broker round
//! trip each time the consumer hands over more than one, without delaying any of them.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Semaphore};
use tracing::error;

use crate::transport::{Settle, Transport};

/// One settlement and whether it frees a prefetch slot (an ETA request already got one back
/// when it started waiting, see `Consumer::hold_until_eta`).
pub type SettleOp = (Settle, bool);

const MAX_BATCH: usize = 512;

pub async fn run<T: Transport>(transport: Arc<T>, mut ops: mpsc::UnboundedReceiver<SettleOp>, window: Arc<Semaphore>) {
    while let Some(first) = ops.recv().await {
        // Let the reports and deliveries already waiting be handled first (one scheduler
        // turn, no timer): the acks they lead to leave in the same write.
        tokio::task::yield_now().await;
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match ops.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let permits = batch.iter().filter(|(_, frees)| *frees).count();
        let settles: Vec<Settle> = batch.into_iter().map(|(s, _)| s).collect();
        let mut delay = Duration::from_millis(100);
        // Keep trying: an ack that never reaches the broker means a duplicate run later.
        while let Err(e) = transport.settle(settles.clone()).await {
            error!("Could not acknowledge {} message(s): {e}. Retrying in {:.1}s", settles.len(), delay.as_secs_f64());
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
        window.add_permits(permits);
    }
}
