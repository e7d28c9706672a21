use std::path::PathBuf;

use clap::Parser;
use pgrst_guard::config::{self, Config, RawConfig, KEYS};
use pgrst_guard::RunningGuard;

/// Flags mirror the PGRST_GUARD_* keys; a flag wins over the environment, which wins over the file.
#[derive(Parser)]
#[command(name = "pgrst-guard", version, about = "A reverse proxy for PostgREST that heals stale schema caches: reload, wait, replay once.", after_help = keys_help())]
struct Cli {
    /// TOML configuration file (also PGRST_GUARD_CONFIG)
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    #[arg(long, value_name = "HOST:PORT", help = "PGRST_GUARD_LISTEN")]
    listen: Option<String>,
    #[arg(long, value_name = "URL", help = "PGRST_GUARD_UPSTREAM")]
    upstream: Option<String>,
    #[arg(long, value_name = "URI", help = "PGRST_GUARD_DB_URI")]
    db_uri: Option<String>,
    #[arg(long, value_name = "NAME", help = "PGRST_GUARD_DB_CHANNEL")]
    db_channel: Option<String>,
    #[arg(long, value_name = "URL", help = "PGRST_GUARD_UPSTREAM_ADMIN")]
    upstream_admin: Option<String>,
    #[arg(long, value_name = "HOST:PORT", help = "PGRST_GUARD_ADMIN_LISTEN")]
    admin_listen: Option<String>,
    #[arg(long, value_name = "MS", help = "PGRST_GUARD_HEAL_DEADLINE_MS")]
    heal_deadline_ms: Option<String>,
    #[arg(long, value_name = "BYTES", help = "PGRST_GUARD_REPLAY_BODY_LIMIT")]
    replay_body_limit: Option<String>,
    #[arg(long, value_name = "MS", help = "PGRST_GUARD_RETRY_BACKOFF_MS")]
    retry_backoff_ms: Option<String>,
    #[arg(long, value_name = "MS", help = "PGRST_GUARD_ADMIN_POLL_MS")]
    admin_poll_ms: Option<String>,
    #[arg(long, value_name = "MS", help = "PGRST_GUARD_UPSTREAM_CONNECT_TIMEOUT_MS")]
    upstream_connect_timeout_ms: Option<String>,
    #[arg(long, value_name = "MS", help = "PGRST_GUARD_UPSTREAM_TIMEOUT_MS")]
    upstream_timeout_ms: Option<String>,
    #[arg(long, value_name = "text|json", help = "PGRST_GUARD_LOG_FORMAT")]
    log_format: Option<String>,
    #[arg(long, value_name = "FILTER", help = "PGRST_GUARD_LOG_LEVEL")]
    log_level: Option<String>,
}

impl Cli {
    fn flags(&self) -> RawConfig {
        let pairs = [
            ("PGRST_GUARD_LISTEN", &self.listen),
            ("PGRST_GUARD_UPSTREAM", &self.upstream),
            ("PGRST_GUARD_DB_URI", &self.db_uri),
            ("PGRST_GUARD_DB_CHANNEL", &self.db_channel),
            ("PGRST_GUARD_UPSTREAM_ADMIN", &self.upstream_admin),
            ("PGRST_GUARD_ADMIN_LISTEN", &self.admin_listen),
            ("PGRST_GUARD_HEAL_DEADLINE_MS", &self.heal_deadline_ms),
            ("PGRST_GUARD_REPLAY_BODY_LIMIT", &self.replay_body_limit),
            ("PGRST_GUARD_RETRY_BACKOFF_MS", &self.retry_backoff_ms),
            ("PGRST_GUARD_ADMIN_POLL_MS", &self.admin_poll_ms),
            ("PGRST_GUARD_UPSTREAM_CONNECT_TIMEOUT_MS", &self.upstream_connect_timeout_ms),
            ("PGRST_GUARD_UPSTREAM_TIMEOUT_MS", &self.upstream_timeout_ms),
            ("PGRST_GUARD_LOG_FORMAT", &self.log_format),
            ("PGRST_GUARD_LOG_LEVEL", &self.log_level),
        ];
        pairs.into_iter().filter_map(|(k, v)| v.clone().map(|v| (k.to_string(), v))).collect()
    }
}

fn keys_help() -> String {
    let mut text = String::from("Configuration keys (environment name, TOML key, default):\n");
    for key in KEYS {
        text.push_str(&format!(
            "  {:<40} {:<28} {}\n      {}\n",
            key.env,
            key.toml,
            key.default.unwrap_or("-"),
            key.help
        ));
    }
    text
}

fn main() {
    let cli = Cli::parse();
    let config_file = cli.config.clone().or_else(|| std::env::var_os("PGRST_GUARD_CONFIG").map(PathBuf::from));
    let config = match Config::load(config_file.as_deref(), config::raw_from_env(std::env::vars()), cli.flags()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("pgrst-guard: {e}");
            std::process::exit(2);
        }
    };
    init_tracing(&config);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let code = runtime.block_on(run(config));
    std::process::exit(code);
}

async fn run(config: Config) -> i32 {
    let listen = config.listen;
    let guard = match RunningGuard::start(config).await {
        Ok(guard) => guard,
        Err(e) => {
            tracing::error!(%listen, error = %e, "cannot listen");
            eprintln!("pgrst-guard: cannot listen on {listen}: {e}");
            return 1;
        }
    };
    wait_for_signal().await;
    tracing::info!("shutting down: no new connections, finishing open requests");
    guard.shutdown().await;
    tracing::info!("stopped");
    0
}

async fn wait_for_signal() {
    let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(signal) => signal,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn init_tracing(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_level).unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match config.log_format {
        config::LogFormat::Json => builder.json().init(),
        config::LogFormat::Text => builder.init(),
    }
}
