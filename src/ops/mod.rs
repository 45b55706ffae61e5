//! Process-level concerns: logging, signals, pidfile, daemonizing, the start-up banner, resident memory.

pub mod banner;
pub mod daemon;
pub mod doctor;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod pidfile;
pub mod resident;
pub mod signals;
