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
pub mod error;
pub mod gateway;
pub mod heal;
pub mod metrics;
pub mod reload;
pub mod server;
pub mod tls;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;

use body::RequestBody;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tower::Layer;

use config::Config;
use gateway::Gateway;
use heal::replay_body::ReplayBody;
use heal::{HealLayer, HealPolicy};
use metrics::Metrics;
use reload::{CatalogCheck, LoadCounter, Notifier, ReloadCoordinator, WaitSettings};
use server::ServerLimits;
use upstream::Forwarder;

/// A started guard: its bound addresses and a handle to stop it.
pub struct RunningGuard {
    pub addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    pub metrics: Arc<Metrics>,
    pub notifier: Arc<Notifier>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningGuard {
    /// Binds the listeners and starts serving. The database connection is made in the background.
    pub async fn start(config: Config) -> std::io::Result<RunningGuard> {
        let metrics = Arc::new(Metrics::default());
        let notifier = Notifier::spawn(config.db_uri.clone(), config.db_channel.clone());
        let settings = WaitSettings {
            deadline: config.heal_deadline,
            backoff: config.retry_backoff,
            poll: config.admin_poll,
            min_interval: config.reload_min_interval,
        };
        let https = tls::https_config(config.upstream_ca_file.as_deref())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let load_counter = config.upstream_admin.as_ref().map(|admin| LoadCounter::new(admin, https.clone()));
        let coordinator = ReloadCoordinator::start(notifier.clone(), load_counter, settings);
        let policy = HealPolicy {
            replay_body_limit: config.replay_body_limit,
            deadline: config.heal_deadline,
            empty_cache_backoff: config.retry_backoff,
            default_schema: config.db_schemas[0].clone(),
        };
        let catalog =
            config.catalog_check.then(|| Arc::new(CatalogCheck::new(notifier.clone(), config.catalog_remember)));
        let rest = HealLayer::new(coordinator, policy, metrics.clone(), catalog).layer(
            Forwarder::<ReplayBody<RequestBody>>::new(&config.upstream, &config, https.clone())
                .with_metrics(metrics.clone()),
        );
        let passthrough = config
            .passthrough_upstream
            .as_ref()
            .map(|origin| Forwarder::<RequestBody>::new(origin, &config, https.clone()).with_upgrades());
        let service = Gateway::new(rest, passthrough, config.rest_prefix.clone());

        let listener = server::bind(config.listen).await?;
        let addr = listener.local_addr()?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut tasks = vec![tokio::spawn(server::serve(
            listener,
            service,
            Some(metrics.clone()),
            signalled(shutdown_rx.clone()),
            ServerLimits {
                header_read_timeout: config.header_read_timeout,
                max_connections: config.max_connections,
                max_header_bytes: config.max_header_bytes,
                max_body_bytes: config.max_body_bytes,
                drain: config.shutdown_timeout,
            },
        ))];
        let mut admin_addr = None;
        if let Some(admin_listen) = config.admin_listen {
            let admin_listener = server::bind(admin_listen).await?;
            admin_addr = Some(admin_listener.local_addr()?);
            let state = admin::AdminState {
                metrics: metrics.clone(),
                notifier: notifier.clone(),
                upstream: config.upstream.clone(),
            };
            let admin_service = tower::service_fn(move |request| admin::handle(state.clone(), request));
            tasks.push(tokio::spawn(server::serve(
                admin_listener,
                admin_service,
                None,
                signalled(shutdown_rx),
                ServerLimits::admin(),
            )));
        }
        tracing::info!(%addr, upstream = %config.upstream, admin = ?admin_addr, admin_upstream = ?config.upstream_admin.as_ref().map(ToString::to_string), db = %config.db_uri.redacted(), channel = %config.db_channel, "pgrst-guard listening");
        Ok(RunningGuard { addr, admin_addr, metrics, notifier, shutdown, tasks })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting and waits for open requests (up to the drain deadline).
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
    }
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn signalled(mut receiver: watch::Receiver<bool>) {
    let _ = receiver.wait_for(|stop| *stop).await;
}
