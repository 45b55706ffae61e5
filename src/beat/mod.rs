//! Beat (`-B` and `celeriac beat`): Celery's own scheduler runs in a beat process forked from
//! the zygote (`python/celeriac/beat.py`); the supervisor decides when it may send.
//!
//! Beyond stock: several replicas may run beat. Only the holder of a leader lock in the broker
//! (a Redis key with expiry, an exclusive RabbitMQ queue) sends; the others wait and take over
//! within seconds when the leader dies. The leader shares each entry's last run through the
//! broker after every send, so the next leader neither repeats nor skips a run.

use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::pool::frame::{self, Kind};
use crate::pool::zygote::Zygote;
use crate::transport::Transport;

/// The lock lives this long unless renewed; a dead leader is replaced within about this time.
const LOCK_TTL: Duration = Duration::from_secs(6);
/// How often the leader renews the lock and followers ask for it.
const LOCK_EVERY: Duration = Duration::from_secs(2);

/// How to run the scheduler (`celery beat` / `celery worker -B` options).
#[derive(Debug, Clone, Default)]
pub struct BeatOptions {
    /// `-s/--schedule`: the `PersistentScheduler`'s state file (`beat_schedule_filename`).
    pub schedule_filename: Option<String>,
    /// `--scheduler`: the scheduler class (`beat_scheduler`).
    pub scheduler: Option<String>,
    /// `--max-interval`: the longest sleep between two looks at the schedule.
    pub max_interval: Option<f64>,
    /// `celeriac beat` (prints stock beat's banner) rather than `worker -B`.
    pub standalone: bool,
    pub loglevel: String,
    pub logfile: Option<PathBuf>,
    /// Take the leader lock before sending (off: send unconditionally, as stock).
    pub leader_lock: bool,
}

impl BeatOptions {
    fn spec(&self) -> Value {
        json!({
            "role": "beat",
            "beat": {
                "schedule_filename": self.schedule_filename,
                "scheduler": self.scheduler,
                "max_interval": self.max_interval,
                "standalone": self.standalone,
                "loglevel": self.loglevel,
                "logfile": self.logfile,
            },
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BeatError {
    #[error("cannot start the beat process: {0}")]
    Start(#[from] std::io::Error),
}

/// The supervisor's end of the beat process.
pub struct BeatProcess {
    stream: UnixStream,
}

/// Fork the beat process from the zygote.
pub async fn spawn(zygote: &mut Zygote, options: &BeatOptions) -> Result<BeatProcess, BeatError> {
    let (ours, theirs) = StdUnixStream::pair()?;
    zygote.fork_process(&options.spec(), &theirs).await?;
    drop(theirs);
    ours.set_nonblocking(true)?;
    Ok(BeatProcess { stream: UnixStream::from_std(ours)? })
}

/// The lock's name: one per app, in the broker the app uses.
pub fn lock_name(app_main: Option<&str>) -> String {
    format!("celeriac.beat.{}", app_main.filter(|m| !m.is_empty()).unwrap_or("default"))
}

/// Run until `stop`: while this replica leads (or always, without the lock) the beat process
/// sends due tasks. Returns once the beat process has saved its schedule and exited.
pub async fn lead<T: Transport>(
    transport: Arc<T>,
    process: BeatProcess,
    options: BeatOptions,
    lock: String,
    holder: String,
    mut stop: watch::Receiver<bool>,
) {
    let (mut reader, mut writer) = process.stream.into_split();
    let mut ready = false;
    let mut leading = false;
    let mut last_renewed = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(LOCK_EVERY);
    loop {
        tokio::select! {
            frame = frame::read(&mut reader) => match frame {
                Ok(Some((Kind::Ready, _))) => {
                    ready = true;
                    tick.reset_immediately();
                }
                Ok(Some((Kind::BeatState, payload))) if leading && options.leader_lock => {
                    match serde_json::from_slice::<Value>(&payload) {
                        Ok(state) => {
                            if let Err(e) = transport.save_beat_state(&lock, &state).await {
                                warn!("beat: could not share the schedule state: {e}");
                            }
                        }
                        Err(e) => warn!("beat: unreadable schedule state from the beat process: {e}"),
                    }
                }
                Ok(Some((Kind::BeatState, _))) => {}
                Ok(Some((kind, _))) => warn!("beat: unexpected {kind:?} frame from the beat process"),
                Ok(None) | Err(_) => {
                    if !*stop.borrow() {
                        error!("The beat process exited: periodic tasks are no longer sent by this node");
                    }
                    return;
                }
            },
            _ = tick.tick(), if ready => {
                if !options.leader_lock {
                    if !leading {
                        leading = send(&mut writer, Kind::BeatLead, b"{}").await;
                    }
                    continue;
                }
                match transport.beat_lead(&lock, &holder, LOCK_TTL).await {
                    Ok(true) => {
                        last_renewed = tokio::time::Instant::now();
                        if !leading {
                            let state = match transport.beat_state(&lock).await {
                                Ok(state) => state.unwrap_or_else(|| json!({})),
                                Err(e) => {
                                    warn!("beat: could not read the last leader's schedule state: {e}");
                                    json!({})
                                }
                            };
                            leading = send(&mut writer, Kind::BeatLead, state.to_string().as_bytes()).await;
                            info!("beat: took the leader lock {lock}: this node sends the periodic tasks");
                        }
                    }
                    Ok(false) => {
                        if leading {
                            warn!("beat: another node holds the leader lock {lock} now; this node stops sending");
                            leading = !send(&mut writer, Kind::BeatFollow, b"").await;
                        }
                    }
                    Err(e) => {
                        warn!("beat: cannot reach the leader lock {lock}: {e}");
                        // Stop before the lock can have expired, so two nodes never send at once.
                        if leading && last_renewed.elapsed() + LOCK_EVERY >= LOCK_TTL {
                            leading = !send(&mut writer, Kind::BeatFollow, b"").await;
                        }
                    }
                }
            }
            _ = stop.changed() => break,
        }
    }
    if leading && options.leader_lock {
        if let Err(e) = transport.beat_resign(&lock, &holder).await {
            warn!("beat: could not release the leader lock {lock}: {e}");
        }
    }
    // Closing our end tells the beat process to save its schedule and exit; wait for that.
    let _ = writer.shutdown().await;
    drop(writer);
    let drained = async { while let Ok(Some(_)) = frame::read(&mut reader).await {} };
    if tokio::time::timeout(Duration::from_secs(15), drained).await.is_err() {
        warn!("beat: the beat process did not exit in time");
    }
}

/// Send a frame to the beat process; false if it is gone.
async fn send(writer: &mut OwnedWriteHalf, kind: Kind, payload: &[u8]) -> bool {
    writer.write_all(&frame::encode(kind, payload)).await.is_ok()
}
