//! The supervisor's end of a pool child's socket pair: a reader registered with the reactor for
//! reading only, and a writer that writes straight to the socket.
//!
//! Why not tokio's `UnixStream`: it registers every socket for reading *and* writing, and a
//! unix socket signals "write space" each time the peer reads from it. So each TASK frame a
//! child read woke the supervisor's reactor for nothing: one wasted wake-up per task, often
//! while the supervisor was asleep. A child's receive buffer holds many frames, so a write
//! almost never waits; when it must, the writer registers for write readiness just for that.
//! The reader also counts a short read as the socket emptied, so a report costs one read.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, Interest, ReadBuf};

/// Split a connected socket into its reader and writer. Made non-blocking here: the writer
/// writes to it directly, and a blocking write would stall every task of the runtime.
pub fn split(stream: UnixStream) -> io::Result<(ChildReader, ChildWriter)> {
    stream.set_nonblocking(true)?;
    let writer = ChildWriter { stream: stream.try_clone()? };
    let reader = ChildReader { fd: register(stream, Interest::READABLE)? };
    Ok((reader, writer))
}

fn register(stream: UnixStream, interest: Interest) -> io::Result<AsyncFd<UnixStream>> {
    // SAFETY: a UnixStream owns its descriptor and always returns that same one; it stays
    // open until the AsyncFd, which owns the stream, is dropped.
    unsafe { AsyncFd::register_with_interest(stream, interest) }.map_err(io::Error::from)
}

/// Reads what the child sends (READY, DONE, SUCCEEDED frames).
pub struct ChildReader {
    fd: AsyncFd<UnixStream>,
}

impl AsyncRead for ChildReader {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let wanted = buf.remaining();
            match guard.try_io(|fd| fd.get_ref().read(buf.initialize_unfilled())) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    if n > 0 && n < wanted {
                        // A short read emptied the socket: wait for the next edge now rather
                        // than learn it from one more read failing with EAGAIN (one system
                        // call per report). Tokio keeps the readiness if an edge came since.
                        guard.clear_ready();
                    }
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue, // readiness cleared; wait for the next edge
            }
        }
    }
}

/// Writes frames to the child. Dropping it shuts the socket down for writing, which the child
/// reads as the end of its work (a pool shrink, a warm stop), as tokio's write half does.
pub struct ChildWriter {
    stream: UnixStream,
}

impl ChildWriter {
    pub async fn write_all(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            match (&self.stream).write(bytes) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.writable().await?,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Wait until the child has read enough for a write to go through. A registration of a
    /// copy of the descriptor, for this wait only: epoll reports a socket that is writable
    /// already at once, so a wake-up between the failed write and here is not missed.
    async fn writable(&self) -> io::Result<()> {
        let fd = register(self.stream.try_clone()?, Interest::WRITABLE)?;
        let _guard = fd.writable().await?;
        Ok(())
    }
}

impl Drop for ChildWriter {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Write);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn a_write_larger_than_the_socket_buffer_waits_for_the_reader() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let (_reader, mut writer) = split(ours).unwrap();
        let sent: Vec<u8> = (0..8 << 20).map(|i| (i % 251) as u8).collect();
        // The peer starts reading late, on a thread of its own: the writer fills the socket's
        // buffer (a few hundred KiB) long before, and must wait for it.
        let peer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            let mut got = Vec::new();
            let mut chunk = [0u8; 4096];
            let mut theirs = theirs;
            loop {
                match theirs.read(&mut chunk).unwrap() {
                    0 => return got,
                    n => got.extend_from_slice(&chunk[..n]),
                }
            }
        });
        writer.write_all(&sent).await.unwrap();
        drop(writer); // the peer sees the end of stream
        assert_eq!(peer.join().unwrap(), sent);
    }

    #[tokio::test]
    async fn the_reader_sees_what_the_child_wrote_then_its_end() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let (mut reader, _writer) = split(ours).unwrap();
        theirs.write_all(b"frame").unwrap();
        drop(theirs);
        let mut got = Vec::new();
        reader.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"frame");
    }
}
