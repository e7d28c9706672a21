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
