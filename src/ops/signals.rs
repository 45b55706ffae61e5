//! Shutdown signals, as the stock worker reads them (`celery/apps/worker.py`): SIGTERM is a
//! warm shutdown (exit 0), the first SIGINT warm (exit 1), a second SIGINT or SIGQUIT cold.

use signal_hook::consts::{SIGINT, SIGQUIT, SIGTERM};
use signal_hook::iterator::Signals;
use tokio::sync::mpsc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Stop consuming, give back what has not started, let running tasks finish.
    Warm { exit_code: i32 },
    /// Stop now: running tasks are killed, their unacked messages given back.
    Cold,
}

/// Forward shutdown signals to the async world. `REMAP_SIGTERM=SIGQUIT` makes SIGTERM cold.
pub fn listen() -> std::io::Result<mpsc::UnboundedReceiver<Stop>> {
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGQUIT])?;
    let (tx, rx) = mpsc::unbounded_channel();
    let remap_term = std::env::var("REMAP_SIGTERM").map(|v| v == "SIGQUIT").unwrap_or(false);
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        let mut interrupted = false;
        for sig in signals.forever() {
            let stop = match sig {
                SIGTERM if remap_term => Stop::Cold,
                SIGTERM => Stop::Warm { exit_code: 0 },
                SIGINT if interrupted => Stop::Cold,
                SIGINT => {
                    interrupted = true;
                    Stop::Warm { exit_code: 1 }
                }
                _ => Stop::Cold,
            };
            if tx.send(stop).is_err() {
                return;
            }
        }
    })?;
    Ok(rx)
}
