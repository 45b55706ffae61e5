//! The Celery task message: protocol v2 (headers) and v1 (everything in the body).
//!
//! The supervisor reads only what it needs to schedule and settle a message (task name, id,
//! ETA, expiry); the body travels untouched to a pool child, which decodes it with kombu.

mod message;
mod time;

pub use message::{ChildMeta, MessageError, TaskMessage};
