//! Listeners and connections: HTTP/1.1 and HTTP/2 (h2c) from clients, the client address put on
//! each request, the connection and request limits, and graceful shutdown (stop accepting, let
//! requests and heals finish).
//!
//! The accept loop is ours because hyper-util's server has no connection cap with a PostgREST-shaped
//! refusal, no 408 for a slow request head and no idle close shared with WebSocket tunnels.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{header, Request, Response, Uri};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;
use tower::{Service, ServiceExt};

use crate::body::{GuardBody, RequestBody};
use crate::error::{GuardError, GuardErrorKind};
use crate::forwarded::{is_trusted, ClientAddr, IpNet};
use crate::metrics::Metrics;

/// What one client may hold and send.
#[derive(Clone, Debug)]
pub struct ServerLimits {
    pub header_read_timeout: Duration,
    /// Open connections allowed, shared by every listener of the same guard.
    pub connections: Arc<Semaphore>,
    pub max_header_bytes: usize,
    pub max_body_bytes: Option<u64>,
    /// How long open requests get to finish after the shutdown signal.
    pub drain: Duration,
    /// Peers whose forwarding headers are believed (`PGRST_GUARD_TRUSTED_PROXIES`).
    pub trusted_proxies: Arc<Vec<IpNet>>,
    /// A connection (HTTP/1 keep-alive, HTTP/2, WebSocket tunnel) with nothing going on for this
    /// long is closed.
    pub idle_timeout: Duration,
}

impl ServerLimits {
    /// Generous limits for the admin listener.
    pub fn admin() -> ServerLimits {
        ServerLimits {
            header_read_timeout: Duration::from_secs(10),
            connections: Arc::new(Semaphore::new(64)),
            max_header_bytes: 16 * 1024,
            max_body_bytes: Some(0),
            drain: Duration::from_secs(1),
            trusted_proxies: Arc::new(Vec::new()),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Serves `service` on `listener` until `shutdown` turns true, then waits up to `limits.drain` for
/// open requests to finish.
pub async fn serve<S>(
    listener: TcpListener,
    service: S,
    metrics: Option<Arc<Metrics>>,
    shutdown: watch::Receiver<bool>,
    limits: ServerLimits,
) where
    S: Service<Request<RequestBody>, Response = Response<GuardBody>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes + 8 * 1024)
        .max_headers(1000);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_bytes as u32 + 16 * 1024)
        // A peer that stops answering pings is gone: its connection (and its slot) is freed.
        .keep_alive_interval(Some(HTTP2_PING_INTERVAL))
        .keep_alive_timeout(HTTP2_PING_TIMEOUT);
    let connections = limits.connections.clone();
    // Answers to refused connections, bounded so that a flood of them costs no task each.
    let refusals = Arc::new(Semaphore::new(MAX_CONCURRENT_REFUSALS));
    let mut open = tokio::task::JoinSet::new();
    let mut stop = shutdown.clone();
    loop {
        while open.try_join_next().is_some() {}
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => break,
        };
        let _ = stream.set_nodelay(true);
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            match refusals.clone().try_acquire_owned() {
                Ok(refusing) => {
                    tokio::spawn(async move {
                        refuse_connection(stream).await;
                        drop(refusing);
                    });
                }
                Err(_) => drop(stream),
            }
            continue;
        };
        // The slot is shared with a WebSocket tunnel the connection may turn into, so that the
        // tunnel counts against the connection cap for as long as it lives.
        let slot = ConnectionSlot(Arc::new(permit));
        let activity = Arc::new(Activity::new());
        // Set before the connection is dropped, written as the socket closes: the 408 for a request
        // head that never came (hyper gives up on it without an answer).
        let last_words = Arc::new(std::sync::OnceLock::new());
        let socket = ClientSocket { stream, activity: activity.clone(), last_words: last_words.clone() };
        let per_request =
            request_service(service.clone(), metrics.clone(), peer, limits.clone(), slot.clone(), activity.clone());
        let connection = builder.serve_connection_with_upgrades(TokioIo::new(socket), per_request).into_owned();
        let (mut stop, idle) = (shutdown.clone(), limits.idle_timeout);
        open.spawn(async move {
            tokio::pin!(connection);
            let mut closing = false;
            let ended = loop {
                tokio::select! {
                    ended = connection.as_mut() => break Some(ended),
                    _ = stopped(&mut stop), if !closing => {
                        connection.as_mut().graceful_shutdown();
                        closing = true;
                    }
                    _ = activity.idle_for(idle), if !closing => {
                        connection.as_mut().graceful_shutdown();
                        closing = true;
                    }
                    // A client that stopped reading what it asked for holds no slot forever.
                    _ = activity.write_stalled_for(idle) => {
                        tracing::debug!(idle_ms = idle.as_millis() as u64, "closing a connection whose reader stalled");
                        break None;
                    }
                }
            };
            if let Some(Err(e)) = ended {
                if is_header_timeout(e.as_ref()) {
                    let _ = last_words.set(GuardError::new(GuardErrorKind::HeaderTimeout, "").to_http1_bytes());
                } else {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
            }
            // The connection (and with it the socket, writing any last words) ends with this task.
            drop(slot);
        });
    }
    drop(listener);
    let drained = tokio::time::timeout(limits.drain, async { while open.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(drain_ms = limits.drain.as_millis() as u64, "shutdown deadline passed with requests still open");
    }
}

/// Resolves when the shutdown flag turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// HTTP/2 keep-alive: a ping this often, and the connection closes if one is not answered in time.
const HTTP2_PING_INTERVAL: Duration = Duration::from_secs(30);
const HTTP2_PING_TIMEOUT: Duration = Duration::from_secs(20);
/// Refused connections answered at the same time; more are closed without an answer.
const MAX_CONCURRENT_REFUSALS: usize = 32;

/// A connection's place under `PGRST_GUARD_MAX_CONNECTIONS`, released when the last holder (the
/// connection, or the WebSocket tunnel it became) is gone.
#[derive(Clone)]
pub struct ConnectionSlot(#[allow(dead_code)] Arc<tokio::sync::OwnedSemaphorePermit>);

/// Requests in flight on a connection and when the last one began or ended, and since when writing
/// to the client has been blocked, in atomics: two per request, none per write that goes through.
struct Activity {
    in_flight: AtomicUsize,
    /// Milliseconds from `epoch` to the last beginning or end of a request.
    last_ms: AtomicU64,
    /// 1 + milliseconds from `epoch` to when a write to the client last found its buffer full and
    /// nothing has gone out since; 0 while writes go through.
    write_blocked_ms: AtomicU64,
    epoch: Instant,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            in_flight: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
            write_blocked_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    fn write_blocked(&self) {
        if self.write_blocked_ms.load(Ordering::Acquire) == 0 {
            self.write_blocked_ms.store(1 + self.epoch.elapsed().as_millis() as u64, Ordering::Release);
        }
    }

    fn write_went_through(&self) {
        if self.write_blocked_ms.load(Ordering::Acquire) != 0 {
            self.write_blocked_ms.store(0, Ordering::Release);
        }
    }

    /// Resolves once writing to the client has been blocked, with nothing going out, for `stall`.
    async fn write_stalled_for(&self, stall: Duration) {
        loop {
            let blocked = self.write_blocked_ms.load(Ordering::Acquire);
            let wake = if blocked == 0 {
                Instant::now() + stall
            } else {
                let since = self.epoch + Duration::from_millis(blocked - 1);
                if since.elapsed() >= stall {
                    return;
                }
                since + stall
            };
            tokio::time::sleep_until(wake).await;
        }
    }

    fn touch(&self) {
        self.last_ms.store(self.epoch.elapsed().as_millis() as u64, Ordering::Release);
    }

    fn begin(&self) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.touch();
    }

    fn end(&self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.touch();
    }

    /// Resolves once the connection has had no request for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.epoch + Duration::from_millis(self.last_ms.load(Ordering::Acquire));
            let busy = self.in_flight.load(Ordering::Acquire) > 0;
            if !busy && last.elapsed() >= idle {
                return;
            }
            tokio::time::sleep_until(if busy { Instant::now() + idle } else { last + idle }).await;
        }
    }
}

/// Per request: the client address, the header and body limits, and the response metrics.
fn request_service<S>(
    service: S,
    metrics: Option<Arc<Metrics>>,
    peer: SocketAddr,
    limits: ServerLimits,
    slot: ConnectionSlot,
    activity: Arc<Activity>,
) -> impl hyper::service::Service<Request<Incoming>, Response = Response<GuardBody>, Error = Infallible, Future: Send> + Clone
where
    S: Service<Request<RequestBody>, Response = Response<GuardBody>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    // Made once per connection: every request on it comes from the same address.
    let client = ClientAddr::new(peer.ip(), is_trusted(&limits.trusted_proxies, peer.ip()));
    service_fn(move |mut request: Request<Incoming>| {
        let client = client.clone();
        let service = service.clone();
        let metrics = metrics.clone();
        let limits = limits.clone();
        let (slot, activity) = (slot.clone(), activity.clone());
        async move {
            let started = Instant::now();
            activity.begin();
            let _ended = EndOnDrop(&activity);
            let response = match over_limits(&request, &limits).or_else(|| normalize_path(&mut request).err()) {
                Some(error) => error.into_response(request.headers()),
                None => {
                    let (mut parts, body) = request.into_parts();
                    parts.extensions.insert(client);
                    parts.extensions.insert(slot);
                    let request = Request::from_parts(parts, crate::body::request_body(body, limits.max_body_bytes));
                    service.oneshot(request).await?
                }
            };
            if let Some(metrics) = metrics {
                metrics.response(response.status().as_u16(), started.elapsed());
            }
            Ok::<_, Infallible>(response)
        }
    })
}

/// Marks a request's end on its connection, however its future ends.
struct EndOnDrop<'a>(&'a Activity);

impl Drop for EndOnDrop<'_> {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// Resolves `.` and `..` segments (also percent-encoded) the way the origin behind a gateway
/// would, so that routing by prefix sees the path that is really meant: `/rest/v1/../auth/v1/user`
/// is `/auth/v1/user`. A path that climbs above the root is refused. CONNECT is refused too: no
/// PostgREST serves it, and a proxy must not tunnel it.
fn normalize_path<B>(request: &mut Request<B>) -> Result<(), GuardError> {
    if request.method() == http::Method::CONNECT {
        return Err(GuardError::new(GuardErrorKind::MethodNotAllowed, "Unsupported HTTP method: CONNECT"));
    }
    let path = request.uri().path();
    let is_dot = |segment: &str| segment == "." || segment.eq_ignore_ascii_case("%2e");
    let is_dot_dot = |segment: &str| {
        let decoded = segment.to_ascii_lowercase().replace("%2e", ".");
        decoded == ".."
    };
    // Most paths hold neither a dot segment nor an escape: nothing to look at segment by segment.
    if !path.contains(['.', '%']) || !path.split('/').any(|s| is_dot(s) || is_dot_dot(s)) {
        return Ok(());
    }
    let segments: Vec<&str> = path.split('/').collect();
    let mut kept: Vec<&str> = Vec::with_capacity(segments.len());
    for segment in segments.iter().skip(1) {
        if is_dot(segment) {
            continue;
        }
        if is_dot_dot(segment) {
            if kept.pop().is_none() {
                return Err(GuardError::new(GuardErrorKind::MalformedRequest, "The path climbs above the root."));
            }
            continue;
        }
        kept.push(segment);
    }
    let mut normalized = format!("/{}", kept.join("/"));
    if let Some(query) = request.uri().query() {
        normalized.push('?');
        normalized.push_str(query);
    }
    let mut parts = request.uri().clone().into_parts();
    parts.path_and_query =
        Some(normalized.parse().map_err(|_| GuardError::new(GuardErrorKind::MalformedRequest, "Invalid path."))?);
    *request.uri_mut() =
        Uri::from_parts(parts).map_err(|_| GuardError::new(GuardErrorKind::MalformedRequest, "Invalid path."))?;
    Ok(())
}

fn over_limits(request: &Request<Incoming>, limits: &ServerLimits) -> Option<GuardError> {
    let header_bytes: usize = request.uri().path_and_query().map_or(0, |pq| pq.as_str().len())
        + request.headers().iter().map(|(name, value)| name.as_str().len() + value.len() + 4).sum::<usize>();
    if header_bytes > limits.max_header_bytes {
        return Some(GuardError::new(
            GuardErrorKind::HeadersTooLarge,
            format!("{header_bytes} bytes of request head, the limit is {}.", limits.max_header_bytes),
        ));
    }
    let declared = request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    match (declared, limits.max_body_bytes) {
        (Some(length), Some(limit)) if length > limit => Some(GuardError::new(
            GuardErrorKind::BodyTooLarge,
            format!("Content-Length {length}, the limit is {limit} bytes."),
        )),
        _ => None,
    }
}

/// Over the connection limit: one clear answer, then the connection closes.
async fn refuse_connection(stream: TcpStream) {
    tracing::warn!("connection limit reached; refusing a connection");
    let refuse = service_fn(|request: Request<Incoming>| async move {
        let mut response = GuardError::new(GuardErrorKind::TooManyConnections, "The connection limit is reached.")
            .into_response(request.headers());
        response.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
        Ok::<_, Infallible>(response)
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.keep_alive(false).timer(TokioTimer::new()).header_read_timeout(Duration::from_secs(5));
    let _ = builder.serve_connection(TokioIo::new(stream), refuse).await;
}

// === impl ClientSocket ===

/// A client's socket as hyper serves it: the one descriptor of the connection. It tells the
/// connection's [`Activity`] when writing blocks (a client that stopped reading) and goes through
/// again, and writes `last_words`, if any, as it closes.
struct ClientSocket {
    stream: TcpStream,
    activity: Arc<Activity>,
    last_words: Arc<std::sync::OnceLock<Vec<u8>>>,
}

impl tokio::io::AsyncRead for ClientSocket {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl ClientSocket {
    fn track<T>(&self, written: std::task::Poll<T>) -> std::task::Poll<T> {
        match written {
            std::task::Poll::Pending => self.activity.write_blocked(),
            std::task::Poll::Ready(_) => self.activity.write_went_through(),
        }
        written
    }
}

impl tokio::io::AsyncWrite for ClientSocket {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let written = std::pin::Pin::new(&mut self.stream).poll_write(cx, buf);
        self.track(written)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let written = std::pin::Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.track(written)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

impl Drop for ClientSocket {
    fn drop(&mut self) {
        if let Some(answer) = self.last_words.get() {
            // Small enough for the socket's send buffer: one try, no waiting.
            let _ = self.stream.try_write(answer);
        }
    }
}

fn is_header_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    crate::error::causes(error).any(|cause| cause.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_timeout))
}

/// Raises the open-files limit to its hard limit (systemd's default soft limit, 1,024, holds about 500
/// proxied connections) and says at start when `max_connections` cannot fit: each connection holds
/// one descriptor, and one more while a request of it is with PostgREST. Returns the limit.
pub fn raise_open_files_limit(max_connections: usize) -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    let raised = Rlimit { current: limit.maximum, maximum: limit.maximum };
    if limit.current != limit.maximum {
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!(error = %e, "cannot raise the open-files limit");
        }
    }
    let now = getrlimit(Resource::Nofile).current;
    let needed = max_connections as u64 * 2 + 64;
    match now {
        Some(available) if available < needed => tracing::warn!(
            available,
            needed,
            "PGRST_GUARD_MAX_CONNECTIONS ({max_connections}) needs about {needed} open files (two per busy connection), \
             but the limit is {available}: raise it (LimitNOFILE= under systemd, ulimit -n, --ulimit in Docker) or \
             lower PGRST_GUARD_MAX_CONNECTIONS"
        ),
        _ => tracing::debug!(limit = ?now, "open-files limit"),
    }
    now
}

/// The accept queue a listener asks for (the kernel caps it at `net.core.somaxconn`). PostgREST's
/// server (warp) asks for at least 2048; a gateway in front of it must take a burst as well, or
/// connections past tokio's default of 1024 wait for SYN retransmits, seconds apart.
const LISTEN_BACKLOG: u32 = 4096;

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Fails with "address in use" when another process listens on `addr`: SO_REUSEPORT would let a
/// second guard bind the same address silently and take half the connections.
pub fn ensure_free(addr: SocketAddr) -> std::io::Result<()> {
    if addr.port() != 0 {
        drop(std::net::TcpListener::bind(addr)?);
    }
    Ok(())
}

/// A listener that others may join on the same address (SO_REUSEPORT), so that each worker
/// accepts its own share of the connections. Needs a runtime.
pub fn bind_reusable(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}
