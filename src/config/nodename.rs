//! The worker's node name and the `%` abbreviations Celery expands in it and in the file names
//! `celery worker` takes (`celery/utils/nodenames.py`): `-n worker1@%h`, `-f %n%I.log`,
//! `--pidfile %n.pid`, as `celery multi` writes them.

use std::path::{Path, PathBuf};

/// An abbreviation Celery does not know: stock refuses to start with the same words.
#[derive(Debug, PartialEq, thiserror::Error)]
#[error("Unknown format %{key} in string {text:?}")]
pub struct UnknownFormat {
    pub key: char,
    pub text: String,
}

/// This machine's host name, as `socket.gethostname()` gives it.
pub fn machine_hostname() -> String {
    nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "localhost".into())
}

/// The node name for `-n` (`host_format(default_nodename(given))`): `celery@<host>` when not
/// given, `celery@<given>` when it has no `@`; then `%h`, `%n`, `%d` of this machine.
pub fn nodename(given: Option<&str>, machine: &str) -> Result<String, UnknownFormat> {
    let (name, host) = nodesplit(given.unwrap_or(""));
    let name = name.filter(|n| !n.is_empty()).unwrap_or("celery");
    let host = if host.is_empty() { machine } else { host };
    host_format(&format!("{name}@{host}"), machine, None, None)
}

/// A file name of the main process (`node_format(text, nodename)`): `%h` the node's host, `%n`
/// its name, `%d` the host's domain, `%p` the whole node name, `%i` `0` and `%I` empty (the
/// pool process index, which pool children fill in for themselves).
pub fn node_format(text: &str, nodename: &str) -> Result<String, UnknownFormat> {
    let (name, host) = nodesplit(nodename);
    host_format(text, host, Some(name.unwrap_or("celery")), Some(nodename))
}

/// `-f`/`--pidfile` of the worker's main process, for the node named by `-n` (`given`). A
/// name that is not UTF-8 has nothing Celery could expand and is kept as it is.
pub fn main_process_path(path: &Path, given: Option<&str>) -> Result<PathBuf, UnknownFormat> {
    let Some(text) = path.to_str() else { return Ok(path.to_path_buf()) };
    if !text.contains('%') {
        return Ok(path.to_path_buf());
    }
    let node = nodename(given, &machine_hostname())?;
    node_format(text, &node).map(PathBuf::from)
}

fn nodesplit(nodename: &str) -> (Option<&str>, &str) {
    match nodename.split_once('@') {
        Some((name, host)) => (Some(name), host),
        None => (None, nodename),
    }
}

fn host_format(text: &str, host: &str, name: Option<&str>, node: Option<&str>) -> Result<String, UnknownFormat> {
    let (short, domain) = host.split_once('.').unwrap_or((host, ""));
    let name = name.unwrap_or(short);
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        // Celery's pattern is `%(\w)`: a `%` before anything else stays as it is.
        let key = match chars.peek() {
            Some(&k) if c == '%' && (k.is_alphanumeric() || k == '_') => k,
            _ => {
                out.push(c);
                continue;
            }
        };
        chars.next();
        match key {
            'h' => out.push_str(host),
            'n' => out.push_str(name),
            'd' => out.push_str(domain),
            'i' => out.push('0'),
            'I' => {}
            'p' => match node {
                Some(node) => out.push_str(node),
                None => return Err(UnknownFormat { key, text: text.to_string() }),
            },
            _ => return Err(UnknownFormat { key, text: text.to_string() }),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_as_celery_makes_them() {
        assert_eq!(nodename(None, "box.example.com").unwrap(), "celery@box.example.com");
        assert_eq!(nodename(Some("w1@%h"), "box.example.com").unwrap(), "w1@box.example.com");
        assert_eq!(nodename(Some("w1@%n.%d"), "box.example.com").unwrap(), "w1@box.example.com");
        assert_eq!(nodename(Some("solo"), "box").unwrap(), "celery@solo");
        assert_eq!(nodename(Some("@%h"), "box").unwrap(), "celery@box");
    }

    #[test]
    fn file_names_of_the_main_process() {
        let node = "w1@box.example.com";
        assert_eq!(node_format("/var/log/celery/%n%I.log", node).unwrap(), "/var/log/celery/w1.log");
        assert_eq!(node_format("/var/log/%n-%i.log", node).unwrap(), "/var/log/w1-0.log");
        assert_eq!(node_format("%p.pid", node).unwrap(), "w1@box.example.com.pid");
        assert_eq!(node_format("/run/%h/%d.pid", node).unwrap(), "/run/box.example.com/example.com.pid");
        assert_eq!(node_format("/plain/100%.log", node).unwrap(), "/plain/100%.log");
        assert_eq!(node_format("/a/%-b", node).unwrap(), "/a/%-b");
        assert_eq!(node_format("%x.log", node), Err(UnknownFormat { key: 'x', text: "%x.log".into() }));
    }
}
