//! `celeriac`: the supervisor, a drop-in replacement for `celery -A APP worker`. It never
//! loads Python itself: it starts `celeriac-zygote` (src/bin/celeriac-zygote.rs) with the
//! app's interpreter's libpython, and talks to it over a socket.

use celeriac::{cli, config, ops, worker};
use clap::{CommandFactory, FromArgMatches};

fn main() {
    // glibc consolidates its fast bins before every allocation of 1 KiB or more (a TASK frame,
    // a delivery's body): a walk over freed chunks for each task. Small frees still go to the
    // per-thread cache, which serves the hot path.
    // SAFETY: mallopt only sets an allocator parameter; called before any thread exists.
    unsafe {
        libc::mallopt(libc::M_MXFAST, 0);
    }
    let matches = cli::Cli::command().get_matches();
    let cli = match cli::Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    if cli.version {
        std::process::exit(ops::doctor::print_version(&cli));
    }
    let Some(command) = &cli.command else {
        let _ = cli::Cli::command().print_help();
        std::process::exit(2);
    };
    // A SIGHUP restart runs the same command from the same place (`--workdir` moves us).
    let started_in = std::env::current_dir().ok();
    let code = match command {
        cli::Command::Worker(args) => {
            // As stock, an abbreviation Celery does not know stops the start.
            let files = worker::MainProcessFiles::of(args).unwrap_or_else(|e| {
                eprintln!("celeriac: {e}");
                std::process::exit(1);
            });
            daemonize(&args.daemon, files.logfile.as_deref(), files.pidfile.as_deref());
            let code = worker::run(&cli, args, &files);
            if ops::signals::restart_requested() {
                restart(started_in.as_deref());
            }
            code
        }
        cli::Command::Beat(args) => {
            daemonize(&args.daemon, args.logfile.as_deref(), args.pidfile.as_deref());
            worker::run_beat(&cli, args)
        }
        cli::Command::Config(args) => {
            let sub = matches.subcommand().map(|(_, m)| m).unwrap_or(&matches);
            let given = |id: &str| config::effective::given(sub, id);
            let files = worker::MainProcessFiles::of(&args.worker)
                .unwrap_or_else(|_| worker::MainProcessFiles::as_given(&args.worker));
            worker::show_config(&cli, &args.worker, &files, &given, args.json)
        }
        cli::Command::Doctor(args) => worker::doctor(&cli, args),
    };
    std::process::exit(code);
}

/// `--uid/--gid/--umask/--detach`, before any thread exists; exits 1 with the reason if they
/// cannot be honoured.
fn daemonize(flags: &cli::Daemonize, logfile: Option<&std::path::Path>, pidfile: Option<&std::path::Path>) {
    let options = ops::daemon::DaemonOptions {
        detach: flags.detach,
        uid: flags.uid.as_deref(),
        gid: flags.gid.as_deref(),
        umask: flags.umask.as_deref(),
        logfile,
        pidfile,
    };
    if let Err(e) = ops::daemon::apply(&options) {
        eprintln!("celeriac: {e}");
        std::process::exit(1);
    }
}

/// Replace this process with the same command (stock's SIGHUP restart: same pid, same argv).
fn restart(started_in: Option<&std::path::Path>) {
    use std::os::unix::process::CommandExt;
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            tracing::error!("Cannot restart: the executable is unknown: {e}");
            return;
        }
    };
    let mut command = std::process::Command::new(exe);
    command.args(ops::daemon::restart_args(std::env::args_os().skip(1))).env("CELERIAC_DETACH", "false");
    if let Some(dir) = started_in {
        command.current_dir(dir);
    }
    let e = command.exec();
    tracing::error!("Cannot restart: {e}");
}
