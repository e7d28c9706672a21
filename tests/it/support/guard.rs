//! Starting pgrst-guard in-process for a test, and a LISTENer that counts reload NOTIFYs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures_util::StreamExt;
use pgrst_guard::config::{Config, RawConfig};
use pgrst_guard::RunningGuard;
use tokio_postgres::{AsyncMessage, NoTls};

/// A guard in front of `upstream`, NOTIFYing through `db_uri`; `extra` sets or overrides keys.
pub async fn start_guard(upstream: &str, db_uri: &str, extra: &[(&str, &str)]) -> RunningGuard {
    let guard = start_guard_without_waiting(upstream, db_uri, extra).await;
    let connected =
        super::client::eventually(std::time::Duration::from_secs(10), || async { guard.database.is_connected() }).await;
    assert!(connected, "guard's database connection did not come up");
    guard
}

/// As [`start_guard`], without waiting for the guard's database connection.
pub async fn start_guard_without_waiting(upstream: &str, db_uri: &str, extra: &[(&str, &str)]) -> RunningGuard {
    let mut raw = RawConfig::new();
    raw.insert("PGRST_GUARD_LISTEN".into(), "127.0.0.1:0".into());
    raw.insert("PGRST_GUARD_UPSTREAM".into(), upstream.into());
    raw.insert("PGRST_GUARD_DB_URI".into(), db_uri.into());
    for (k, v) in extra {
        raw.insert(k.to_string(), v.to_string());
    }
    let config = Config::from_raw(&raw).expect("valid test config");
    RunningGuard::start(config).await.expect("guard starts")
}

/// Counts `reload schema` (and empty) NOTIFYs on a channel, as PostgREST's listener would see them.
pub struct NotifyCounter {
    /// When each one arrived.
    heard: Arc<std::sync::Mutex<Vec<std::time::Instant>>>,
    /// The newest barrier payload heard (see [`NotifyCounter::settled`]).
    barriers: tokio::sync::watch::Receiver<u64>,
    next_barrier: AtomicU64,
    db_uri: String,
    channel: String,
    _client: tokio_postgres::Client,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for NotifyCounter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl NotifyCounter {
    pub async fn listen(db_uri: &str, channel: &str) -> NotifyCounter {
        let (client, mut connection) = tokio_postgres::connect(db_uri, NoTls).await.expect("counter connects");
        let heard = Arc::new(std::sync::Mutex::new(Vec::new()));
        let counted = heard.clone();
        let (barrier, barriers) = tokio::sync::watch::channel(0u64);
        let task = tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(Ok(message)) = messages.next().await {
                if let AsyncMessage::Notification(n) = message {
                    if n.payload() == "reload schema" || n.payload().is_empty() {
                        counted.lock().expect("the NOTIFY log is never poisoned").push(std::time::Instant::now());
                    } else if let Some(number) = n.payload().strip_prefix("test barrier ") {
                        barrier.send_replace(number.parse().unwrap_or(0));
                    }
                }
            }
        });
        client.batch_execute(&format!("LISTEN \"{channel}\"")).await.expect("LISTEN");
        NotifyCounter {
            heard,
            barriers,
            next_barrier: AtomicU64::new(1),
            db_uri: db_uri.to_string(),
            channel: channel.to_string(),
            _client: client,
            task,
        }
    }

    /// NOTIFYs counted so far (some may still be on their way: see [`NotifyCounter::settled`]).
    pub fn count(&self) -> u64 {
        self.heard.lock().expect("the NOTIFY log is never poisoned").len() as u64
    }

    /// When NOTIFY number `index` (from 0, in order of arrival) arrived.
    #[allow(dead_code, reason = "for ReloadClock, which the benchmark examples use")]
    pub fn heard_at(&self, index: u64) -> Option<std::time::Instant> {
        self.heard.lock().expect("the NOTIFY log is never poisoned").get(index as usize).copied()
    }

    /// The count once every NOTIFY committed before this call has arrived: a NOTIFY with a payload
    /// PostgREST ignores is sent last, and PostgreSQL delivers notifications in commit order.
    pub async fn settled(&self) -> u64 {
        let number = self.next_barrier.fetch_add(1, Ordering::AcqRel);
        let (client, connection) = tokio_postgres::connect(&self.db_uri, NoTls).await.expect("barrier connects");
        tokio::spawn(connection);
        client
            .execute("SELECT pg_notify($1, $2)", &[&self.channel, &format!("test barrier {number}")])
            .await
            .expect("barrier NOTIFY");
        let mut barriers = self.barriers.clone();
        tokio::time::timeout(std::time::Duration::from_secs(10), barriers.wait_for(|heard| *heard >= number))
            .await
            .expect("the barrier NOTIFY came back")
            .expect("the counter is listening");
        self.count()
    }
}

/// pgrst-guard as its own process (the built binary), as users run it: for what needs separate
/// processes (a fleet of guards, memory and descriptor counts). Killed on drop.
pub struct GuardProcess {
    pub addr: std::net::SocketAddr,
    pub admin: std::net::SocketAddr,
    child: std::process::Child,
}

impl GuardProcess {
    /// Starts the binary with these `PGRST_GUARD_*` variables (listen and admin addresses are
    /// chosen here) and waits until its admin `/healthz` answers.
    pub async fn start(upstream: &str, db_uri: &str, extra: &[(&str, &str)]) -> GuardProcess {
        let addr: std::net::SocketAddr = format!("127.0.0.1:{}", super::pg::free_port()).parse().unwrap();
        let admin: std::net::SocketAddr = format!("127.0.0.1:{}", super::pg::free_port()).parse().unwrap();
        // Set for integration tests; an example names the binary it measures in PGRST_GUARD_BIN.
        let binary = std::env::var("PGRST_GUARD_BIN").ok().unwrap_or_else(|| {
            option_env!("CARGO_BIN_EXE_pgrst-guard")
                .unwrap_or(concat!(env!("CARGO_MANIFEST_DIR"), "/target/debug/pgrst-guard"))
                .to_string()
        });
        let mut command = std::process::Command::new(binary);
        command
            .env_clear()
            .env("PGRST_GUARD_LISTEN", addr.to_string())
            .env("PGRST_GUARD_ADMIN_LISTEN", admin.to_string())
            .env("PGRST_GUARD_UPSTREAM", upstream)
            .env("PGRST_GUARD_DB_URI", db_uri)
            .envs(extra.iter().copied())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null());
        let log = std::env::temp_dir().join(format!("pgrst-guard-process-{}.log", addr.port()));
        match std::fs::File::create(&log) {
            Ok(file) => command.stderr(file),
            Err(_) => command.stderr(std::process::Stdio::null()),
        };
        let child = command.spawn().expect("start pgrst-guard");
        let guard = GuardProcess { addr, admin, child };
        let http = super::client::HttpClient::new();
        let healthz = format!("http://{admin}/healthz");
        let up = super::client::eventually(std::time::Duration::from_secs(10), || async {
            http.try_send(http::Method::GET, &healthz, &[], bytes::Bytes::new()).await.is_ok()
        })
        .await;
        assert!(up, "pgrst-guard did not start");
        guard
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the process logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(std::env::temp_dir().join(format!("pgrst-guard-process-{}.log", self.addr.port())))
            .unwrap_or_default()
    }

    /// The process's `/readyz` as JSON.
    pub async fn readyz(&self) -> serde_json::Value {
        super::client::HttpClient::new().get(&format!("http://{}/readyz", self.admin)).await.json()
    }
}

impl Drop for GuardProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ =
            std::fs::remove_file(std::env::temp_dir().join(format!("pgrst-guard-process-{}.log", self.addr.port())));
    }
}

/// The value of `series` in a guard's /metrics text, summed over every line that starts with it: a
/// whole series (`pgrst_guard_notifies_sent_total`, `..._heals_total{code="PGRST204",outcome="healed"}`)
/// or all of a family's labels (`pgrst_guard_catalog_checks_total{`); 0 where there is none.
pub fn metric(metrics: &str, series: &str) -> u64 {
    metrics.lines().filter(|l| l.starts_with(series)).filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok()).sum()
}
