//! The byte stream a pool child (or the zygote) writes to the supervisor: frames split off one
//! by one and each report decoded. A child that writes garbage must cost an error, never a
//! panic or an allocation the length field dictates beyond the limit.
#![no_main]

use celeriac_protocol::frame::{encode, split, DoneReport, Kind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some((kind, payload, after))) = split(rest) {
        match kind {
            Kind::Done => {
                let _ = serde_json::from_slice::<DoneReport>(payload);
            }
            Kind::Succeeded => {
                if let Some(report) = DoneReport::succeeded(payload) {
                    assert_eq!(report.outcome, "success");
                }
            }
            _ => {}
        }
        // Encoding what was read gives back the same frame.
        let again = encode(kind, payload);
        let consumed = rest.len() - after.len();
        assert_eq!(&again[..], &rest[..consumed]);
        rest = after;
    }
});
