//! The one list of configuration keys. `--help`, the flags, the environment variables,
//! `--print-config` and `config/pgrst-guard.toml` are all made from it, so they cannot drift apart.

/// A configuration key: its canonical environment name, the TOML name, the CLI flag, the default
/// and what it is for. `--help` and `config/pgrst-guard.toml` document the same list.
pub struct Key {
    pub env: &'static str,
    pub toml: &'static str,
    pub default: Option<&'static str>,
    pub help: &'static str,
}

pub const KEYS: &[Key] = &[
    key("PGRST_GUARD_LISTEN", "listen", Some("127.0.0.1:8080"), "address the proxy listens on (host:port)"),
    key(
        "PGRST_GUARD_UPSTREAM",
        "upstream",
        Some("http://127.0.0.1:3000"),
        "PostgREST base URL, http or https, may carry a path prefix such as /rest/v1",
    ),
    key(
        "PGRST_GUARD_UPSTREAM_CA_FILE",
        "upstream_ca_file",
        None,
        "extra CA certificates (PEM) trusted for https upstreams, besides the system and webpki roots",
    ),
    key("PGRST_GUARD_SUPABASE_URL", "supabase_url", None, "Supabase project URL: gateway mode with upstream URL/rest/v1, REST prefix /rest/v1 and pass-through to URL"),
    key("PGRST_GUARD_REST_PREFIX", "rest_prefix", None, "path prefix of REST requests, stripped before forwarding (e.g. /rest/v1); other paths go to the pass-through origin"),
    key("PGRST_GUARD_PASSTHROUGH_UPSTREAM", "passthrough_upstream", None, "origin for paths outside the REST prefix, passed through untouched, WebSockets included"),
    key("PGRST_GUARD_DB_URI", "db_uri", None, "PostgreSQL URI used to send the reload NOTIFY (required)"),
    key("PGRST_GUARD_DB_CHANNEL", "db_channel", Some("pgrst"), "channel PostgREST listens on (its db-channel)"),
    key(
        "PGRST_GUARD_DB_TIMEOUT_MS",
        "db_timeout_ms",
        Some("2000"),
        "longest a catalog query or NOTIFY may take before the database connection is taken for dead and replaced",
    ),
    key(
        "PGRST_GUARD_DB_CHECK_INTERVAL_MS",
        "db_check_interval_ms",
        Some("5000"),
        "how often the database connection and its LISTEN are proved to work (a NOTIFY to itself that must come back)",
    ),
    key(
        "PGRST_GUARD_DB_KEEPALIVE_IDLE_MS",
        "db_keepalive_idle_ms",
        Some("10000"),
        "TCP keepalive on the database connection: idle time before the first probe",
    ),
    key(
        "PGRST_GUARD_UPSTREAM_ADMIN",
        "upstream_admin",
        None,
        "PostgREST admin-server URL (comma-separated, one per instance behind the upstream); its /metrics tells when a reload finished",
    ),
    key("PGRST_GUARD_ADMIN_LISTEN", "admin_listen", None, "address of the guard's own /healthz, /readyz and /metrics"),
    key(
        "PGRST_GUARD_TRUSTED_PROXIES",
        "trusted_proxies",
        None,
        "proxies (CIDR list) whose X-Forwarded-*/Forwarded headers are kept and appended to; from anyone else they are replaced",
    ),
    key(
        "PGRST_GUARD_HEAL_DEADLINE_MS",
        "heal_deadline_ms",
        Some("10000"),
        "longest wait for a reload before the original error goes to the client",
    ),
    key(
        "PGRST_GUARD_REPLAY_BODY_LIMIT",
        "replay_body_limit",
        Some("1048576"),
        "largest request body (bytes) kept for a replay; bigger ones stream through unhealed",
    ),
    key(
        "PGRST_GUARD_REPLAY_MEMORY_LIMIT",
        "replay_memory_limit",
        Some("268435456"),
        "bytes all kept replay copies may hold together; past it bodies stream through unhealed",
    ),
    key(
        "PGRST_GUARD_RETRY_BACKOFF_MS",
        "retry_backoff_ms",
        Some("25"),
        "first back-off before a replay when reload completion cannot be observed; doubles up to 1 s",
    ),
    key(
        "PGRST_GUARD_ADMIN_POLL_MS",
        "admin_poll_ms",
        Some("5"),
        "how often the admin /metrics is polled while a reload is awaited",
    ),
    key(
        "PGRST_GUARD_DB_SCHEMAS",
        "db_schemas",
        Some("public"),
        "PostgREST's db-schemas, comma-separated; the first is the default for unqualified names",
    ),
    key(
        "PGRST_GUARD_CATALOG_CHECK",
        "catalog_check",
        Some("true"),
        "ask the catalog whether a missing object exists before reloading (true or false)",
    ),
    key(
        "PGRST_GUARD_WRITE_BARRIER",
        "write_barrier",
        Some("true"),
        "hold each write until PostgREST's cache is shown to hold its target's current types and defaults (true or false)",
    ),
    key(
        "PGRST_GUARD_CATALOG_RECHECK_MS",
        "catalog_recheck_ms",
        Some("25"),
        "shortest time between two catalog queries for the same object; an answer serves only requests sent before its query",
    ),
    key(
        "PGRST_GUARD_RELOAD_MIN_INTERVAL_MS",
        "reload_min_interval_ms",
        Some("1000"),
        "reload budget: at most one NOTIFY from this guard per interval",
    ),
    key(
        "PGRST_GUARD_UPSTREAM_CONNECT_TIMEOUT_MS",
        "upstream_connect_timeout_ms",
        Some("3000"),
        "upstream TCP connect timeout; past it the client gets 502",
    ),
    key(
        "PGRST_GUARD_UPSTREAM_TIMEOUT_MS",
        "upstream_timeout_ms",
        Some("60000"),
        "time for the upstream to start answering; past it the client gets 504",
    ),
    key(
        "PGRST_GUARD_HEADER_READ_TIMEOUT_MS",
        "header_read_timeout_ms",
        Some("30000"),
        "time a client has to send its request head; then 408",
    ),
    key(
        "PGRST_GUARD_IDLE_TIMEOUT_MS",
        "idle_timeout_ms",
        Some("120000"),
        "a client connection (HTTP keep-alive, HTTP/2, WebSocket tunnel) idle this long is closed",
    ),
    key(
        "PGRST_GUARD_MAX_CONNECTIONS",
        "max_connections",
        Some("10000"),
        "open client connections at most; one more gets 503",
    ),
    key(
        "PGRST_GUARD_MAX_HEADER_BYTES",
        "max_header_bytes",
        Some("32768"),
        "largest request head (URI and headers); larger gets 431",
    ),
    key(
        "PGRST_GUARD_MAX_BODY_BYTES",
        "max_body_bytes",
        Some("0"),
        "largest request body; larger gets 413 (0: no limit)",
    ),
    key(
        "PGRST_GUARD_SHUTDOWN_TIMEOUT_MS",
        "shutdown_timeout_ms",
        Some("30000"),
        "after SIGTERM/SIGINT, how long open requests and heals get to finish",
    ),
    key("PGRST_GUARD_WORKERS", "workers", Some("0"), "worker threads, each with its own listener and upstream pool (0: one per core)"),
    key("PGRST_GUARD_LOG_FORMAT", "log_format", Some("text"), "log format: text or json"),
    key("PGRST_GUARD_LOG_LEVEL", "log_level", Some("info"), "log filter, e.g. info or pgrst_guard=debug"),
];

const fn key(env: &'static str, toml: &'static str, default: Option<&'static str>, help: &'static str) -> Key {
    Key { env, toml, default, help }
}

/// A TOML file documenting every key with its default: what `config/pgrst-guard.toml` holds and
/// `pgrst-guard --print-config` prints.
pub fn toml_template() -> String {
    let mut out = String::from(
        "# pgrst-guard configuration. Every key can also be set as an environment variable (the name in\n\
         # brackets) or a command-line flag (--key-with-dashes). Flags win over the environment, which wins\n\
         # over this file. Use it with `pgrst-guard --config PATH` or PGRST_GUARD_CONFIG.\n",
    );
    for key in KEYS {
        out.push_str(&format!("\n# {} [{}]\n", key.help, key.env));
        match key.default {
            Some(value) if value.parse::<u64>().is_ok() || value == "true" || value == "false" => {
                out.push_str(&format!("{} = {value}\n", key.toml))
            }
            Some(value) => out.push_str(&format!("{} = {value:?}\n", key.toml)),
            None => out.push_str(&format!("# {} = \"...\"   (no default)\n", key.toml)),
        }
    }
    out
}
