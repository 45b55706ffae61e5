//! A message as Redis, SQS or the folder transport store it (kombu's JSON envelope), all the way
//! to the request a pool child receives: never a panic, whatever the bytes.
#![no_main]

use celeriac_protocol::envelope::{decode_envelope, mark_redelivered};
use celeriac_protocol::{ChildMeta, TaskMessage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else { return };
    let Ok(delivery) = decode_envelope(raw, "celery") else { return };
    // What a restore writes back must decode again.
    let restored = mark_redelivered(raw);
    assert!(decode_envelope(&restored, "celery").is_ok(), "a restored envelope no longer decodes");
    if let Ok(msg) = TaskMessage::parse(&delivery) {
        let meta = ChildMeta::encode(&delivery, &msg, "celery@fuzz");
        let meta: serde_json::Value = serde_json::from_slice(&meta).expect("the child's meta is JSON");
        assert_eq!(meta["id"].as_str(), Some(msg.id.as_str()));
    }
});
