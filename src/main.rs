use std::path::PathBuf;

use clap::parser::ValueSource;
use clap::{Arg, ArgMatches, Command};
use pgrst_guard::config::{self, Config, Setting, Settings, Source, KEYS};
use pgrst_guard::RunningGuard;

/// One flag per configuration key (`--db-uri` for `PGRST_GUARD_DB_URI`), each also read by clap from
/// its environment variable, built from the same list that `--help` and the TOML file use, so they
/// cannot drift apart. Environment values are never shown in `--help`: one may hold a password.
fn cli() -> Command {
    let mut command = Command::new("pgrst-guard")
        .version(env!("CARGO_PKG_VERSION"))
        .about("A reverse proxy for PostgREST that heals stale schema caches: reload, wait, replay once.")
        .after_help("A flag wins over the environment variable, which wins over the TOML file.")
        .subcommand(Command::new("doctor").about(
            "Check the upstream, PostgREST's admin server, the database and the whole reload path (sends one NOTIFY); \
             exits 0 only when all is well",
        ))
        .subcommand(
            Command::new("sandbox")
                .about(
                    "Start a throwaway PostgreSQL, a real PostgREST and the guard in front (on --listen, default \
                     127.0.0.1:8080) until Ctrl-C, then remove everything",
                )
                .arg(Arg::new("postgrest-bin").long("postgrest-bin").value_name("PATH").help(
                    "the PostgREST binary (default: `postgrest` on PATH, else the newest in PGRST_GUARD_TEST_POSTGREST)",
                ))
                .arg(
                    Arg::new("migrations")
                        .long("migrations")
                        .value_name("DIR")
                        .help("apply DIR/*.sql (name order, each in its own transaction) after PostgREST's and Supabase's roles and auth functions, instead of the demo schema"),
                )
                .arg(
                    Arg::new("show")
                        .long("show")
                        .action(clap::ArgAction::SetTrue)
                        .help("play the story once: a migration, PostgREST's PGRST204, the guard's healed insert"),
                )
                .arg(
                    Arg::new("watch")
                        .long("watch")
                        .action(clap::ArgAction::SetTrue)
                        .requires("migrations")
                        .help("apply new files of --migrations as they appear; the guard heals the running API across them"),
                )
                .arg(
                    Arg::new("once")
                        .long("once")
                        .action(clap::ArgAction::SetTrue)
                        .help("stop after start-up (and --show) instead of waiting for Ctrl-C"),
                ),
        )
        .arg(
            Arg::new("config")
                .long("config")
                .env("PGRST_GUARD_CONFIG")
                .hide_env_values(true)
                .global(true)
                .value_name("PATH")
                .help("TOML configuration file"),
        )
        .arg(
            Arg::new("print-config")
                .long("print-config")
                .action(clap::ArgAction::SetTrue)
                .help("Print a TOML file documenting every key with its default, then exit"),
        );
    for key in KEYS {
        let default = key.default.map(|d| format!(" (default: {d})")).unwrap_or_default();
        command = command.arg(
            Arg::new(key.toml)
                .long(key.toml.replace('_', "-"))
                .env(key.env)
                .hide_env_values(true)
                .global(true)
                .value_name("VALUE")
                .help(format!("{}{default}", key.help)),
        );
    }
    command
}

/// The values clap found in flags and the environment, each with where it was set.
fn overrides(matches: &ArgMatches) -> Settings {
    let matches = matches.subcommand_matches("doctor").unwrap_or(matches);
    KEYS.iter()
        .filter_map(|key| {
            let value = matches.get_one::<String>(key.toml)?.clone();
            let source = match matches.value_source(key.toml)? {
                ValueSource::CommandLine => Source::Flag(format!("--{}", key.toml.replace('_', "-"))),
                _ => Source::Environment,
            };
            Some((key.env.to_string(), Setting { value, source: Some(source) }))
        })
        .collect()
}

fn main() {
    let matches = cli().get_matches();
    if matches.get_flag("print-config") {
        print!("{}", config::toml_template());
        return;
    }
    if let Some(sandbox) = matches.subcommand_matches("sandbox") {
        let listen = match sandbox.get_one::<String>("listen").map(|l| l.parse()) {
            None => None,
            Some(Ok(addr)) => Some(addr),
            Some(Err(e)) => {
                eprintln!("pgrst-guard: PGRST_GUARD_LISTEN: {e}");
                std::process::exit(2);
            }
        };
        let options = pgrst_guard::sandbox::SandboxOptions {
            listen,
            postgrest_bin: sandbox.get_one::<String>("postgrest-bin").map(PathBuf::from),
            migrations: sandbox.get_one::<String>("migrations").map(PathBuf::from),
            show: sandbox.get_flag("show"),
            once: sandbox.get_flag("once"),
            watch: sandbox.get_flag("watch"),
        };
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
        std::process::exit(runtime.block_on(pgrst_guard::sandbox::run(options)));
    }
    let config_file =
        matches.subcommand_matches("doctor").unwrap_or(&matches).get_one::<String>("config").map(PathBuf::from);
    let config = match Config::load(config_file.as_deref(), overrides(&matches)) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("pgrst-guard: {e}");
            std::process::exit(2);
        }
    };
    // The request path runs on worker threads of its own; this runtime keeps the database connection,
    // the reload coordination and the admin listener.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    if matches.subcommand_matches("doctor").is_some() {
        let findings = runtime.block_on(pgrst_guard::doctor::run(&config, |finding| println!("{finding}")));
        let failed = findings.iter().any(|f| f.status == pgrst_guard::doctor::Status::Fail);
        println!("{}", if failed { "doctor: problems found" } else { "doctor: all is well" });
        std::process::exit(i32::from(failed));
    }
    init_tracing(&config);
    let code = runtime.block_on(run(config));
    std::process::exit(code);
}

async fn run(config: Config) -> i32 {
    // Installed before anything starts, so that an early SIGTERM still means a clean stop.
    let signal = wait_for_signal();
    let listen = config.listen;
    let guard = match RunningGuard::start(config).await {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("pgrst-guard: cannot listen on {listen}: {e}");
            return 1;
        }
    };
    signal.await;
    tracing::info!("shutting down: no new connections, finishing open requests");
    guard.shutdown().await;
    tracing::info!("stopped");
    0
}

fn wait_for_signal() -> impl std::future::Future<Output = ()> {
    let terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
    let interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt());
    async move {
        match (terminate, interrupt) {
            (Ok(mut terminate), Ok(mut interrupt)) => {
                tokio::select! {
                    _ = terminate.recv() => {}
                    _ = interrupt.recv() => {}
                }
            }
            _ => std::future::pending().await,
        }
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
