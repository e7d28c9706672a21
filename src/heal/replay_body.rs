//! A request body that streams to PostgREST while keeping a copy of what passed, up to a cap per
//! body and a cap for all bodies together, so the request can be sent again after a reload. A body
//! over either cap keeps no copy at all: it streams through, and its error, if any, passes through.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

/// The bytes every kept copy holds together, against `PGRST_GUARD_REPLAY_MEMORY_LIMIT`.
#[derive(Debug)]
pub struct ReplayMemory {
    held: AtomicUsize,
    limit: usize,
}

impl ReplayMemory {
    pub fn new(limit: usize) -> Arc<ReplayMemory> {
        Arc::new(ReplayMemory { held: AtomicUsize::new(0), limit })
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    fn reserve(&self, bytes: usize) -> bool {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(bytes).filter(|total| *total <= self.limit)
            })
            .is_ok()
    }

    fn release(&self, bytes: usize) {
        self.held.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// What the recording side saw; shared with the heal service, which asks for it after the answer.
#[derive(Debug)]
pub struct Tape {
    chunks: Vec<Bytes>,
    len: usize,
    overflowed: bool,
    complete: bool,
    memory: Arc<ReplayMemory>,
}

impl Tape {
    /// Gives up the copy: over a cap, the body streams on without one.
    fn overflow(&mut self) {
        self.overflowed = true;
        self.chunks = Vec::new();
        self.memory.release(std::mem::take(&mut self.len));
    }
}

impl Drop for Tape {
    fn drop(&mut self) {
        self.memory.release(self.len);
    }
}

/// The heal service's handle on a recording.
#[derive(Clone, Debug)]
pub struct Recording {
    /// None for a body that was empty from the start (most reads): nothing to record or share.
    tape: Option<Arc<Mutex<Tape>>>,
}

impl Recording {
    /// The whole body, if it was read to its end and fit under the cap.
    pub fn replayable(&self) -> Option<Bytes> {
        let Some(tape) = &self.tape else { return Some(Bytes::new()) };
        let mut tape = tape.lock().expect("tape lock");
        if tape.overflowed || !tape.complete {
            return None;
        }
        Some(match tape.chunks.as_slice() {
            [] => Bytes::new(),
            [one] => one.clone(),
            many => {
                let mut joined = BytesMut::with_capacity(tape.len);
                for chunk in many {
                    joined.extend_from_slice(chunk);
                }
                // The joined copy replaces the chunks (which pin the connection's read buffers), so
                // what is counted is what is held.
                let joined = joined.freeze();
                tape.chunks = vec![joined.clone()];
                joined
            }
        })
    }
}

pin_project! {
    /// The body forwarded upstream: the client's body being recorded, or a replay of a recording.
    #[project = ReplayBodyProj]
    pub enum ReplayBody<B> {
        Recording { #[pin] inner: B, tape: Arc<Mutex<Tape>>, limit: usize },
        Passing { #[pin] inner: B },
        Replay { data: Option<Bytes> },
    }
}

impl<B: Body<Data = Bytes>> ReplayBody<B> {
    /// Wraps `inner`; `limit` is the most bytes kept for its replay, `memory` what all copies
    /// together may hold.
    pub fn record(inner: B, limit: usize, memory: &Arc<ReplayMemory>) -> (ReplayBody<B>, Recording) {
        if inner.is_end_stream() {
            return (ReplayBody::Passing { inner }, Recording { tape: None });
        }
        let declared_too_big = inner.size_hint().lower() > limit as u64;
        let tape = Arc::new(Mutex::new(Tape {
            chunks: Vec::new(),
            len: 0,
            overflowed: declared_too_big,
            complete: inner.is_end_stream(),
            memory: memory.clone(),
        }));
        (ReplayBody::Recording { inner, tape: tape.clone(), limit }, Recording { tape: Some(tape) })
    }

    pub fn replay(data: Bytes) -> ReplayBody<B> {
        ReplayBody::Replay { data: Some(data).filter(|d| !d.is_empty()) }
    }
}

impl<B: Body<Data = Bytes>> Body for ReplayBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project() {
            ReplayBodyProj::Recording { mut inner, tape, limit } => {
                let polled = inner.as_mut().poll_frame(cx);
                // A client that knows the length may stop polling after the last byte, so the end is
                // taken from the body's own account as well as from a final `None`.
                let ended = inner.is_end_stream();
                match &polled {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Some(data) = frame.data_ref() {
                            let mut tape = tape.lock().expect("tape lock");
                            if !tape.overflowed {
                                if tape.len + data.len() > *limit || !tape.memory.reserve(data.len()) {
                                    tape.overflow();
                                } else {
                                    tape.len += data.len();
                                    tape.chunks.push(data.clone());
                                }
                            }
                            tape.complete |= ended;
                        }
                    }
                    Poll::Ready(None) => tape.lock().expect("tape lock").complete = true,
                    _ => {}
                }
                polled
            }
            ReplayBodyProj::Passing { inner } => inner.poll_frame(cx),
            ReplayBodyProj::Replay { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReplayBody::Recording { inner, .. } | ReplayBody::Passing { inner } => inner.is_end_stream(),
            ReplayBody::Replay { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReplayBody::Recording { inner, .. } | ReplayBody::Passing { inner } => inner.size_hint(),
            ReplayBody::Replay { data } => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full, StreamBody};

    fn chunked(parts: &[&'static str]) -> impl Body<Data = Bytes, Error = std::convert::Infallible> {
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> =
            parts.iter().map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes())))).collect();
        StreamBody::new(futures_util::stream::iter(frames))
    }

    fn memory() -> Arc<ReplayMemory> {
        ReplayMemory::new(1 << 20)
    }

    #[tokio::test]
    async fn keeps_a_copy_of_a_small_body() {
        let (body, recording) = ReplayBody::record(chunked(&["{\"a\":", "1}"]), 64, &memory());
        assert_eq!(recording.replayable(), None, "not read yet");
        let forwarded = body.collect().await.unwrap().to_bytes();
        assert_eq!(forwarded, "{\"a\":1}");
        assert_eq!(recording.replayable().unwrap(), "{\"a\":1}");
    }

    #[tokio::test]
    async fn a_body_over_the_cap_streams_whole_but_keeps_nothing() {
        let (body, recording) = ReplayBody::record(chunked(&["0123456789", "0123456789"]), 15, &memory());
        assert_eq!(body.collect().await.unwrap().to_bytes().len(), 20);
        assert_eq!(recording.replayable(), None);
    }

    #[tokio::test]
    async fn an_empty_body_is_replayable_without_being_polled() {
        let (_body, recording) = ReplayBody::record(Full::new(Bytes::new()), 15, &memory());
        assert_eq!(recording.replayable().unwrap(), "");
    }

    #[tokio::test]
    async fn a_declared_length_over_the_cap_is_not_recorded() {
        let (body, recording) = ReplayBody::record(Full::new(Bytes::from_static(b"0123456789")), 5, &memory());
        body.collect().await.unwrap();
        assert_eq!(recording.replayable(), None);
    }

    #[tokio::test]
    async fn all_copies_together_stay_under_the_memory_cap_and_give_it_back() {
        let memory = ReplayMemory::new(25);
        let (first, kept) = ReplayBody::record(chunked(&["0123456789", "0123456789"]), 64, &memory);
        first.collect().await.unwrap();
        assert_eq!(memory.held(), 20);
        let (second, over) = ReplayBody::record(chunked(&["0123456789"]), 64, &memory);
        assert_eq!(second.collect().await.unwrap().to_bytes().len(), 10, "streams whole without a copy");
        assert_eq!(over.replayable(), None);
        assert_eq!(memory.held(), 20);
        assert_eq!(kept.replayable().unwrap().len(), 20);
        drop(kept);
        assert_eq!(memory.held(), 0, "a finished request gives its bytes back");
    }
}
