//! pgrst-guard: a reverse proxy for PostgREST that makes stale schema caches invisible to clients.
//!
//! A request flows:
//!
//! ```text
//! client ──► server (listener, HTTP/1.1 + h2c, shutdown)
//!              └─► heal::HealLayer   classify the answer; on a stale schema cache:
//!                    │                 reload::ReloadCoordinator  (one NOTIFY for many requests,
//!                    │                 wait for PostgREST's load counter or back off), replay once
//!                    └─► upstream::Forwarder  (pooled keep-alive client, header hygiene)
//!                          └─► PostgREST
//! ```
//!
//! Configuration is one typed [`config::Config`]; every failure of the guard itself becomes a
//! PostgREST-shaped JSON answer in [`error`].
#![forbid(unsafe_code)]

pub mod admin;
pub mod body;
pub mod config;
pub mod doctor;
pub mod edge;
pub mod error;
pub mod forwarded;
pub mod gateway;
pub mod heal;
pub mod health;
pub mod metrics;
pub mod reload;
pub mod sandbox;
pub mod schema_object;
pub mod server;
pub mod tls;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;

use body::RequestBody;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tower::Layer;

use config::Config;
use gateway::Gateway;
use heal::replay_body::ReplayBody;
use heal::{HealLayer, HealPolicy};
use metrics::Metrics;
use reload::{CatalogCheck, Database, DatabaseSettings, LoadCounter, ReloadCoordinator, WaitSettings, WriteBarrier};
use server::ServerLimits;
use upstream::Forwarder;

/// A started guard: its bound addresses and a handle to stop it.
pub struct RunningGuard {
    pub addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    pub metrics: Arc<Metrics>,
    pub database: Arc<Database>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    /// Each resolves when its worker thread has drained.
    workers: Vec<oneshot::Receiver<()>>,
}

/// What every worker needs to build its own copy of the request path.
#[derive(Clone)]
struct ServiceStack {
    config: Config,
    https: rustls::ClientConfig,
    coordinator: Arc<ReloadCoordinator>,
    policy: HealPolicy,
    catalog: Option<Arc<CatalogCheck>>,
    barrier: Option<Arc<WriteBarrier>>,
    metrics: Arc<Metrics>,
}

impl ServiceStack {
    /// gateway → heal layer → forwarder (and the pass-through forwarder in gateway mode).
    fn build(
        &self,
    ) -> impl tower::Service<
        http::Request<RequestBody>,
        Response = http::Response<body::GuardBody>,
        Error = std::convert::Infallible,
        Future: Send,
    > + Clone
           + Send
           + 'static {
        let config = &self.config;
        let rest =
            HealLayer::new(self.coordinator.clone(), self.policy.clone(), self.metrics.clone(), self.catalog.clone())
                .with_write_barrier(self.barrier.clone())
                .layer(
                    Forwarder::<ReplayBody<RequestBody>>::new(&config.upstream, config, self.https.clone())
                        .with_metrics(self.metrics.clone()),
                );
        let passthrough = config
            .passthrough_upstream
            .as_ref()
            .map(|origin| Forwarder::<RequestBody>::new(origin, config, self.https.clone()).with_upgrades());
        edge::layer(Gateway::new(rest, passthrough, config.rest_prefix.clone()))
    }
}

enum WorkerListener {
    Bound(std::net::TcpListener),
    /// Bind another SO_REUSEPORT listener to this address.
    Join(SocketAddr),
}

/// Starts worker `index` on a thread of its own; returns once it listens.
async fn spawn_worker(
    index: usize,
    listener: WorkerListener,
    stack: ServiceStack,
    limits: ServerLimits,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<oneshot::Receiver<()>> {
    let (ready_tx, ready_rx) = oneshot::channel::<std::io::Result<()>>();
    let (done_tx, done_rx) = oneshot::channel();
    std::thread::Builder::new().name(format!("pgrst-guard-{index}")).spawn(move || {
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(runtime) => runtime,
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return;
            }
        };
        runtime.block_on(async move {
            let listener = match listener {
                WorkerListener::Bound(listener) => tokio::net::TcpListener::from_std(listener),
                WorkerListener::Join(addr) => server::bind_reusable(addr),
            };
            let listener = match listener {
                Ok(listener) => listener,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(()));
            let metrics = stack.metrics.clone();
            server::serve(listener, stack.build(), Some(metrics), shutdown, limits).await;
        });
        let _ = done_tx.send(());
    })?;
    ready_rx.await.map_err(|_| std::io::Error::other("worker thread ended before listening"))??;
    Ok(done_rx)
}

impl RunningGuard {
    /// Binds the listeners and starts serving. The database connection is made in the background.
    pub async fn start(config: Config) -> std::io::Result<RunningGuard> {
        let metrics = Arc::new(Metrics::default());
        let database = Database::spawn(
            config.db_uri.clone(),
            DatabaseSettings {
                channel: config.db_channel.clone(),
                op_timeout: config.db_timeout,
                check_interval: config.db_check_interval,
                keepalive_idle: config.db_keepalive_idle,
            },
        );
        let settings = WaitSettings {
            deadline: config.heal_deadline,
            backoff: config.retry_backoff,
            poll: config.admin_poll,
            min_interval: config.reload_min_interval,
        };
        let https = tls::https_config(config.upstream_ca_file.as_deref())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let load_counters: Vec<LoadCounter> =
            config.upstream_admin.iter().map(|admin| LoadCounter::new(admin, https.clone())).collect();
        let barrier = config.write_barrier.then(|| {
            WriteBarrier::start(
                database.clone(),
                load_counters.clone(),
                config.upstream.clone(),
                https.clone(),
                config.db_schemas.clone(),
                config.admin_poll,
                config.heal_deadline,
                config.db_timeout,
                metrics.clone(),
            )
        });
        let coordinator = ReloadCoordinator::start(database.clone(), load_counters, settings);
        let policy = HealPolicy {
            replay_body_limit: config.replay_body_limit,
            replay_memory: heal::replay_body::ReplayMemory::new(config.replay_memory_limit),
            deadline: config.heal_deadline,
            backoff: config.retry_backoff,
            default_schema: config.db_schemas[0].clone(),
        };
        let catalog =
            config.catalog_check.then(|| Arc::new(CatalogCheck::new(database.clone(), config.catalog_recheck)));
        let stack = ServiceStack {
            config: config.clone(),
            https,
            coordinator,
            policy,
            catalog,
            barrier: barrier.clone(),
            metrics: metrics.clone(),
        };
        let limits = ServerLimits {
            header_read_timeout: config.header_read_timeout,
            connections: Arc::new(tokio::sync::Semaphore::new(config.max_connections)),
            max_header_bytes: config.max_header_bytes,
            max_body_bytes: config.max_body_bytes,
            drain: config.shutdown_timeout,
            trusted_proxies: Arc::new(config.trusted_proxies.clone()),
            idle_timeout: config.idle_timeout,
        };
        let (shutdown, shutdown_rx) = watch::channel(false);
        // One single-threaded runtime per worker, each with its own SO_REUSEPORT listener and its
        // own upstream connection pool: no work stealing and no shared pool lock on the request path.
        server::ensure_free(config.listen)?;
        let first = server::bind_reusable(config.listen)?;
        // After the address is ours: a guard that cannot listen says only that.
        server::raise_open_files_limit(config.max_connections);
        let addr = first.local_addr()?;
        if let Some(barrier) = &barrier {
            // The first proof once the address is ours and before the guard serves anything (its health
            // endpoint included): writes would wait for it anyway, and its NOTIFYs (and marker view)
            // belong to the start.
            let bound = config.heal_deadline.min(std::time::Duration::from_secs(3));
            if !barrier.first_proof(tokio::time::Instant::now() + bound).await {
                tracing::info!("write barrier: no proof of PostgREST's schema cache yet; writes wait for one, or go on unverified where none can be had");
            }
        }

        let mut first = Some(first.into_std()?);
        let mut workers = Vec::new();
        for index in 0..config.workers {
            let listener = match first.take() {
                Some(listener) => WorkerListener::Bound(listener),
                None => WorkerListener::Join(addr),
            };
            workers.push(spawn_worker(index, listener, stack.clone(), limits.clone(), shutdown_rx.clone()).await?);
        }
        let mut tasks = Vec::new();
        let mut admin_addr = None;
        if let Some(admin_listen) = config.admin_listen {
            let admin_listener = server::bind(admin_listen).await?;
            admin_addr = Some(admin_listener.local_addr()?);
            let state = admin::AdminState {
                metrics: metrics.clone(),
                database: database.clone(),
                upstream: config.upstream.clone(),
            };
            let admin_service = tower::service_fn(move |request| admin::handle(state.clone(), request));
            tasks.push(tokio::spawn(server::serve(
                admin_listener,
                admin_service,
                None,
                shutdown_rx,
                ServerLimits::admin(),
            )));
        }
        tracing::info!(%addr, upstream = %config.upstream, admin = ?admin_addr, admin_upstream = ?config.upstream_admin.iter().map(ToString::to_string).collect::<Vec<_>>(), db = %config.db_uri.redacted(), channel = %config.db_channel, "pgrst-guard listening");
        Ok(RunningGuard { addr, admin_addr, metrics, database, shutdown, tasks, workers })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The `/metrics` text, as the admin listener serves it.
    pub fn render_metrics(&self) -> String {
        self.metrics.render(&self.database.health(), self.database.notify_counts())
    }

    /// Stops accepting and waits for open requests (up to the drain deadline).
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        for worker in self.workers.drain(..) {
            let _ = worker.await;
        }
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
    }
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        for task in &self.tasks {
            task.abort();
        }
    }
}
