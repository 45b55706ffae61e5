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

/// What the interpreter whose environment runs the app says of itself. The supervisor asks it
/// (it never loads Python), checks it is the Python the zygote was built for, and starts the
/// zygote with exactly this interpreter's libpython: never a mix of two Pythons.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Interpreter {
    /// As chosen (e.g. the virtualenv's `bin/python`): `sys.executable` in the app.
    #[serde(skip)]
    pub path: PathBuf,
    /// `major.minor`.
    pub version: String,
    pub full_version: String,
    /// `sysconfig`'s LIBDIR and INSTSONAME: where its libpython is, and its file name.
    pub libdir: Option<String>,
    pub soname: Option<String>,
    /// `Py_ENABLE_SHARED`: built with a shared libpython.
    pub shared: bool,
    /// The Celery version importable there, when asked for.
    #[serde(default)]
    pub celery: Option<String>,
}

/// Run by the interpreter to describe itself; `argv[1] == "celery"` also imports celery.
const PROBE: &str = r#"
import json, sys, sysconfig
var = sysconfig.get_config_var
celery = None
if sys.argv[1:] == ["celery"]:
    try:
        import celery as c
        celery = c.__version__
    except Exception as e:
        celery = None
print(json.dumps({"version": "%d.%d" % sys.version_info[:2], "full_version": sys.version.split()[0],
                  "libdir": var("LIBDIR"), "soname": var("INSTSONAME") or var("LDLIBRARY"),
                  "shared": bool(var("Py_ENABLE_SHARED")), "celery": celery}))
"#;

impl Interpreter {
    /// Ask `python` about itself (and the Celery it can import, with `with_celery`).
    pub fn probe(python: &Path, with_celery: bool) -> Result<Interpreter, String> {
        if !python.exists() {
            return Err(format!(
                "Python interpreter {} does not exist (set --python or VIRTUAL_ENV)",
                python.display()
            ));
        }
        let mut command = std::process::Command::new(python);
        if with_celery {
            // Not isolated: celery is found as the app finds it (the working directory too).
            command.args(["-c", PROBE, "celery"]);
        } else {
            command.args(["-I", "-c", PROBE]);
        }
        let out = command.output().map_err(|e| format!("cannot run Python interpreter {}: {e}", python.display()))?;
        if !out.status.success() {
            return Err(format!(
                "Python interpreter {} failed to describe itself: {}",
                python.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let mut found: Interpreter = serde_json::from_slice(&out.stdout)
            .map_err(|e| format!("Python interpreter {} gave an unreadable description: {e}", python.display()))?;
        found.path = python.to_path_buf();
        Ok(found)
    }

    /// Can the zygote (built for `LINKED_VERSION`) run this interpreter's Python? Returns the
    /// folder that holds its libpython.
    pub fn check(&self) -> Result<PathBuf, String> {
        if self.version != LINKED_VERSION {
            return Err(format!(
                "this celeriac is built for Python {LINKED_VERSION}, but {} is Python {}: install celeriac \
                 into a Python {LINKED_VERSION} virtualenv, or build it for this one (`pip install celeriac` in it \
                 builds or picks a wheel for its Python), or pass --python",
                self.path.display(),
                self.full_version
            ));
        }
        let missing = || {
            format!(
                "{} (Python {}) has no shared libpython: celeriac embeds CPython and needs one. Check with \
                 `{} -c \"import sysconfig; print(sysconfig.get_config_var('Py_ENABLE_SHARED'))\"` (it must print 1); \
                 pyenv: PYTHON_CONFIGURE_OPTS=--enable-shared pyenv install {}; Debian/Ubuntu: apt install \
                 libpython{}; the official Docker python images have one",
                self.path.display(),
                self.full_version,
                self.path.display(),
                self.full_version,
                self.version
            )
        };
        let (Some(libdir), Some(soname), true) = (&self.libdir, &self.soname, self.shared) else {
            return Err(missing());
        };
        let libdir = PathBuf::from(libdir);
        if !libdir.join(soname).exists() {
            return Err(format!("{}: {} is not in {}", missing(), soname, libdir.display()));
        }
        Ok(libdir)
    }
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
