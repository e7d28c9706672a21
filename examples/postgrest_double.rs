//! The PostgREST double as a process, for benchmarks and for comparisons with the real PostgREST:
//! `cargo run --example postgrest_double -- --db-uri URI --port N --admin-port M --profile v14`.

// Each example uses only a part of the test support.
#[allow(dead_code, unused_macros)]
#[path = "../tests/it/support/mod.rs"]
mod support;

use std::time::Duration;

use clap::Parser;
use support::double::{DoubleOptions, PostgrestDouble, Profile};

#[derive(Parser)]
#[command(about = "A PostgREST double backed by a real PostgreSQL")]
struct Args {
    #[arg(long)]
    db_uri: String,
    #[arg(long, default_value_t = 3000)]
    port: u16,
    #[arg(long, default_value_t = 3001)]
    admin_port: u16,
    #[arg(long, default_value = "v14")]
    profile: Profile,
    #[arg(long, default_value = "public")]
    schema: String,
    #[arg(long, default_value = "pgrst")]
    channel: String,
    #[arg(long, default_value_t = 0)]
    load_delay_ms: u64,
    #[arg(long, default_value_t = 10)]
    pool_size: usize,
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let mut options =
        DoubleOptions::new(args.db_uri).profile(args.profile).load_delay(Duration::from_millis(args.load_delay_ms));
    options.schemas = args.schema.split(',').map(|s| s.trim().to_string()).collect();
    options.channel = args.channel;
    options.port = args.port;
    options.admin_port = args.admin_port;
    options.pool_size = args.pool_size;
    let double = match PostgrestDouble::start(options).await {
        Ok(d) => d,
        Err(e) => {
            eprintln!("postgrest_double: cannot listen: {e}");
            std::process::exit(1);
        }
    };
    println!("postgrest_double listening on {} (admin {}) profile {:?}", double.addr, double.admin_addr, args.profile);
    let mut terminate =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    double.stop().await;
}
