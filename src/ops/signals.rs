//! Shutdown signals, as the stock worker reads them (`celery/apps/worker.py`): SIGTERM is a
//! warm shutdown (exit 0), the first SIGINT warm (exit 1), a second SIGINT or SIGQUIT cold,
//! and — for a worker without a terminal — SIGHUP a warm shutdown followed by a re-exec.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};

use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM};
use signal_hook::iterator::Signals;
use tokio::sync::mpsc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Stop consuming, give back what has not started, let running tasks finish.
    Warm { exit_code: i32 },
    /// Stop now: running tasks are killed, their unacked messages given back.
    Cold,
}

/// Set by SIGHUP: once the warm shutdown is over, `main` executes the same command again.
static RESTART: AtomicBool = AtomicBool::new(false);

pub fn restart_requested() -> bool {
    RESTART.load(Ordering::SeqCst)
}

/// Set by the signal handler itself, the moment a stop signal arrives, before the stop reaches
/// the consumer. A SIGTERM sent to the whole process group (`kill -- -PGID`, `timeout`,
/// systemd's control-group kill) also kills the pool children, whose deaths can reach the
/// consumer first: this says they are part of the shutdown, not children to replace.
static STOP_SIGNALLED: LazyLock<Arc<AtomicBool>> = LazyLock::new(|| Arc::new(AtomicBool::new(false)));

pub fn stop_signalled() -> bool {
    STOP_SIGNALLED.load(Ordering::SeqCst)
}

/// Forward shutdown signals to the async world. `REMAP_SIGTERM=SIGQUIT` makes SIGTERM cold.
/// With `restart_on_hup`, SIGHUP restarts — only when stdout is not a terminal, as stock, so
/// closing a terminal window does not restart a worker into the background.
pub fn listen(restart_on_hup: bool) -> std::io::Result<mpsc::UnboundedReceiver<Stop>> {
    // SAFETY: isatty only inspects the descriptor.
    let hup = restart_on_hup && unsafe { libc::isatty(1) } == 0;
    let mut wanted = vec![SIGTERM, SIGINT, SIGQUIT];
    if hup {
        wanted.push(SIGHUP);
    }
    for &sig in &wanted {
        signal_hook::flag::register(sig, Arc::clone(&STOP_SIGNALLED))?;
    }
    let mut signals = Signals::new(wanted)?;
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
                SIGHUP => {
                    let argv: Vec<String> = std::env::args().collect();
                    tracing::warn!("Restarting celeriac worker ({})", argv.join(" "));
                    RESTART.store(true, Ordering::SeqCst);
                    Stop::Warm { exit_code: 0 }
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
