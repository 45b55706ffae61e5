//! The zygote process (`celeriac-zygote`): started by the supervisor with the app's
//! interpreter's libpython, it starts CPython, imports the app once and forks pool children on
//! request (design §2).

use std::io::IoSlice;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use serde::Deserialize;
use tokio::io::Interest;
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tracing::{debug, error};

use super::frame::{self, Kind};
use super::PoolEvent;

/// How a process ended, as the zygote saw it in `waitpid`.
#[derive(Debug, Clone, Deserialize)]
pub struct ExitStatus {
    pub exitcode: Option<i32>,
    pub signal: Option<i32>,
    #[serde(default)]
    pub signal_name: Option<String>,
}

impl ExitStatus {
    /// Exit code 0: a child that left on purpose (recycled, or told to stop).
    pub fn is_clean(&self) -> bool {
        self.signal.is_none() && self.exitcode == Some(0)
    }
}

impl std::fmt::Display for ExitStatus {
    /// In billiard's words: `exitcode 0` or `signal 9 (SIGKILL)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.signal, self.exitcode) {
            (Some(sig), _) => write!(f, "signal {sig} ({})", self.signal_name.as_deref().unwrap_or("?")),
            (None, Some(code)) => write!(f, "exitcode {code}"),
            (None, None) => write!(f, "an unknown status"),
        }
    }
}

#[derive(Deserialize)]
struct ExitReport {
    pid: i32,
    #[serde(flatten)]
    status: ExitStatus,
}

/// A forked zygote whose app is still loading.
pub struct PendingZygote {
    stream: StdUnixStream,
}

#[derive(Debug, thiserror::Error)]
pub enum ZygoteError {
    #[error("could not start the zygote process: {0}")]
    Start(String),
    /// The app could not be loaded; the zygote says why in one line.
    #[error("{0}")]
    AppFailed(String),
    #[error("the zygote exited before it reported the app's configuration")]
    DiedEarly,
    #[error("zygote: {0}")]
    Protocol(String),
}

/// Where `celeriac-zygote` is: `CELERIAC_ZYGOTE`, else beside this executable.
pub fn executable() -> Result<PathBuf, String> {
    match std::env::var_os("CELERIAC_ZYGOTE") {
        Some(path) => Ok(PathBuf::from(path)),
        None => std::env::current_exe()
            .map(|exe| exe.with_file_name("celeriac-zygote"))
            .map_err(|e| format!("cannot find this executable: {e}")),
    }
}

/// Start `celeriac-zygote` (beside this executable, or `CELERIAC_ZYGOTE`) with the chosen
/// interpreter's libpython (`libdir`) first on its library path, its end of a socketpair as
/// fd 3, this process's own argv (the app sees `sys.argv` as under the supervisor), and
/// `options` (with `"python"`) as its first frame. Call it from the main thread: the zygote
/// dies with the thread that started it (parent-death signal), and its children with it.
pub fn start(mut options: serde_json::Value, python: &Path, libdir: &Path) -> Result<PendingZygote, ZygoteError> {
    use std::io::Write;
    use std::os::unix::process::CommandExt;

    let exe = executable().map_err(ZygoteError::Start)?;
    let (mut ours, theirs) = StdUnixStream::pair().map_err(|e| ZygoteError::Start(e.to_string()))?;
    let original = std::env::var_os("LD_LIBRARY_PATH").unwrap_or_default();
    let mut search = libdir.as_os_str().to_owned();
    if !original.is_empty() {
        search.push(":");
        search.push(&original);
    }
    let mut args = std::env::args_os();
    let mut command = std::process::Command::new(&exe);
    if let Some(arg0) = args.next() {
        command.arg0(arg0);
    }
    command.args(args).env("LD_LIBRARY_PATH", search).env(crate::embed::ORIGINAL_LIBRARY_PATH, original);
    let fd = theirs.as_raw_fd();
    let parent = nix::unistd::getpid();
    // SAFETY: only async-signal-safe calls between fork and exec: prctl, getppid, dup2, fcntl.
    unsafe {
        command.pre_exec(move || {
            // Die with the supervisor; children die with the zygote in turn.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if libc::getppid() != parent.as_raw() {
                return Err(std::io::Error::other("the supervisor is gone"));
            }
            let target = crate::embed::CONTROL_FD;
            let moved = if fd == target { libc::fcntl(target, libc::F_SETFD, 0) } else { libc::dup2(fd, target) };
            if moved < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command.spawn().map_err(|e| ZygoteError::Start(format!("cannot start the zygote {}: {e}", exe.display())))?;
    drop(theirs);
    options["python"] = python.display().to_string().into();
    ours.write_all(&frame::encode(Kind::Options, options.to_string().as_bytes()))
        .map_err(|e| ZygoteError::Start(format!("the zygote did not take its options: {e}")))?;
    Ok(PendingZygote { stream: ours })
}

impl PendingZygote {
    /// Wait for the app's configuration; then the zygote is ready to fork children.
    pub async fn bootstrap(self, events: mpsc::UnboundedSender<PoolEvent>) -> Result<(Zygote, Vec<u8>), ZygoteError> {
        self.stream.set_nonblocking(true).map_err(|e| ZygoteError::Start(e.to_string()))?;
        let stream = UnixStream::from_std(self.stream).map_err(|e| ZygoteError::Start(e.to_string()))?;
        let (mut reader, writer) = stream.into_split();
        let info = match frame::read(&mut reader).await {
            Ok(Some((Kind::Bootstrap, payload))) => payload,
            Ok(Some((Kind::Fatal, payload))) => {
                return Err(ZygoteError::AppFailed(String::from_utf8_lossy(&payload).into_owned()))
            }
            Ok(Some((kind, _))) => return Err(ZygoteError::Protocol(format!("unexpected {kind:?} before bootstrap"))),
            Ok(None) => return Err(ZygoteError::DiedEarly),
            Err(e) => return Err(ZygoteError::Protocol(e.to_string())),
        };
        tokio::spawn(async move {
            loop {
                match frame::read(&mut reader).await {
                    Ok(Some((Kind::Forked, payload))) => {
                        debug!("zygote forked {}", String::from_utf8_lossy(&payload))
                    }
                    Ok(Some((Kind::SignalSent, payload))) => {
                        let name = serde_json::from_slice::<serde_json::Value>(&payload)
                            .ok()
                            .and_then(|v| v["signal"].as_str().map(str::to_owned))
                            .unwrap_or_default();
                        let _ = events.send(PoolEvent::SignalSent(name));
                    }
                    Ok(Some((Kind::Exited, payload))) => match serde_json::from_slice::<ExitReport>(&payload) {
                        Ok(r) => {
                            let _ = events.send(PoolEvent::Exited { pid: r.pid, status: r.status });
                        }
                        Err(e) => error!("zygote sent an unreadable exit report: {e}"),
                    },
                    Ok(Some((kind, _))) => error!("zygote sent an unexpected {kind:?} frame"),
                    Ok(None) => break,
                    Err(e) => {
                        error!("zygote: broken frame stream: {e}");
                        break;
                    }
                }
            }
            let _ = events.send(PoolEvent::ZygoteGone);
        });
        Ok((Zygote { writer: Some(writer) }, info))
    }
}

pub struct Zygote {
    writer: Option<OwnedWriteHalf>,
}

impl Zygote {
    /// Ask for a child that will talk over `theirs`; the fd travels with SCM_RIGHTS.
    pub async fn fork(&mut self, index: usize, process_index: usize, theirs: &StdUnixStream) -> std::io::Result<()> {
        self.fork_process(&serde_json::json!({"index": index, "process_index": process_index}), theirs).await
    }

    /// Ask for a process described by `spec` (a pool child `{"index": n}`, or the beat process
    /// `{"role": "beat", "beat": {...}}`) that will talk over `theirs`.
    pub async fn fork_process(&mut self, spec: &serde_json::Value, theirs: &StdUnixStream) -> std::io::Result<()> {
        let writer = self.writer.as_ref().ok_or_else(|| std::io::Error::other("zygote closed"))?;
        let bytes = frame::encode(Kind::Fork, spec.to_string().as_bytes());
        let fds = [theirs.as_raw_fd()];
        let stream: &UnixStream = writer.as_ref();
        loop {
            stream.writable().await?;
            let sent = stream.try_io(Interest::WRITABLE, || {
                sendmsg::<()>(
                    stream.as_raw_fd(),
                    &[IoSlice::new(&bytes)],
                    &[ControlMessage::ScmRights(&fds)],
                    MsgFlags::empty(),
                    None,
                )
                .map_err(std::io::Error::from)
            });
            match sent {
                Ok(n) if n == bytes.len() => return Ok(()),
                Ok(n) => return Err(std::io::Error::other(format!("short write to zygote ({n} bytes)"))),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Ask the zygote to write the `--statedb` file (it is celery's shelve format).
    pub async fn save_state(&mut self, state: &serde_json::Value) -> std::io::Result<()> {
        self.send(Kind::SaveState, state).await
    }

    /// Have the zygote send a MainProcess signal (`worker_ready`, `worker_shutdown`, ...).
    pub async fn worker_signal(&mut self, event: &serde_json::Value) -> std::io::Result<()> {
        self.send(Kind::WorkerSignal, event).await
    }

    /// Have the zygote send `task_received` for a request (TASK frame layout).
    pub async fn task_received(&mut self, task_frame_payload: &[u8]) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        let writer = self.writer.as_mut().ok_or_else(|| std::io::Error::other("zygote closed"))?;
        writer.write_all(&frame::encode(Kind::TaskReceived, task_frame_payload)).await
    }

    /// Have the zygote store an outcome record (when no pool child is left to do it).
    pub async fn record(&mut self, record: &serde_json::Value) -> std::io::Result<()> {
        self.send(Kind::Record, record).await
    }

    async fn send(&mut self, kind: Kind, payload: &serde_json::Value) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        let writer = self.writer.as_mut().ok_or_else(|| std::io::Error::other("zygote closed"))?;
        writer.write_all(&frame::encode(kind, payload.to_string().as_bytes())).await
    }

    /// Close the control socket: the zygote exits, and with it any child still alive.
    pub fn close(&mut self) {
        self.writer = None;
    }
}
