//! What crosses celeriac's process boundaries, decoded and encoded by pure functions (no I/O,
//! no Python), so they can be unit-tested and fuzzed on their own (`fuzz/`):
//!
//! - `delivery`: one message as a transport hands it over;
//! - `envelope`: kombu's JSON envelope of the virtual transports (Redis, SQS, the folder);
//! - `message`: the Celery task message, protocol v2 (headers) and v1 (body), and the request
//!   description a pool child receives;
//! - `frame`: the frames between the supervisor and the Python processes, and a child's report;
//! - `marshal`: Python's marshal format, how a request meta reaches a child.

pub mod delivery;
pub mod envelope;
pub mod frame;
pub mod marshal;
pub mod message;
pub mod time;

pub use delivery::Delivery;
pub use message::{ChildMeta, MessageError, TaskMessage};
