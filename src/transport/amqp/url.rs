//! Broker URLs as kombu reads them (`kombu/utils/url.py`): `amqp://`, `pyamqp://`, `amqps://`,
//! `user:password@host:port/vhost`, where an empty path and `/` both mean the vhost `/`.

use lapin::uri::{AMQPAuthority, AMQPQueryString, AMQPScheme, AMQPUri, AMQPUserInfo};

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// RabbitMQ's default frame limit, what stock's py-amqp asks for: the task connection's frames
/// unless `broker_transport_options['frame_max']` says otherwise.
pub const TASK_FRAME_MAX: u32 = 128 * 1024;
/// What lapin's connections (remote control, events, beat's lock) ask for. lapin keeps two ring
/// buffers of 32 frames per connection: 1 MiB at 16 KiB frames, 8 MiB at 128 KiB. Their
/// messages are small; a larger one makes lapin drop the connection, which then reconnects.
pub const SMALL_FRAME_MAX: u32 = 16 * 1024;
/// The smallest frame AMQP 0-9-1 allows.
pub const FRAME_MIN_SIZE: u32 = 4096;

/// Parse one kombu AMQP URL. `heartbeat` (s) and `timeout` (ms) come from the app's settings.
pub fn parse(url: &str, heartbeat: Option<u16>, timeout_ms: Option<u64>) -> Option<AMQPUri> {
    let (scheme, rest) = url.split_once("://")?;
    let scheme = match scheme {
        "amqp" | "pyamqp" | "librabbitmq" => AMQPScheme::AMQP,
        "amqps" | "pyamqps" => AMQPScheme::AMQPS,
        _ => return None,
    };
    let rest = rest.split(['?', '#']).next().unwrap_or("");
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, ""),
    };
    let (userinfo, hostport) = match authority.rfind('@') {
        Some(i) => (Some(&authority[..i]), &authority[i + 1..]),
        None => (None, authority),
    };
    let (username, password) = match userinfo {
        Some(u) => match u.split_once(':') {
            Some((user, pass)) => (percent_decode(user), percent_decode(pass)),
            None => (percent_decode(u), "guest".to_owned()),
        },
        None => ("guest".to_owned(), "guest".to_owned()),
    };
    let default_port = if scheme == AMQPScheme::AMQPS { 5671 } else { 5672 };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() => (h.to_owned(), p.parse().unwrap_or(default_port)),
        _ => (hostport.to_owned(), default_port),
    };
    let host = if host.is_empty() { "localhost".to_owned() } else { host };
    let vhost = if path.is_empty() { "/".to_owned() } else { percent_decode(path) };
    Some(AMQPUri {
        scheme,
        authority: AMQPAuthority { userinfo: AMQPUserInfo { username, password }, host, port },
        vhost,
        query: AMQPQueryString {
            heartbeat,
            connection_timeout: timeout_ms,
            frame_max: None, // per connection: see `AmqpTransport::connect_to`
            ..Default::default()
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kombu_forms() {
        let u = parse("amqp://guest:guest@127.0.0.1:5672//", None, None).unwrap();
        assert_eq!((u.authority.host.as_str(), u.authority.port, u.vhost.as_str()), ("127.0.0.1", 5672, "/"));
        let u = parse("pyamqp://user:p%40ss@rabbit/myvhost", Some(30), Some(4000)).unwrap();
        assert_eq!(u.authority.userinfo.password, "p@ss");
        assert_eq!(u.vhost, "myvhost");
        assert_eq!(u.query.heartbeat, Some(30));
        let u = parse("amqps://h", None, None).unwrap();
        assert_eq!((u.scheme, u.authority.port, u.vhost.as_str()), (AMQPScheme::AMQPS, 5671, "/"));
        let u = parse("amqp://localhost:5672/", None, None).unwrap();
        assert_eq!(u.vhost, "/");
        assert!(parse("redis://x", None, None).is_none());
    }
}
