//! Link the chosen interpreter's libpython with an rpath, so the binary finds it at run time,
//! and record which Python it was built for (the zygote refuses to mix two Pythons). Also lay
//! out the supervisor's steady-state code side by side (`link/hot-symbols.txt`).

use std::path::Path;
use std::process::Command;

/// The functions steady work runs, first in the supervisor's code segment, so the few pages
/// they fill are all that stays resident (docs/architecture.md, "Resident code"). Only where
/// the linker is rustc's own lld (x86_64 Linux, Rust 1.90 and later), which reads a symbol
/// ordering file; `CELERIAC_NO_SYMBOL_ORDERING=1` turns it off for a linker that does not.
fn order_hot_symbols() {
    println!("cargo:rerun-if-changed=link/hot-symbols.txt");
    println!("cargo:rerun-if-env-changed=CELERIAC_NO_SYMBOL_ORDERING");
    let list = Path::new(env!("CARGO_MANIFEST_DIR")).join("link/hot-symbols.txt");
    let off = std::env::var_os("CELERIAC_NO_SYMBOL_ORDERING").is_some_and(|v| v != "0" && !v.is_empty());
    if off || !list.exists() || std::env::var("TARGET").as_deref() != Ok("x86_64-unknown-linux-gnu") {
        return;
    }
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    let minor = Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|v| v.split_whitespace().nth(1)?.split('.').nth(1)?.parse::<u32>().ok());
    if minor.is_none_or(|m| m < 90) {
        return;
    }
    let flags = std::env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    if flags.contains("linker") || flags.contains("fuse-ld") {
        return; // a linker of the user's choosing: leave its arguments alone
    }
    // Names it no longer finds (after a toolchain or dependency update) are skipped quietly.
    println!("cargo:rustc-link-arg-bin=celeriac=-Wl,--symbol-ordering-file={}", list.display());
    println!("cargo:rustc-link-arg-bin=celeriac=-Wl,--no-warn-symbol-ordering");
}

fn main() {
    order_hot_symbols();
    let config = pyo3_build_config::get();
    if let Some(lib_dir) = &config.lib_dir {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
    }
    let version = format!("{}.{}", config.version.major, config.version.minor);
    println!("cargo:rustc-env=CELERIAC_PYTHON_VERSION={version}");
    let python = config.executable.clone().unwrap_or_else(|| "python3".to_owned());
    println!("cargo:rustc-env=CELERIAC_BUILD_PYTHON={python}");
    println!("cargo:rerun-if-env-changed=PYO3_PYTHON");
    println!("cargo:rerun-if-changed=python/celeriac");
}
