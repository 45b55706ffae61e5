//! Choosing the interpreter and starting CPython with our own configuration
//! (no pyo3 auto-initialize: `program_name` must be the app's interpreter).

use std::ffi::CString;
use std::path::{Path, PathBuf};

use pyo3::ffi;

/// The Python version this binary links (major, minor), fixed at build time.
pub const LINKED_VERSION: &str = env!("CELERIAC_PYTHON_VERSION");
/// The interpreter the binary was built against, the fallback when no virtualenv is active.
pub const BUILD_PYTHON: &str = env!("CELERIAC_BUILD_PYTHON");

/// Pick the interpreter whose environment the app runs in, as `python -m celery` would:
/// `--python`, else the active virtualenv, else a `python` beside this binary (a pip-installed
/// celeriac lives in the virtualenv's `bin/`), else the interpreter it was built against.
pub fn choose(explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    if let Some(venv) = std::env::var_os("VIRTUAL_ENV") {
        let candidate = Path::new(&venv).join("bin").join("python");
        if candidate.exists() {
            return candidate;
        }
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            let candidate = dir.join("python");
            if candidate.exists() && dir.parent().is_some_and(|d| d.join("pyvenv.cfg").exists()) {
                return candidate;
            }
        }
    }
    PathBuf::from(BUILD_PYTHON)
}

/// The `version` a virtualenv's `pyvenv.cfg` records, as "major.minor".
fn venv_version(python: &Path) -> Option<String> {
    let dir = python.parent()?.parent()?;
    let cfg = std::fs::read_to_string(dir.join("pyvenv.cfg")).ok()?;
    cfg.lines().find_map(|line| {
        let (key, value) = line.split_once('=')?;
        let key = key.trim();
        if key == "version" || key == "version_info" {
            let mut parts = value.trim().split('.');
            Some(format!("{}.{}", parts.next()?, parts.next()?))
        } else {
            None
        }
    })
}

/// Refuse to mix two Pythons: the linked libpython must match the virtualenv's version.
pub fn check_compatible(python: &Path) -> Result<(), String> {
    if !python.exists() {
        return Err(format!("Python interpreter {} does not exist (set --python or VIRTUAL_ENV)", python.display()));
    }
    if let Some(found) = venv_version(python) {
        if found != LINKED_VERSION {
            return Err(format!(
                "this celeriac is built for Python {LINKED_VERSION}, but the virtualenv of {} is Python {found}; \
                 install celeriac into that virtualenv (pip install celeriac) or pass --python",
                python.display()
            ));
        }
    }
    Ok(())
}

fn check(status: ffi::PyStatus, what: &str) -> Result<(), String> {
    // SAFETY: PyStatus is a plain struct returned by value by the C API.
    if unsafe { ffi::PyStatus_Exception(status) } != 0 {
        let msg = if status.err_msg.is_null() {
            "unknown error".to_owned()
        } else {
            // SAFETY: err_msg is a static C string set by CPython.
            unsafe { std::ffi::CStr::from_ptr(status.err_msg) }.to_string_lossy().into_owned()
        };
        return Err(format!("could not start Python ({what}): {msg}"));
    }
    Ok(())
}

/// Start the interpreter. Call once, from the only thread of the process.
pub fn initialize(python: &Path) -> Result<(), String> {
    check_compatible(python)?;
    let program = CString::new(python.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    let args: Vec<CString> = std::env::args_os().filter_map(|a| CString::new(a.as_encoded_bytes()).ok()).collect();
    let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    // SAFETY: the PyConfig API is used as documented: init, set, initialize, clear; the strings
    // outlive the calls that copy them.
    unsafe {
        let mut config = std::mem::MaybeUninit::<ffi::PyConfig>::zeroed();
        ffi::PyConfig_InitPythonConfig(config.as_mut_ptr());
        let mut config = config.assume_init();
        let result = (|| {
            check(
                ffi::PyConfig_SetBytesString(&mut config, &mut config.program_name, program.as_ptr()),
                "program name",
            )?;
            config.parse_argv = 0;
            check(ffi::PyConfig_SetBytesArgv(&mut config, argv.len() as ffi::Py_ssize_t, argv.as_mut_ptr()), "argv")?;
            check(ffi::Py_InitializeFromConfig(&config), "initialize")
        })();
        ffi::PyConfig_Clear(&mut config);
        result
    }
}
