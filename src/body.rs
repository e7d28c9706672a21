//! The body type of every answer the guard sends: upstream bodies stream through unchanged, the
//! guard's own answers are small buffers.

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type GuardBody = BoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> GuardBody {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed()
}

pub fn empty() -> GuardBody {
    Empty::new().map_err(|never| match never {}).boxed()
}
