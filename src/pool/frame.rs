//! Frames between the supervisor and the Python processes (zygote and pool children).
//!
//! `u32 length (big endian) | u8 kind | payload`; the length counts the kind byte and the
//! payload. The kinds mirror `python/celeriac/frames.py`; keep both in step.

use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest frame we accept from a child; a bigger length means a corrupt stream.
pub const MAX_FRAME: usize = 256 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Fork = 1,
    Bootstrap = 2,
    Forked = 3,
    Exited = 4,
    Fatal = 5,
    SaveState = 6,
    WorkerSignal = 7,
    SignalSent = 8,
    Record = 9,
    TaskReceived = 12,
    Task = 10,
    MarkFailure = 11,
    Ready = 20,
    Done = 21,
    Succeeded = 22,
    BeatLead = 30,
    BeatFollow = 31,
    BeatState = 32,
}

impl Kind {
    pub fn from_byte(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Fork,
            2 => Kind::Bootstrap,
            3 => Kind::Forked,
            4 => Kind::Exited,
            5 => Kind::Fatal,
            6 => Kind::SaveState,
            7 => Kind::WorkerSignal,
            8 => Kind::SignalSent,
            9 => Kind::Record,
            12 => Kind::TaskReceived,
            10 => Kind::Task,
            11 => Kind::MarkFailure,
            20 => Kind::Ready,
            21 => Kind::Done,
            22 => Kind::Succeeded,
            30 => Kind::BeatLead,
            31 => Kind::BeatFollow,
            32 => Kind::BeatState,
            _ => return None,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes is larger than the limit")]
    TooLarge(usize),
    #[error("empty frame")]
    Empty,
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Encode one frame.
pub fn encode(kind: Kind, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + payload.len());
    out.extend_from_slice(&((payload.len() + 1) as u32).to_be_bytes());
    out.push(kind as u8);
    out.extend_from_slice(payload);
    out
}

/// Encode a TASK frame: `u32 meta length | meta | body`, without copying the body twice.
pub fn encode_task(meta: &[u8], body: &[u8]) -> Vec<u8> {
    let len = 1 + 4 + meta.len() + body.len();
    let mut out = Vec::with_capacity(4 + len);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    out.push(Kind::Task as u8);
    out.extend_from_slice(&(meta.len() as u32).to_be_bytes());
    out.extend_from_slice(meta);
    out.extend_from_slice(body);
    out
}

/// Read one frame; `Ok(None)` on a clean end of stream.
pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<(Kind, Vec<u8>)>, FrameError> {
    let mut head = [0u8; 4];
    match r.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(head) as usize;
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let kind_byte = r.read_u8().await?;
    let kind = Kind::from_byte(kind_byte).ok_or(FrameError::UnknownKind(kind_byte))?;
    let mut payload = vec![0u8; len - 1];
    r.read_exact(&mut payload).await?;
    Ok(Some((kind, payload)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trip() {
        let mut bytes = encode(Kind::Done, b"{\"outcome\":\"success\"}");
        bytes.extend(encode_task(b"{}", b"body"));
        let mut r = &bytes[..];
        let (k, p) = read(&mut r).await.unwrap().unwrap();
        assert_eq!(k, Kind::Done);
        assert_eq!(p, b"{\"outcome\":\"success\"}");
        let (k, p) = read(&mut r).await.unwrap().unwrap();
        assert_eq!(k, Kind::Task);
        assert_eq!(&p[..4], &2u32.to_be_bytes());
        assert_eq!(&p[4..6], b"{}");
        assert_eq!(&p[6..], b"body");
        assert!(read(&mut r).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn rejects_garbage() {
        let mut r: &[u8] = &[0, 0, 0, 0];
        assert!(matches!(read(&mut r).await, Err(FrameError::Empty)));
        let mut r: &[u8] = &[0xff, 0xff, 0xff, 0xff];
        assert!(matches!(read(&mut r).await, Err(FrameError::TooLarge(_))));
        let bytes = encode(Kind::Done, b"");
        let mut bad = bytes.clone();
        bad[4] = 99;
        let mut r = &bad[..];
        assert!(matches!(read(&mut r).await, Err(FrameError::UnknownKind(99))));
    }
}
