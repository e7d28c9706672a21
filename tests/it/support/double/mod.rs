//! The PostgREST double: an HTTP server that behaves like PostgREST for everything pgrst-guard
//! depends on. It keeps a real schema cache read from the real catalog, reloads it on the real
//! NOTIFY, and runs each request in one transaction on the real database.

mod admin;
mod api;
pub mod cache;
pub mod error;
mod pool;
pub mod profile;
mod query;
pub mod reload;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use profile::Profile;

use cache::SchemaCache;
use pool::Pool;
use reload::ReloadState;

#[derive(Clone, Debug)]
pub struct DoubleOptions {
    pub db_uri: String,
    pub profile: Profile,
    pub schemas: Vec<String>,
    pub channel: String,
    pub load_delay: Duration,
    pub pool_size: usize,
    /// 0 picks a free port.
    pub port: u16,
    pub admin_port: u16,
}

impl DoubleOptions {
    pub fn new(db_uri: impl Into<String>) -> DoubleOptions {
        DoubleOptions {
            db_uri: db_uri.into(),
            profile: Profile::V14,
            schemas: vec!["public".to_string()],
            channel: "pgrst".to_string(),
            load_delay: Duration::ZERO,
            pool_size: 10,
            port: 0,
            admin_port: 0,
        }
    }

    #[allow(dead_code, reason = "for examples/postgrest_double.rs")]
    pub fn profile(mut self, profile: Profile) -> Self {
        self.profile = profile;
        self
    }

    pub fn load_delay(mut self, delay: Duration) -> Self {
        self.load_delay = delay;
        self
    }
}

pub struct State {
    pub profile: Profile,
    pub schemas: Vec<String>,
    pub channel: String,
    pub db_uri: String,
    pub cache: RwLock<Option<Arc<SchemaCache>>>,
    pub reload: ReloadState,
    pool: Pool,
}

pub struct PostgrestDouble {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    state: Arc<State>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl PostgrestDouble {
    /// Opens both sockets at once (as v12–v14 do) and returns after the first load attempt.
    pub async fn start(options: DoubleOptions) -> std::io::Result<PostgrestDouble> {
        let state = Arc::new(State {
            profile: options.profile,
            schemas: options.schemas.clone(),
            channel: options.channel.clone(),
            db_uri: options.db_uri.clone(),
            cache: RwLock::new(None),
            reload: ReloadState::default(),
            pool: Pool::new(&options.db_uri, options.pool_size),
        });
        state.reload.load_delay_ms.store(options.load_delay.as_millis() as u64, Ordering::Release);
        let api_listener = TcpListener::bind(("127.0.0.1", options.port)).await?;
        let admin_listener = TcpListener::bind(("127.0.0.1", options.admin_port)).await?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let addr = api_listener.local_addr()?;
        let admin_addr = admin_listener.local_addr()?;

        let first_load = state.reload.loaded.notified();
        let mut tasks = Vec::new();
        tasks.push(tokio::spawn(reload::run_loader(state.clone())));
        tasks.push(tokio::spawn(reload::run_listener(state.clone())));
        let api_state = state.clone();
        tasks.push(tokio::spawn(serve(api_listener, shutdown_rx.clone(), move |req| {
            api::handle(api_state.clone(), req)
        })));
        let admin_state = state.clone();
        tasks
            .push(tokio::spawn(serve(admin_listener, shutdown_rx, move |req| admin::handle(admin_state.clone(), req))));
        reload::trigger(&state);
        let _ = tokio::time::timeout(Duration::from_secs(30), first_load).await;
        // Tests send NOTIFYs right after start: they must not race the LISTEN.
        let listening = async {
            while !state.reload.listener_up.load(Ordering::Acquire) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(30), listening).await;
        Ok(PostgrestDouble { addr, admin_addr, state, shutdown, tasks })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin_addr)
    }

    /// Makes the next `n` load attempts fail, as a statement timeout on a huge schema would.
    pub fn fail_next_loads(&self, n: usize) {
        self.state.reload.fail_next.store(n, Ordering::Release);
    }

    pub fn successful_loads(&self) -> u64 {
        self.state.reload.successes.load(Ordering::Acquire)
    }

    pub fn failed_loads(&self) -> u64 {
        self.state.reload.failures.load(Ordering::Acquire)
    }

    /// Duration of the last completed load (start to swap).
    #[allow(dead_code, reason = "for examples/bench_heal.rs")]
    pub fn last_load_duration(&self) -> Duration {
        Duration::from_micros(self.state.reload.last_load_micros.load(Ordering::Acquire))
    }

    /// Stops listening and ends every task; the ports are free afterwards.
    #[allow(dead_code, reason = "for examples/postgrest_double.rs")]
    pub async fn stop(mut self) {
        self.shutdown_now().await;
    }

    async fn shutdown_now(&mut self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks.drain(..) {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for PostgrestDouble {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn serve<F, Fut>(listener: TcpListener, mut shutdown: watch::Receiver<bool>, handler: F)
where
    F: Fn(hyper::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = hyper::Response<http_body_util::Full<bytes::Bytes>>> + Send + 'static,
{
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.changed() => break,
        };
        let Ok((stream, _)) = accepted else { continue };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let mut conn_shutdown = shutdown.clone();
        connections.spawn(async move {
            let service = service_fn(move |req| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(handler(req).await) }
            });
            let builder = auto::Builder::new(TokioExecutor::new());
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = conn_shutdown.changed() => {}
            }
        });
        while connections.try_join_next().is_some() {}
    }
    connections.abort_all();
}
