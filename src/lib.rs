//! celeriac, a drop-in replacement for `celery -A APP worker`, as a library for its two
//! programs: `celeriac` (the supervisor, src/main.rs) and `celeriac-zygote` (the process that
//! embeds CPython, imports the app and forks the pool children, src/bin/celeriac-zygote.rs).
//!
//! Data flow: broker (`transport`) → message (`celeriac_protocol`, in `crates/protocol`) →
//! scheduling and acks (`consumer`) → pool children (`pool`) → the embedded CPython runtime
//! (`embed`, `python/celeriac`). Only `embed` touches Python, and only the zygote runs it.

pub mod beat;
pub mod cli;
pub mod config;
pub mod consumer;
pub mod control;
pub mod embed;
pub mod ops;
pub mod pool;
pub mod transport;
pub mod worker;
