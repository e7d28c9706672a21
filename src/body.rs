//! The body type of every answer the guard sends: upstream bodies stream through unchanged, the
//! guard's own answers are small buffers.

use bytes::Bytes;
use http_body_util::BodyExt;
use tower_http::body::UnsyncBoxBody;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The future of the guard's boxed services (the heal service, the forwarder).
pub type GuardFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<http::Response<GuardBody>, std::convert::Infallible>> + Send>,
>;

/// The body of every answer: an upstream body as it streams in (the common case, with no box), a
/// buffer the guard made or read, or any other body, boxed.
pub enum GuardBody {
    Upstream(hyper::body::Incoming),
    Buffered(Option<Bytes>),
    Boxed(UnsyncBoxBody<Bytes, BoxError>),
}

impl GuardBody {
    pub fn boxed<B>(body: B) -> GuardBody
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        GuardBody::Boxed(UnsyncBoxBody::new(body.map_err(Into::into)))
    }
}

pub fn full(bytes: impl Into<Bytes>) -> GuardBody {
    let bytes = bytes.into();
    GuardBody::Buffered(Some(bytes).filter(|b| !b.is_empty()))
}

impl http_body::Body for GuardBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            GuardBody::Upstream(body) => std::pin::Pin::new(body).poll_frame(cx).map_err(Into::into),
            GuardBody::Buffered(bytes) => std::task::Poll::Ready(bytes.take().map(|b| Ok(http_body::Frame::data(b)))),
            GuardBody::Boxed(body) => std::pin::Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            GuardBody::Upstream(body) => body.is_end_stream(),
            GuardBody::Buffered(bytes) => bytes.is_none(),
            GuardBody::Boxed(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            GuardBody::Upstream(body) => body.size_hint(),
            GuardBody::Buffered(bytes) => http_body::SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            GuardBody::Boxed(body) => body.size_hint(),
        }
    }
}

/// A client's request body, cut off past `PGRST_GUARD_MAX_BODY_BYTES` by http-body-util's
/// [`Limited`](http_body_util::Limited) (what tower-http's body limit uses); the guard's own 413
/// answer, PostgREST-shaped with CORS, is made where the error surfaces (`error::is_over_limit`).
pub type RequestBody = http_body_util::Limited<hyper::body::Incoming>;

/// The client's body with `limit` bytes at most (None: no limit).
pub fn request_body(body: hyper::body::Incoming, limit: Option<u64>) -> RequestBody {
    http_body_util::Limited::new(body, limit.map_or(usize::MAX, |limit| usize::try_from(limit).unwrap_or(usize::MAX)))
}
