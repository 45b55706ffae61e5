//! The zygote side: start CPython ourselves and hand over to `python/celeriac/zygote.py`.
//!
//! This code runs only in `celeriac-zygote`, which the supervisor starts with the app's
//! interpreter's libpython (`pool::zygote::start`). The interpreter is configured like
//! `python -m celery` of that interpreter would be (`program_name` = that interpreter, so
//! `sys.executable`, `sys.prefix` and the virtualenv's site-packages match), then the zygote
//! imports the app and forks pool children with `os.fork()` from its only thread.

pub mod interpreter;

use std::ffi::CString;
use std::os::fd::RawFd;

use pyo3::prelude::*;
use pyo3::types::PyModule;

/// The Python half of the runtime, embedded so a single binary is all users install.
const MODULES: [(&str, &str, &str); 6] = [
    ("celeriac", "celeriac/__init__.py", include_str!("../../python/celeriac/__init__.py")),
    ("celeriac.frames", "celeriac/frames.py", include_str!("../../python/celeriac/frames.py")),
    ("celeriac.jsonlog", "celeriac/jsonlog.py", include_str!("../../python/celeriac/jsonlog.py")),
    ("celeriac.child", "celeriac/child.py", include_str!("../../python/celeriac/child.py")),
    ("celeriac.beat", "celeriac/beat.py", include_str!("../../python/celeriac/beat.py")),
    ("celeriac.zygote", "celeriac/zygote.py", include_str!("../../python/celeriac/zygote.py")),
];

/// `prctl(PR_SET_PDEATHSIG, sig)`, for `celery.platforms._set_pdeathsig`. billiard's own
/// version builds a cffi parser for one declaration in every pool child whenever the app
/// happened to import cffi: ~6 MiB of private memory per child, for one system call.
#[pyfunction]
fn set_pdeathsig(sig: i32) -> PyResult<()> {
    let failed =
        |why: String| pyo3::exceptions::PyOSError::new_err(format!("An error occurred while setting pdeathsig: {why}"));
    let sig = libc::c_ulong::try_from(sig).map_err(|_| failed(format!("invalid signal {sig}")))?;
    // SAFETY: prctl with PR_SET_PDEATHSIG takes one integer argument; an invalid signal is
    // refused with EINVAL, reported below.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, sig) } != 0 {
        return Err(failed(std::io::Error::last_os_error().to_string()));
    }
    Ok(())
}

fn load_modules(py: Python<'_>) -> PyResult<Bound<'_, PyModule>> {
    let mut zygote = None;
    for (name, file, source) in MODULES {
        let to_c = |s: &str| CString::new(s).map_err(|e| pyo3::exceptions::PyValueError::new_err(e.to_string()));
        let module = PyModule::from_code(py, &to_c(source)?, &to_c(&format!("<celeriac>/{file}"))?, &to_c(name)?)?;
        if name == "celeriac" {
            // Make it a package so `from celeriac import frames` resolves to our modules.
            module.setattr("__path__", pyo3::types::PyList::empty(py))?;
            module.add_function(wrap_pyfunction!(set_pdeathsig, &module)?)?;
        } else if let Some((_, attr)) = name.split_once('.') {
            py.import("celeriac")?.setattr(attr, &module)?;
        }
        if name == "celeriac.zygote" {
            zygote = Some(module);
        }
    }
    zygote.ok_or_else(|| pyo3::exceptions::PyRuntimeError::new_err("zygote module missing"))
}

/// `celeriac-zygote`'s main: the supervisor's socket is `CONTROL_FD`; its first frame is the
/// zygote's options (with the interpreter to run). Returns the exit code.
pub fn zygote_main() -> i32 {
    use std::io::Read;
    use std::os::fd::FromRawFd;

    // The supervisor put this interpreter's libpython first on the search path for us; what
    // the app and its subprocesses see is the path the user had.
    match std::env::var_os(ORIGINAL_LIBRARY_PATH) {
        // SAFETY: single-threaded, before the interpreter starts.
        Some(original) if original.is_empty() => unsafe { std::env::remove_var("LD_LIBRARY_PATH") },
        Some(original) => unsafe { std::env::set_var("LD_LIBRARY_PATH", original) },
        None => {}
    }
    // SAFETY: as above.
    unsafe { std::env::remove_var(ORIGINAL_LIBRARY_PATH) };
    // SAFETY: fd CONTROL_FD is the socket the supervisor passed; ManuallyDrop keeps it open
    // for the Python side, which takes it over.
    let mut control = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(CONTROL_FD) });
    let mut head = [0u8; 5];
    if control.read_exact(&mut head).is_err() {
        eprintln!("celeriac-zygote: start me through `celeriac`, not by hand");
        return 2;
    }
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let mut options = vec![0u8; len.saturating_sub(1)];
    if head[4] != celeriac_protocol::frame::Kind::Options as u8 || control.read_exact(&mut options).is_err() {
        eprintln!("celeriac-zygote: the supervisor sent no options");
        return 2;
    }
    let options = String::from_utf8_lossy(&options).into_owned();
    let python = serde_json::from_str::<serde_json::Value>(&options)
        .ok()
        .and_then(|o| o["python"].as_str().map(std::path::PathBuf::from))
        .unwrap_or_else(|| std::path::PathBuf::from(interpreter::BUILD_PYTHON));
    run_zygote(CONTROL_FD, &options, &python)
}

/// The zygote's end of the control socket, as the supervisor hands it over.
pub const CONTROL_FD: RawFd = 3;
/// Where the supervisor keeps the user's own `LD_LIBRARY_PATH` for the zygote to restore.
pub const ORIGINAL_LIBRARY_PATH: &str = "CELERIAC_ORIGINAL_LD_LIBRARY_PATH";

/// Run the zygote; returns the process exit code. Forked pool children never return here.
pub fn run_zygote(control_fd: RawFd, options_json: &str, python: &std::path::Path) -> i32 {
    if let Err(msg) = interpreter::initialize(python) {
        eprintln!("celeriac: {msg}");
        return 1;
    }
    Python::with_gil(|py| {
        let result =
            load_modules(py).and_then(|z| z.getattr("main")?.call1((control_fd, options_json))?.extract::<i32>());
        match result {
            Ok(code) => code,
            Err(err) => {
                err.print(py);
                1
            }
        }
    })
}
