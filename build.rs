//! Link the chosen interpreter's libpython with an rpath, so the binary finds it at run time,
//! and record which Python it was built for (the zygote refuses to mix two Pythons).

fn main() {
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
