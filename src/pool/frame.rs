//! Reading frames from the zygote and the pool children off their sockets; the frame format
//! and the reports a child sends are in `celeriac_protocol::frame`.

use tokio::io::{AsyncRead, AsyncReadExt};

pub use celeriac_protocol::frame::{encode, encode_task, payload_len, FrameError, Kind};

/// Read one frame; `Ok(None)` on a clean end of stream.
pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<(Kind, Vec<u8>)>, FrameError> {
    let mut head = [0u8; 4];
    match r.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = payload_len(head)?;
    let kind_byte = r.read_u8().await?;
    let kind = Kind::from_byte(kind_byte).ok_or(FrameError::UnknownKind(kind_byte))?;
    let mut payload = vec![0u8; len];
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
