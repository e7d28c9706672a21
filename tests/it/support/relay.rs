//! A TCP relay on 127.0.0.1 for fault tests: it forwards to one or more backends (round robin per
//! connection), and can
//! - stall: bytes stop flowing both ways, connections stay open (a frozen database host);
//! - refuse: new connections are closed at once;
//! - blackhole the connections open now: they stop passing bytes for good, without a close, while
//!   new ones are relayed normally (what a NAT gateway or a cloud load balancer does to an idle
//!   flow: AWS NLB after 350 s, Azure after 4 min);
//! - deafen the connections open now: PostgreSQL's NotificationResponse messages no longer reach
//!   the client, everything else does (a LISTEN that silently receives nothing, as PostgreSQL's
//!   notification-queue bug leaves it). Needs a client that does not negotiate TLS (`sslmode=disable`),
//!   so that the server's stream is plain protocol messages from its first byte;
//! - hold the client's query that contains a given text, and everything after it on that
//!   connection, until released: the client is then known to be inside that query (with
//!   `sslmode=disable`, as for deafening).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub struct Relay {
    pub addr: SocketAddr,
    faults: Arc<Faults>,
    task: JoinHandle<()>,
}

#[derive(Default)]
struct Faults {
    stalled: AtomicBool,
    refusing: AtomicBool,
    /// Connections numbered below this pass nothing any more.
    blackholed_below: AtomicU64,
    /// Connections numbered below this get no notifications any more.
    deafened_below: AtomicU64,
    next_connection: AtomicU64,
    /// Connections numbered below this are closed (both ways).
    cut_below: tokio::sync::watch::Sender<u64>,
    /// The backends speak PostgreSQL's protocol, read message by message from the server.
    postgres: bool,
    /// Client bytes containing this wait at the relay until it is cleared.
    hold: std::sync::Mutex<Option<Vec<u8>>>,
    /// Bytes are waiting on the hold now.
    holding: AtomicBool,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Relay {
    pub async fn start(backends: Vec<SocketAddr>) -> Relay {
        Self::start_with(backends, false).await
    }

    /// A relay to one PostgreSQL server that can also [`Relay::deafen_open`] connections.
    pub async fn postgres(server: SocketAddr) -> Relay {
        Self::start_with(vec![server], true).await
    }

    async fn start_with(backends: Vec<SocketAddr>, postgres: bool) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("relay binds");
        let addr = listener.local_addr().unwrap();
        let faults = Arc::new(Faults { postgres, ..Faults::default() });
        let next = Arc::new(AtomicUsize::new(0));
        let shared = faults.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if shared.refusing.load(Ordering::Acquire) {
                    drop(client);
                    continue;
                }
                let number = shared.next_connection.fetch_add(1, Ordering::AcqRel);
                let backend = backends[next.fetch_add(1, Ordering::AcqRel) % backends.len()];
                let faults = shared.clone();
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(backend).await {
                        let (client_read, client_write) = client.into_split();
                        let (server_read, server_write) = server.into_split();
                        let up = tokio::spawn(pump(client_read, server_write, faults.clone(), number, false));
                        pump(server_read, client_write, faults, number, true).await;
                        up.abort();
                    }
                });
            }
        });
        Relay { addr, faults, task }
    }

    /// Stops every byte in both directions; connections stay open.
    pub fn stall(&self, stalled: bool) {
        self.faults.stalled.store(stalled, Ordering::Release);
    }

    /// New connections are closed as soon as they are accepted, and so are the open ones (as when
    /// the process behind is gone).
    pub fn refuse(&self, refusing: bool) {
        self.faults.refusing.store(refusing, Ordering::Release);
        if refusing {
            self.faults.cut_below.send_replace(self.faults.next_connection.load(Ordering::Acquire));
        }
    }

    /// Closes every connection open now, both ways (as a server closing its idle keep-alive
    /// connections); new ones are relayed as before.
    pub fn close_open(&self) {
        self.faults.cut_below.send_replace(self.faults.next_connection.load(Ordering::Acquire));
    }

    /// Every connection open now stops passing bytes for good, and stays open; new ones work.
    pub fn blackhole_open(&self) {
        let next = self.faults.next_connection.load(Ordering::Acquire);
        self.faults.blackholed_below.store(next, Ordering::Release);
    }

    /// Every connection open now stops delivering notifications; new ones work.
    pub fn deafen_open(&self) {
        let next = self.faults.next_connection.load(Ordering::Acquire);
        self.faults.deafened_below.store(next, Ordering::Release);
    }

    /// From now on the first chunk a client sends that contains `text` (a query's SQL, sent whole in
    /// one write by tokio-postgres) waits here, and so does everything after it on its connection,
    /// until [`Relay::release`]. [`Relay::holding`] says when a query is held.
    pub fn hold_query_containing(&self, text: &str) {
        *self.faults.hold.lock().unwrap() = Some(text.as_bytes().to_vec());
    }

    /// Is a client's query held at the relay now?
    pub fn holding(&self) -> bool {
        self.faults.holding.load(Ordering::Acquire)
    }

    /// Lets the held query go on, and holds nothing more.
    pub fn release(&self) {
        *self.faults.hold.lock().unwrap() = None;
    }

    /// A PostgreSQL URI through the relay (no TLS: the relay reads the protocol's messages).
    pub fn pg_uri(&self, database: &str) -> String {
        format!("postgres://postgres@{}/{database}?sslmode=disable", self.addr)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    faults: Arc<Faults>,
    number: u64,
    from_server: bool,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    // Server bytes not yet forwarded: whole messages go out, a partial one waits here.
    let mut pending: Vec<u8> = Vec::new();
    let mut cut = faults.cut_below.subscribe();
    loop {
        let n = tokio::select! {
            read = from.read(&mut buffer) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = cut.wait_for(|below| number < *below) => return,
        };
        while faults.stalled.load(Ordering::Acquire) || number < faults.blackholed_below.load(Ordering::Acquire) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if !from_server && faults.held(&buffer[..n]) {
            faults.holding.store(true, Ordering::Release);
            while faults.hold.lock().unwrap().is_some() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            faults.holding.store(false, Ordering::Release);
        }
        let out: Vec<u8> = if from_server && faults.postgres {
            pending.extend_from_slice(&buffer[..n]);
            let deaf = number < faults.deafened_below.load(Ordering::Acquire);
            take_messages(&mut pending, deaf)
        } else {
            buffer[..n].to_vec()
        };
        if to.write_all(&out).await.is_err() {
            return;
        }
    }
}

impl Faults {
    /// Does this chunk from a client contain the text held?
    fn held(&self, chunk: &[u8]) -> bool {
        self.hold.lock().unwrap().as_deref().is_some_and(|text| chunk.windows(text.len()).any(|w| w == text))
    }
}

/// The whole protocol messages at the front of `pending` (type byte, then a 4-byte length that
/// counts itself), without NotificationResponse ('A') ones when `deaf`.
fn take_messages(pending: &mut Vec<u8>, deaf: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(pending.len());
    let mut at = 0;
    while pending.len() >= at + 5 {
        let length = u32::from_be_bytes([pending[at + 1], pending[at + 2], pending[at + 3], pending[at + 4]]) as usize;
        let end = at + 1 + length;
        if pending.len() < end {
            break;
        }
        if !(deaf && pending[at] == b'A') {
            out.extend_from_slice(&pending[at..end]);
        }
        at = end;
    }
    pending.drain(..at);
    out
}
