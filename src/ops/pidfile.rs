//! `--pidfile`: refuse to start when a live process owns it, remove it at exit.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PidfileError {
    #[error("pidfile {0} is held by running process {1}")]
    Locked(PathBuf, i32),
    #[error("cannot write pidfile {0}: {1}")]
    Io(PathBuf, std::io::Error),
}

pub struct Pidfile(PathBuf);

impl Pidfile {
    /// Fail if another live process owns the file (a stale one, or our own pid after a
    /// SIGHUP re-exec, is fine).
    pub fn check(path: &Path) -> Result<(), PidfileError> {
        if let Ok(text) = std::fs::read_to_string(path) {
            if let Ok(pid) = text.trim().parse::<i32>() {
                let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
                if alive && pid != std::process::id() as i32 {
                    return Err(PidfileError::Locked(path.to_path_buf(), pid));
                }
            }
        }
        Ok(())
    }

    pub fn create(path: &Path) -> Result<Pidfile, PidfileError> {
        Self::check(path)?;
        std::fs::write(path, format!("{}\n", std::process::id()))
            .map_err(|e| PidfileError::Io(path.to_path_buf(), e))?;
        Ok(Pidfile(path.to_path_buf()))
    }
}

impl Drop for Pidfile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
