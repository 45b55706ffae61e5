//! The optional HTTP endpoint (`--http-port`): `/healthz` (the process answers), `/readyz`
//! (broker connected and every pool child up) and `/metrics` (Prometheus text). A plain
//! HTTP/1.1 responder: three GET routes do not need a web framework.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{info, warn};

use super::metrics::Metrics;

const MAX_REQUEST: usize = 8 * 1024;

fn response(status: &str, content_type: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Route one request line to its answer.
fn answer(request_line: &str, metrics: &Metrics) -> Vec<u8> {
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" && method != "HEAD" {
        return response("405 Method Not Allowed", "text/plain", "method not allowed\n");
    }
    match path.split('?').next().unwrap_or("") {
        "/healthz" => response("200 OK", "text/plain", "ok\n"),
        "/readyz" if metrics.ready() => response("200 OK", "text/plain", "ready\n"),
        "/readyz" => response("503 Service Unavailable", "text/plain", "not ready\n"),
        "/metrics" => response("200 OK", "text/plain; version=0.0.4", &metrics.render()),
        _ => response("404 Not Found", "text/plain", "not found\n"),
    }
}

async fn serve_one(mut stream: TcpStream, metrics: Arc<Metrics>) {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    // Read the request head (we ignore headers and bodies); give up on slow or huge requests.
    let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < MAX_REQUEST {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        true
    })
    .await;
    if !matches!(read, Ok(true)) {
        return;
    }
    let head = String::from_utf8_lossy(&buf);
    let line = head.lines().next().unwrap_or("");
    let _ = stream.write_all(&answer(line, &metrics)).await;
    let _ = stream.shutdown().await;
}

/// Bind and serve until the process ends. A bind failure is logged, not fatal.
pub async fn serve(bind: String, port: u16, metrics: Arc<Metrics>) {
    let listener = match TcpListener::bind((bind.as_str(), port)).await {
        Ok(l) => l,
        Err(e) => {
            warn!("HTTP endpoint not started: cannot listen on {bind}:{port}: {e}");
            return;
        }
    };
    info!("HTTP endpoint on http://{bind}:{port}/ (healthz, readyz, metrics)");
    loop {
        if let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve_one(stream, metrics.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn routes() {
        let m = Metrics::default();
        let text = |b: Vec<u8>| String::from_utf8(b).unwrap();
        assert!(text(answer("GET /healthz HTTP/1.1", &m)).starts_with("HTTP/1.1 200"));
        assert!(text(answer("GET /readyz HTTP/1.1", &m)).starts_with("HTTP/1.1 503"));
        m.broker_connected.store(true, Ordering::Relaxed);
        m.children_ready.store(true, Ordering::Relaxed);
        assert!(text(answer("GET /readyz HTTP/1.1", &m)).starts_with("HTTP/1.1 200"));
        assert!(text(answer("GET /metrics HTTP/1.1", &m)).contains("celeriac_ready 1"));
        assert!(text(answer("GET /nope HTTP/1.1", &m)).starts_with("HTTP/1.1 404"));
        assert!(text(answer("POST /healthz HTTP/1.1", &m)).starts_with("HTTP/1.1 405"));
        assert!(text(answer("", &m)).starts_with("HTTP/1.1 405"));
    }
}
