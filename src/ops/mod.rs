//! Process-level concerns: logging, signals, pidfile, the start-up banner.

pub mod banner;
pub mod logging;
pub mod pidfile;
pub mod signals;
