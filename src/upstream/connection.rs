//! Upstream HTTP/1 connections with no task of their own. hyper's pooled client drives each
//! upstream connection from a spawned task and hands every request and answer across a channel
//! between tasks; here the request's own future polls its connection while it waits for the answer,
//! and the answer's body polls it while it streams, so a request costs no hand-off and no wake-up of
//! another task. Between requests a connection waits, unpolled, on a stack shared by the worker,
//! most recently used on top (the warmest socket, and the oldest ones age out at the bottom).

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use tokio::time::Instant;
use tower::ServiceExt;

use crate::body::BoxError;
use crate::tls::UpstreamConnector;

/// PostgREST closes an idle keep-alive connection after 30 s (measured on v14.17 and v16.2; 60 s on
/// v11.2.2). A connection must never be reused after that, or a request sent on it is lost to a
/// reset: idle connections are dropped well before. (One found closed before the request was
/// written is replaced by a fresh one and the request sent there.)
pub(super) const IDLE_TIMEOUT: Duration = Duration::from_secs(20);

type UpstreamIo = hyper_rustls::MaybeHttpsStream<hyper_util::rt::TokioIo<tokio::net::TcpStream>>;

/// One HTTP/1 connection to the upstream: the sender and the connection future that does its I/O,
/// polled by whoever holds it.
struct Lane<B: Body + 'static> {
    sender: http1::SendRequest<B>,
    /// None once the connection future has finished (the socket closed or broke): it is dropped
    /// then, as a spawned connection task would drop it, so that whatever waits on it (an answer, a
    /// body) learns at once that nothing more will come.
    connection: Option<http1::Connection<UpstreamIo, B>>,
    /// False once this exchange asked for the connection's end (`Connection: close`, a HEAD).
    reusable: bool,
    idle_since: Instant,
    pool: Weak<Pool<B>>,
}

impl<B> Lane<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    /// Lets the connection read and write what it can; false once it has ended.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        if let Some(connection) = &mut self.connection {
            if let Poll::Ready(ended) = Pin::new(connection).poll(cx) {
                if let Err(e) = ended {
                    tracing::debug!(error = %e, "upstream connection ended");
                }
                self.connection = None;
            }
        }
        self.connection.is_some()
    }

    /// Can a new request go out on this connection now?
    fn ready(&mut self, cx: &mut Context<'_>) -> bool {
        self.drive(cx) && matches!(self.sender.poll_ready(cx), Poll::Ready(Ok(())))
    }
}

/// Polls what only a driven connection can advance (its answer, its body). While the connection
/// lives it is woken by the socket and the request body through `cx`, so the answer's own wake-up
/// would only poll the task once more for nothing: a no-op waker stands in for it. Once the
/// connection is gone, what it left is ready at once.
fn poll_driven<T>(
    connection_alive: bool,
    cx: &mut Context<'_>,
    poll: impl FnOnce(&mut Context<'_>) -> Poll<T>,
) -> Poll<T> {
    if connection_alive {
        poll(&mut Context::from_waker(std::task::Waker::noop()))
    } else {
        poll(cx)
    }
}

/// What an answer's body needs of the connection it streams from, whatever the request body type:
/// to drive it, and to give it back when the answer is complete.
pub(crate) trait HeldConnection: Send {
    fn drive(&mut self, cx: &mut Context<'_>) -> bool;
    /// The answer was read whole: back to the idle stack if the connection can take another request.
    fn release(self: Box<Self>);
}

impl<B> HeldConnection for Lane<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        Lane::drive(self, cx)
    }

    fn release(mut self: Box<Self>) {
        // Ready means the connection has finished with this exchange and asks for the next
        // request; one still writing a request body PostgREST did not wait for is not.
        if self.connection.is_none() || !self.reusable || !self.sender.is_ready() {
            return;
        }
        if let Some(pool) = self.pool.upgrade() {
            self.idle_since = Instant::now();
            pool.park(self);
        }
    }
}

/// The idle connections of one forwarder (one per worker thread) and how to make new ones.
pub(super) struct Pool<B: Body + 'static> {
    idle: Mutex<Vec<Box<Lane<B>>>>,
    connector: UpstreamConnector,
    /// Scheme and authority of the upstream: what the connector dials.
    origin: Uri,
    reaper: std::sync::Once,
}

/// Why an exchange got no answer.
pub(super) enum ExchangeError {
    /// No connection could be made, or a new one closed before the request was written: nothing
    /// was sent.
    NotSent(BoxError),
    /// The connection failed once the request was handed to it.
    Sent(hyper::Error),
}

impl<B> Pool<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    pub(super) fn new(connector: UpstreamConnector, origin: Uri) -> Arc<Pool<B>> {
        Arc::new(Pool { idle: Mutex::new(Vec::new()), connector, origin, reaper: std::sync::Once::new() })
    }

    /// Sends `request` (origin-form URI, `Host` set) on an idle connection or a new one, driving
    /// the connection until the answer's head is in. A request that a reused connection could not
    /// take (it had closed while idle) goes out again on another: it was never written.
    pub(super) async fn exchange(self: &Arc<Self>, request: Request<B>) -> Result<UpstreamResponse, ExchangeError> {
        let reusable = !asks_to_close(request.headers()) && request.method() != http::Method::HEAD;
        let mut request = request;
        loop {
            let (mut lane, reused) = match poll_fn(|cx| Poll::Ready(self.checkout(cx))).await {
                Some(lane) => (lane, true),
                None => (self.connect().await.map_err(ExchangeError::NotSent)?, false),
            };
            let mut answer = std::pin::pin!(lane.sender.try_send_request(request));
            let answered = poll_fn(|cx| {
                let alive = lane.drive(cx);
                poll_driven(alive, cx, |cx| answer.as_mut().poll(cx))
            })
            .await;
            match answered {
                Ok(response) => {
                    lane.reusable = reusable && !asks_to_close(response.headers());
                    let (parts, body) = response.into_parts();
                    let body = UpstreamBody { body, connection: Some(lane) };
                    return Ok(Response::from_parts(parts, body));
                }
                Err(mut refused) => match refused.take_message() {
                    Some(unsent) if reused => request = unsent,
                    Some(_) => return Err(ExchangeError::NotSent(Box::new(refused.into_error()))),
                    None => return Err(ExchangeError::Sent(refused.into_error())),
                },
            }
        }
    }

    /// A new connection used for one upgrade (a WebSocket): driven by a task of its own, since it
    /// outlives the request and becomes a tunnel.
    pub(super) async fn exchange_upgrade(&self, request: Request<B>) -> Result<Response<Incoming>, ExchangeError> {
        let io = self.dial().await.map_err(ExchangeError::NotSent)?;
        let (mut sender, connection) = http1::handshake(io).await.map_err(|e| ExchangeError::NotSent(Box::new(e)))?;
        tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!(error = %e, "upstream upgrade connection ended");
            }
        });
        sender.send_request(request).await.map_err(ExchangeError::Sent)
    }

    /// The newest idle connection that can take a request now; expired or closed ones are dropped.
    fn checkout(&self, cx: &mut Context<'_>) -> Option<Box<Lane<B>>> {
        loop {
            let mut lane = self.idle.lock().expect("the idle stack is never poisoned").pop()?;
            if lane.idle_since.elapsed() >= IDLE_TIMEOUT {
                // The newest has expired, so have all below it.
                self.idle.lock().expect("the idle stack is never poisoned").clear();
                return None;
            }
            if lane.ready(cx) {
                return Some(lane);
            }
        }
    }

    fn park(self: &Arc<Self>, lane: Box<Lane<B>>) {
        self.idle.lock().expect("the idle stack is never poisoned").push(lane);
        self.reaper.call_once(|| {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(reap(Arc::downgrade(self)));
            }
        });
    }

    async fn dial(&self) -> Result<UpstreamIo, BoxError> {
        self.connector.clone().oneshot(self.origin.clone()).await
    }

    async fn connect(self: &Arc<Self>) -> Result<Box<Lane<B>>, BoxError> {
        let io = self.dial().await?;
        let (sender, connection) = http1::handshake(io).await?;
        tracing::debug!(upstream = %self.origin, "opened an upstream connection");
        Ok(Box::new(Lane {
            sender,
            connection: Some(connection),
            reusable: true,
            idle_since: Instant::now(),
            pool: Arc::downgrade(self),
        }))
    }
}

/// Closes connections idle past [`IDLE_TIMEOUT`] while no request comes to take them, so that a
/// quiet guard holds no sockets PostgREST has given up on. Ends with the pool.
async fn reap<B: Body + 'static>(pool: Weak<Pool<B>>) {
    let mut tick = tokio::time::interval(IDLE_TIMEOUT / 4);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        let mut idle = pool.idle.lock().expect("the idle stack is never poisoned");
        // Oldest at the bottom: they expire first.
        let expired = idle.iter().take_while(|lane| lane.idle_since.elapsed() >= IDLE_TIMEOUT).count();
        idle.drain(..expired);
    }
}

fn asks_to_close(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("close"))
}

pub(super) type UpstreamResponse = Response<UpstreamBody>;

/// An upstream answer's body, which drives the connection it comes from as it is read, and gives
/// the connection back once the answer is complete (dropped early, the connection closes with it:
/// the rest of the answer is unread).
pub struct UpstreamBody {
    body: Incoming,
    connection: Option<Box<dyn HeldConnection>>,
}

impl UpstreamBody {
    fn release(&mut self) {
        if let Some(connection) = self.connection.take() {
            connection.release();
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let alive = this.connection.as_mut().is_some_and(|connection| connection.drive(cx));
        let frame = poll_driven(alive, cx, |cx| Pin::new(&mut this.body).poll_frame(cx));
        match &frame {
            Poll::Ready(None) => this.release(),
            Poll::Ready(Some(Ok(_))) if this.body.is_end_stream() => this.release(),
            Poll::Ready(Some(Err(_))) => this.connection = None,
            _ => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // An answer with nothing left to read (no body, or its last byte read) leaves a connection
        // fit for the next request; anything else would leave the rest of it on the socket.
        if self.body.is_end_stream() {
            self.release();
        }
    }
}
