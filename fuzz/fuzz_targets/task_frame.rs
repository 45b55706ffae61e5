//! What both message targets check of the TASK frame a pool child would receive for a message.

use celeriac_protocol::frame::Kind;
use celeriac_protocol::{ChildMeta, Delivery, TaskMessage};

/// The frame is whole (its length, its kind) and carries the task's id: the second item of the
/// marshal tuple, or `id` in the JSON meta.
pub fn check(delivery: &Delivery, msg: &TaskMessage) {
    let frame = ChildMeta::task_frame(delivery, msg, "celery@fuzz");
    let len = u32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
    assert_eq!(len, frame.len() - 4, "the frame's length");
    assert_eq!(frame[4], Kind::Task as u8);
    let payload = &frame[5..];
    let id = match payload.strip_prefix(b"M") {
        Some(tuple) => {
            assert_eq!(&tuple[..5], b"(\x09\x00\x00\x00", "a tuple of nine");
            let (_name, rest) = marshal_str(&tuple[5..]);
            marshal_str(rest).0
        }
        None => {
            let meta_len = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) as usize;
            let meta: serde_json::Value = serde_json::from_slice(&payload[4..4 + meta_len]).expect("a JSON meta");
            meta["id"].as_str().expect("an id").to_owned()
        }
    };
    assert_eq!(id, msg.id);
}

/// A marshal str (`z`: u8 length, `u`: u32 length) and what follows it.
fn marshal_str(b: &[u8]) -> (String, &[u8]) {
    let (len, start) = match b[0] {
        b'z' => (usize::from(b[1]), 2),
        b'u' => (u32::from_le_bytes([b[1], b[2], b[3], b[4]]) as usize, 5),
        other => panic!("not a marshal str: {other}"),
    };
    let text = std::str::from_utf8(&b[start..start + len]).expect("UTF-8").to_owned();
    (text, &b[start + len..])
}
