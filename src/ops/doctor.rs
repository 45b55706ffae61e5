//! `celeriac --version` and `celeriac doctor`: what a user needs to know before a worker
//! starts, and for each problem, how to fix it.

use std::fmt::Display;
use std::path::PathBuf;

use crate::cli::Cli;
use crate::embed::interpreter::{self, Interpreter, LINKED_VERSION};

/// `--version`: celeriac's own version, the Python it would run the app with (and whether it
/// can), and the Celery that Python imports.
pub fn print_version(cli: &Cli) -> i32 {
    println!("celeriac {} (zygote built for Python {LINKED_VERSION})", env!("CARGO_PKG_VERSION"));
    let python = interpreter::choose(cli.python.as_deref());
    match Interpreter::probe(&python, true) {
        Ok(found) => {
            let lib = match found.check() {
                Ok(dir) => format!("libpython in {}", dir.display()),
                Err(e) => format!("unusable: {e}"),
            };
            println!("python {} ({}; {lib})", found.full_version, python.display());
            println!("celery {}", found.celery.as_deref().unwrap_or("not importable there (pip install celery)"));
        }
        Err(e) => println!("python: {e}"),
    }
    0
}

/// The checks `doctor` prints, one line each: `ok` or `FAIL` with how to fix it.
pub struct Report {
    failed: bool,
}

impl Report {
    pub fn start() -> Self {
        println!("celeriac doctor {}", env!("CARGO_PKG_VERSION"));
        Report { failed: false }
    }

    pub fn ok(&self, what: impl Display) {
        println!("  ok    {what}");
    }

    pub fn fail(&mut self, what: impl Display, fix: impl Display) {
        self.failed = true;
        println!("  FAIL  {what}\n        fix: {fix}");
    }

    /// The exit code: 1 if anything failed.
    pub fn finish(&self) -> i32 {
        if self.failed {
            println!("Something above needs fixing before `celeriac worker` can run.");
            1
        } else {
            println!("All good: `celeriac worker` can run here.");
            0
        }
    }
}

/// The interpreter, its libpython and its Celery; the interpreter and its libpython's folder
/// when the app can be loaded with them.
pub fn check_python(cli: &Cli, report: &mut Report) -> Option<(PathBuf, PathBuf)> {
    match crate::pool::zygote::executable() {
        Ok(path) if path.exists() => {
            report.ok(format!("zygote {} (built for Python {LINKED_VERSION})", path.display()))
        }
        Ok(path) => report.fail(
            format!("the zygote {} is missing", path.display()),
            "reinstall celeriac: celeriac-zygote belongs beside celeriac (pip install celeriac, or copy both binaries)",
        ),
        Err(e) => report.fail(e, "run celeriac from its installed path"),
    }
    let python = interpreter::choose(cli.python.as_deref());
    let found = match Interpreter::probe(&python, true) {
        Ok(found) => found,
        Err(e) => {
            report.fail(e, "activate the app's virtualenv, or pass --python / set CELERIAC_PYTHON");
            return None;
        }
    };
    let libdir = match found.check() {
        Ok(dir) => {
            report.ok(format!("Python {} at {}, libpython in {}", found.full_version, python.display(), dir.display()));
            dir
        }
        Err(e) => {
            report.fail(e, "see above; `celeriac --version` shows what was found");
            return None;
        }
    };
    match &found.celery {
        Some(version) => report.ok(format!("Celery {version}")),
        None => {
            report.fail(
                format!("Celery is not importable by {}", python.display()),
                "pip install celery (with the extras your broker needs, e.g. celery[redis]) in that environment",
            );
            return None;
        }
    }
    Some((python, libdir))
}
