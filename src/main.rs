//! celeriac: a drop-in replacement for `celery -A APP worker`.
//!
//! Data flow: broker (`transport`) → message (`protocol`) → scheduling and acks (`consumer`) →
//! pool children (`pool`) → the embedded CPython runtime (`embed`, `python/celeriac`).

mod beat;
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

use clap::{CommandFactory, FromArgMatches};

fn main() {
    let matches = cli::Cli::command().get_matches();
    let cli = match cli::Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let code = match &cli.command {
        cli::Command::Worker(args) => worker::run(&cli, args),
        cli::Command::Beat(args) => worker::run_beat(&cli, args),
        cli::Command::Config(args) => {
            let sub = matches.subcommand().map(|(_, m)| m).unwrap_or(&matches);
            let given = |id: &str| config::effective::given(sub, id);
            worker::show_config(&cli, &args.worker, &given, args.json)
        }
    };
    std::process::exit(code);
}
