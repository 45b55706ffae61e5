//! Frames between the supervisor and the Python processes (zygote and pool children).
//!
//! `u32 length (big endian) | u8 kind | payload`; the length counts the kind byte and the
//! payload. The kinds mirror `python/celeriac/frames.py`; keep both in step.

use serde::Deserialize;

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
    Options = 13,
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
            13 => Kind::Options,
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

/// The payload length a frame's first four bytes announce (the length counts the kind byte).
pub fn payload_len(head: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(head) as usize;
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len - 1)
}

/// A frame split off a buffer: its kind, its payload, and the bytes after it.
pub type Split<'a> = (Kind, &'a [u8], &'a [u8]);

/// Split the first whole frame off `buf`; `Ok(None)` when `buf` does not hold a whole frame yet.
pub fn split(buf: &[u8]) -> Result<Option<Split<'_>>, FrameError> {
    let Some((head, rest)) = buf.split_first_chunk::<4>() else {
        return Ok(None);
    };
    let len = payload_len(*head)?;
    let Some((&kind, rest)) = rest.split_first() else {
        return Ok(None);
    };
    let kind = Kind::from_byte(kind).ok_or(FrameError::UnknownKind(kind))?;
    if rest.len() < len {
        return Ok(None);
    }
    let (payload, rest) = rest.split_at(len);
    Ok(Some((kind, payload, rest)))
}

/// Encode one frame.
pub fn encode(kind: Kind, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + payload.len());
    out.extend_from_slice(&((payload.len() + 1) as u32).to_be_bytes());
    out.push(kind as u8);
    out.extend_from_slice(payload);
    out
}

/// Encode a TASK frame whose meta is JSON: `u32 meta length | meta | body`.
pub fn encode_task(meta: &[u8], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + meta.len() + body.len());
    out.extend_from_slice(&[0; 5]);
    out.extend_from_slice(&(meta.len() as u32).to_be_bytes());
    out.extend_from_slice(meta);
    out.extend_from_slice(body);
    write_header(&mut out, Kind::Task);
    out
}

/// Fill in the length and kind of a frame written after 5 placeholder bytes.
pub fn write_header(frame: &mut [u8], kind: Kind) {
    let len = (frame.len() - 4) as u32;
    frame[..4].copy_from_slice(&len.to_be_bytes());
    frame[4] = kind as u8;
}

/// What a child reports when a job is done (`python/celeriac/child.py`).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct DoneReport {
    /// success, failure, retry, ignored, rejected, decode_error, invalid, recorded.
    pub outcome: String,
    /// For `rejected`: `Reject(requeue=...)`.
    #[serde(default)]
    pub requeue: bool,
    /// `saferepr` of the return value (success), for `task-succeeded`.
    #[serde(default)]
    pub result: Option<String>,
    #[serde(default)]
    pub runtime: Option<f64>,
    /// `saferepr` of the exception and the traceback (failure, retry), for events.
    #[serde(default)]
    pub exception: Option<String>,
    #[serde(default)]
    pub traceback: Option<String>,
    /// The child leaves after this job (`--max-tasks-per-child`, `--max-memory-per-child`).
    #[serde(default)]
    pub exiting: bool,
}

impl DoneReport {
    /// A `Succeeded` frame: `f64 runtime | u8 exiting | utf-8 result repr`, the common outcome
    /// without JSON on either side.
    pub fn succeeded(payload: &[u8]) -> Option<DoneReport> {
        let runtime = f64::from_be_bytes(payload.get(..8)?.try_into().ok()?);
        let exiting = *payload.get(8)? != 0;
        let result = String::from_utf8_lossy(payload.get(9..)?).into_owned();
        Some(DoneReport {
            outcome: "success".into(),
            runtime: Some(runtime),
            result: Some(result),
            exiting,
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn succeeded_frame_decodes() {
        // As python/celeriac/frames.py's pack_succeeded writes it (after the frame header).
        let mut payload = 0.25f64.to_be_bytes().to_vec();
        payload.push(1);
        payload.extend_from_slice("'é'".as_bytes());
        let report = DoneReport::succeeded(&payload).unwrap();
        assert_eq!(report.outcome, "success");
        assert_eq!(report.runtime, Some(0.25));
        assert!(report.exiting);
        assert_eq!(report.result.as_deref(), Some("'é'"));
        assert!(DoneReport::succeeded(&payload[..8]).is_none());
    }

    #[test]
    fn split_takes_whole_frames_only() {
        let mut bytes = encode(Kind::Done, b"{}");
        bytes.extend(encode_task(b"{}", b"body"));
        let (kind, payload, rest) = split(&bytes).unwrap().unwrap();
        assert_eq!((kind, payload), (Kind::Done, &b"{}"[..]));
        let (kind, payload, rest) = split(rest).unwrap().unwrap();
        assert_eq!(kind, Kind::Task);
        assert_eq!(&payload[4..], b"{}body");
        assert!(split(rest).unwrap().is_none());
        assert!(split(&bytes[..6]).unwrap().is_none());
        assert!(matches!(split(&[0, 0, 0, 0, 1]), Err(FrameError::Empty)));
        assert!(matches!(split(&[0, 0, 0, 1, 99]), Err(FrameError::UnknownKind(99))));
    }
}
