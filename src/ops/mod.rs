//! Process-level concerns: logging, signals, pidfile, daemonizing, the start-up banner.

pub mod banner;
pub mod daemon;
pub mod doctor;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod pidfile;
pub mod signals;
