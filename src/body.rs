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

pin_project_lite::pin_project! {
    /// A client's request body, cut off with [`BodyTooLarge`] past `PGRST_GUARD_MAX_BODY_BYTES`.
    pub struct RequestBody {
        #[pin]
        inner: hyper::body::Incoming,
        limit: Option<u64>,
        seen: u64,
    }
}

/// The error a [`RequestBody`] ends with when it grows past its limit.
#[derive(Debug)]
pub struct BodyTooLarge {
    pub limit: u64,
}

impl std::fmt::Display for BodyTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "request body over the limit of {} bytes", self.limit)
    }
}

impl std::error::Error for BodyTooLarge {}

impl RequestBody {
    pub fn new(inner: hyper::body::Incoming, limit: Option<u64>) -> RequestBody {
        RequestBody { inner, limit, seen: 0 }
    }
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let frame = match std::task::ready!(this.inner.poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => return std::task::Poll::Ready(Some(Err(e.into()))),
            None => return std::task::Poll::Ready(None),
        };
        if let (Some(limit), Some(data)) = (*this.limit, frame.data_ref()) {
            *this.seen += data.len() as u64;
            if *this.seen > limit {
                return std::task::Poll::Ready(Some(Err(Box::new(BodyTooLarge { limit }))));
            }
        }
        std::task::Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
