//! A TCP relay on 127.0.0.1 for fault tests: it forwards to one or more backends (round robin per
//! connection), and can stall (bytes stop flowing both ways, connections stay open, like a frozen
//! database host) or refuse (new connections are closed at once).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub struct Relay {
    pub addr: SocketAddr,
    stalled: Arc<AtomicBool>,
    refusing: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Relay {
    pub async fn start(backends: Vec<SocketAddr>) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("relay binds");
        let addr = listener.local_addr().unwrap();
        let stalled = Arc::new(AtomicBool::new(false));
        let refusing = Arc::new(AtomicBool::new(false));
        let next = Arc::new(AtomicUsize::new(0));
        let (s, r) = (stalled.clone(), refusing.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if r.load(Ordering::Acquire) {
                    drop(client);
                    continue;
                }
                let backend = backends[next.fetch_add(1, Ordering::AcqRel) % backends.len()];
                let stalled = s.clone();
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(backend).await {
                        let (client_read, client_write) = client.into_split();
                        let (server_read, server_write) = server.into_split();
                        let up = tokio::spawn(pump(client_read, server_write, stalled.clone()));
                        pump(server_read, client_write, stalled).await;
                        up.abort();
                    }
                });
            }
        });
        Relay { addr, stalled, refusing, task }
    }

    /// Stops every byte in both directions; connections stay open.
    pub fn stall(&self, stalled: bool) {
        self.stalled.store(stalled, Ordering::Release);
    }

    /// New connections are closed as soon as they are accepted.
    pub fn refuse(&self, refusing: bool) {
        self.refusing.store(refusing, Ordering::Release);
    }

    /// A PostgreSQL URI through the relay.
    pub fn pg_uri(&self, database: &str) -> String {
        format!("postgres://postgres@{}/{database}", self.addr)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    stalled: Arc<AtomicBool>,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while stalled.load(Ordering::Acquire) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}
