//! celeriac: a drop-in replacement for `celery -A APP worker`.
//!
//! Data flow: broker (`transport`) → message (`protocol`) → scheduling and acks (`consumer`) →
//! pool children (`pool`) → the embedded CPython runtime (`embed`, `python/celeriac`).

mod cli;
mod config;
mod consumer;
mod control;
mod embed;
mod ops;
mod pool;
mod protocol;
mod transport;
mod worker;

use clap::Parser;

fn main() {
    let cli = cli::Cli::parse();
    let code = match &cli.command {
        cli::Command::Worker(args) => worker::run(&cli, args),
    };
    std::process::exit(code);
}
