//! A message as Redis, SQS or the folder transport store it (kombu's JSON envelope), all the way
//! to the request a pool child receives: never a panic, whatever the bytes.
#![no_main]

mod task_frame;

use celeriac_protocol::envelope::{decode_envelope, mark_redelivered};
use celeriac_protocol::TaskMessage;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else { return };
    let Ok(delivery) = decode_envelope(raw, "celery") else { return };
    // What a restore writes back must decode again.
    let restored = mark_redelivered(raw);
    assert!(decode_envelope(&restored, "celery").is_ok(), "a restored envelope no longer decodes");
    if let Ok(msg) = TaskMessage::parse(&delivery) {
        task_frame::check(&delivery, &msg);
    }
});
