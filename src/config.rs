//! One typed [`Config`], assembled from a TOML file, `PGRST_GUARD_*` environment variables and
//! command-line flags (later sources win: file < environment < flags), validated once at start.
//!
//! Every source is first reduced to a map of canonical key names (`PGRST_GUARD_LISTEN`, ...) to raw
//! strings, so parsing and validation are one code path and tests never touch the process
//! environment.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use http::uri::{Authority, Scheme, Uri};

use crate::tls::SslMode;

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

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The upstream PostgREST base: scheme, authority and an optional path prefix (no trailing slash).
#[derive(Clone, Debug)]
pub struct UpstreamUrl {
    pub scheme: Scheme,
    pub authority: Authority,
    pub path_prefix: String,
}

impl UpstreamUrl {
    pub fn parse(text: &str) -> Result<UpstreamUrl, String> {
        let uri: Uri = text.parse().map_err(|_| format!("expected an http or https URL, got {text:?}"))?;
        let scheme = match uri.scheme_str() {
            Some("http") => Scheme::HTTP,
            Some("https") => Scheme::HTTPS,
            _ => return Err(format!("expected an http or https URL, got {text:?}")),
        };
        let authority = uri.authority().cloned().ok_or_else(|| format!("expected a host in {text:?}"))?;
        if authority.as_str().contains('@') {
            return Err("credentials in the URL are not supported; send them as headers".to_string());
        }
        if uri.query().is_some() {
            return Err(format!("a base URL takes no query string: {text:?}"));
        }
        let path_prefix = uri.path().trim_end_matches('/').to_string();
        Ok(UpstreamUrl { scheme, authority, path_prefix })
    }
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}{}", self.scheme, self.authority, self.path_prefix)
    }
}

/// A PostgreSQL connection string whose password never reaches a log or an error message.
#[derive(Clone)]
pub struct DbUri {
    text: String,
    config: tokio_postgres::Config,
    ssl_mode: SslMode,
    root_cert: Option<PathBuf>,
}

impl DbUri {
    /// Parses a URI or key=value string. `sslmode` takes libpq's values (default `prefer`) and
    /// `sslrootcert` names an extra CA file; both are handled here, since tokio-postgres knows
    /// neither `verify-ca`/`verify-full` nor root certificates.
    pub fn parse(text: &str) -> Result<DbUri, String> {
        let invalid =
            || "not a valid PostgreSQL connection string (value not shown: it may hold a password)".to_string();
        let (rest, params) = take_params(text, &["sslmode", "sslrootcert"]);
        let ssl_mode = match params.get("sslmode") {
            None => SslMode::Prefer,
            Some(mode) => SslMode::parse(mode).ok_or_else(|| {
                format!("sslmode {mode:?} is not one of disable, allow, prefer, require, verify-ca, verify-full")
            })?,
        };
        let root_cert = params.get("sslrootcert").map(PathBuf::from);
        if let Some(path) = &root_cert {
            crate::tls::root_store(Some(path)).map_err(|e| format!("sslrootcert: {e}"))?;
        }
        let mut config = tokio_postgres::Config::from_str(&rest).map_err(|_| invalid())?;
        config.ssl_mode(ssl_mode.for_tokio_postgres());
        if config.get_application_name().is_none() {
            config.application_name("pgrst-guard");
        }
        Ok(DbUri { text: text.to_string(), config, ssl_mode, root_cert })
    }

    pub fn pg_config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    pub fn ssl_mode(&self) -> SslMode {
        self.ssl_mode
    }

    /// The TLS connector `sslmode` and `sslrootcert` ask for (used only when TLS is negotiated).
    pub fn tls(&self) -> Result<tokio_postgres_rustls::MakeRustlsConnect, String> {
        crate::tls::postgres_connector(self.ssl_mode, self.root_cert.as_deref())
    }

    /// The URI with any password replaced by `***`.
    pub fn redacted(&self) -> String {
        redact_password(&self.text)
    }
}

/// Removes `names` from a URI's query string or a key=value string; returns the rest and their values.
fn take_params(text: &str, names: &[&str]) -> (String, BTreeMap<String, String>) {
    let mut taken = BTreeMap::new();
    let mut keep = |pair: &str| match pair.split_once('=') {
        Some((k, v)) if names.contains(&k) => {
            taken.insert(k.to_string(), percent_decode(v));
            false
        }
        _ => true,
    };
    let rest = if text.contains("://") {
        match text.split_once('?') {
            Some((base, query)) => {
                let kept: Vec<&str> = query.split('&').filter(|p| !p.is_empty() && keep(p)).collect();
                if kept.is_empty() {
                    base.to_string()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
            None => text.to_string(),
        }
    } else {
        text.split_whitespace().filter(|p| keep(p)).collect::<Vec<_>>().join(" ")
    };
    (rest, taken)
}

pub fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = (bytes[i] == b'%' && i + 2 < bytes.len())
            .then(|| std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok()))
            .flatten();
        match hex {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl fmt::Debug for DbUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DbUri({})", self.redacted())
    }
}

pub fn redact_password(uri: &str) -> String {
    if let Some(scheme_end) = uri.find("://") {
        let rest = &uri[scheme_end + 3..];
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let mut redacted = uri[..scheme_end + 3].to_string();
        match rest[..authority_end].rfind('@') {
            Some(at) => {
                let userinfo = &rest[..at];
                match userinfo.find(':') {
                    Some(colon) => {
                        redacted.push_str(&format!("{}:***{}", &userinfo[..colon], &rest[at..authority_end]))
                    }
                    None => redacted.push_str(&rest[..authority_end]),
                }
            }
            None => redacted.push_str(&rest[..authority_end]),
        }
        // `?password=...` is a password too (libpq and tokio-postgres accept it there).
        let tail = &rest[authority_end..];
        match tail.split_once('?') {
            Some((path, query)) => {
                let params: Vec<String> = query
                    .split('&')
                    .map(|pair| match pair.split_once('=') {
                        Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
                        _ => pair.to_string(),
                    })
                    .collect();
                redacted.push_str(&format!("{path}?{}", params.join("&")));
            }
            None => redacted.push_str(tail),
        }
        return redacted;
    }
    redact_conninfo_password(uri)
}

/// `password=x`, `password = 'x y'` (with `\'` escapes) in libpq's key/value form become `***`.
fn redact_conninfo_password(conninfo: &str) -> String {
    let mut out = String::with_capacity(conninfo.len());
    let mut rest = conninfo;
    while let Some(found) = find_key(rest, "password") {
        let (before, after_key) = rest.split_at(found);
        out.push_str(before);
        let after_key = &after_key["password".len()..];
        let Some(after_eq) = after_key.trim_start().strip_prefix('=') else {
            out.push_str("password");
            rest = after_key;
            continue;
        };
        out.push_str("password=***");
        let value = after_eq.trim_start();
        rest = match value.strip_prefix('\'') {
            Some(quoted) => {
                let mut end = quoted.len();
                let mut escaped = false;
                for (i, c) in quoted.char_indices() {
                    match (escaped, c) {
                        (true, _) => escaped = false,
                        (false, '\\') => escaped = true,
                        (false, '\'') => {
                            end = i + 1;
                            break;
                        }
                        _ => {}
                    }
                }
                &quoted[end.min(quoted.len())..]
            }
            None => &value[value.find(char::is_whitespace).unwrap_or(value.len())..],
        };
    }
    out.push_str(rest);
    out
}

/// Where `key` starts as a whole word (at the start or after whitespace).
fn find_key(text: &str, key: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = text[from..].find(key).map(|i| i + from) {
        let starts_word = i == 0 || text[..i].ends_with(char::is_whitespace);
        let rest = text[i + key.len()..].trim_start();
        if starts_word && rest.starts_with('=') {
            return Some(i);
        }
        from = i + key.len();
    }
    None
}

#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub upstream: UpstreamUrl,
    pub db_uri: DbUri,
    pub db_channel: String,
    /// One admin URL per PostgREST instance behind `upstream` (replicas behind a balancer).
    pub upstream_admin: Vec<UpstreamUrl>,
    pub upstream_ca_file: Option<PathBuf>,
    /// Gateway mode: requests under this prefix are REST requests (prefix stripped).
    pub rest_prefix: Option<String>,
    pub passthrough_upstream: Option<UpstreamUrl>,
    pub admin_listen: Option<SocketAddr>,
    pub trusted_proxies: Vec<crate::forwarded::IpNet>,
    pub heal_deadline: Duration,
    pub replay_body_limit: usize,
    pub retry_backoff: Duration,
    pub admin_poll: Duration,
    pub db_schemas: Vec<String>,
    pub catalog_check: bool,
    pub catalog_recheck: Duration,
    pub reload_min_interval: Duration,
    pub upstream_connect_timeout: Duration,
    pub upstream_timeout: Duration,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub max_header_bytes: usize,
    /// None: no limit.
    pub max_body_bytes: Option<u64>,
    pub shutdown_timeout: Duration,
    pub workers: usize,
    pub log_format: LogFormat,
    pub log_level: String,
}

/// A configuration problem, named by its key. Displays as one line.
#[derive(Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub problem: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration: {}: {}", self.key, self.problem)
    }
}

impl std::error::Error for ConfigError {}

fn error(key: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError { key: key.to_string(), problem: problem.into() }
}

/// Raw values by canonical key, before parsing.
pub type RawConfig = BTreeMap<String, String>;

/// Keys of a TOML file, mapped to canonical names. Unknown keys are errors: a typo must not be
/// silently ignored.
pub fn raw_from_toml(path: &Path) -> Result<RawConfig, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| error("PGRST_GUARD_CONFIG", format!("cannot read {}: {e}", path.display())))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| error("PGRST_GUARD_CONFIG", format!("{}: {}", path.display(), e.message())))?;
    let mut raw = RawConfig::new();
    for (name, value) in table {
        let key = KEYS
            .iter()
            .find(|k| k.toml == name)
            .ok_or_else(|| error("PGRST_GUARD_CONFIG", format!("{}: unknown key {name:?}", path.display())))?;
        let text = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => return Err(error(key.env, format!("expected a string or a number, got {}", other.type_str()))),
        };
        raw.insert(key.env.to_string(), text);
    }
    Ok(raw)
}

/// `PGRST_GUARD_*` variables from an environment listing.
pub fn raw_from_env(vars: impl IntoIterator<Item = (String, String)>) -> RawConfig {
    vars.into_iter().filter(|(k, _)| KEYS.iter().any(|key| key.env == k)).collect()
}

impl Config {
    /// Parses and validates the merged raw values; defaults fill what is missing.
    pub fn from_raw(raw: &RawConfig) -> Result<Config, ConfigError> {
        let get = |env: &str| -> Option<String> {
            raw.get(env)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
                .or_else(|| KEYS.iter().find(|k| k.env == env).and_then(|k| k.default).map(str::to_string))
        };
        let required = |env: &str| get(env).ok_or_else(|| error(env, "is required"));
        let socket = |env: &str, value: String| {
            value
                .parse::<SocketAddr>()
                .map_err(|_| error(env, format!("expected host:port with an IP address, got {value:?}")))
        };
        let number = |env: &str| -> Result<u64, ConfigError> {
            let value = required(env)?;
            value.parse::<u64>().map_err(|_| error(env, format!("expected a whole number, got {value:?}")))
        };
        let millis = |env: &str| -> Result<Duration, ConfigError> {
            match number(env)? {
                0 => Err(error(env, "must be greater than 0")),
                n => Ok(Duration::from_millis(n)),
            }
        };

        let listen = socket("PGRST_GUARD_LISTEN", required("PGRST_GUARD_LISTEN")?)?;
        let supabase = get("PGRST_GUARD_SUPABASE_URL")
            .map(|v| UpstreamUrl::parse(&v).map_err(|p| error("PGRST_GUARD_SUPABASE_URL", p)))
            .transpose()?;
        // The Supabase shorthand fills what is not set explicitly.
        let explicit = |env: &str| raw.get(env).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        let upstream_text = match (&supabase, explicit("PGRST_GUARD_UPSTREAM")) {
            (_, Some(text)) => text,
            (Some(project), None) => format!("{project}/rest/v1"),
            (None, None) => required("PGRST_GUARD_UPSTREAM")?,
        };
        let rest_prefix = match (&supabase, explicit("PGRST_GUARD_REST_PREFIX")) {
            (_, Some(prefix)) => Some(prefix),
            (Some(_), None) => Some("/rest/v1".to_string()),
            (None, None) => None,
        };
        let rest_prefix = match rest_prefix {
            Some(prefix) if !prefix.starts_with('/') || prefix.contains(['?', '#']) => {
                return Err(error(
                    "PGRST_GUARD_REST_PREFIX",
                    format!("expected a path such as /rest/v1, got {prefix:?}"),
                ))
            }
            Some(prefix) => Some(prefix.trim_end_matches('/').to_string()).filter(|p| !p.is_empty()),
            None => None,
        };
        let passthrough_upstream = match (&supabase, explicit("PGRST_GUARD_PASSTHROUGH_UPSTREAM")) {
            (_, Some(text)) => {
                Some(UpstreamUrl::parse(&text).map_err(|p| error("PGRST_GUARD_PASSTHROUGH_UPSTREAM", p))?)
            }
            (Some(project), None) => Some(project.clone()),
            (None, None) => None,
        };
        if passthrough_upstream.is_some() && rest_prefix.is_none() {
            return Err(error(
                "PGRST_GUARD_PASSTHROUGH_UPSTREAM",
                "needs PGRST_GUARD_REST_PREFIX, which says which paths are REST requests",
            ));
        }
        let upstream = UpstreamUrl::parse(&upstream_text).map_err(|p| error("PGRST_GUARD_UPSTREAM", p))?;
        let db_uri = DbUri::parse(&required("PGRST_GUARD_DB_URI")?).map_err(|p| error("PGRST_GUARD_DB_URI", p))?;
        let db_channel = required("PGRST_GUARD_DB_CHANNEL")?;
        let upstream_ca_file = get("PGRST_GUARD_UPSTREAM_CA_FILE").map(PathBuf::from);
        if let Some(path) = &upstream_ca_file {
            crate::tls::root_store(Some(path)).map_err(|p| error("PGRST_GUARD_UPSTREAM_CA_FILE", p))?;
        }
        let upstream_admin = get("PGRST_GUARD_UPSTREAM_ADMIN")
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|url| !url.is_empty())
                    .map(|url| UpstreamUrl::parse(url).map_err(|p| error("PGRST_GUARD_UPSTREAM_ADMIN", p)))
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?
            .unwrap_or_default();
        let trusted_proxies = get("PGRST_GUARD_TRUSTED_PROXIES")
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|net| !net.is_empty())
                    .map(|net| net.parse().map_err(|p: String| error("PGRST_GUARD_TRUSTED_PROXIES", p)))
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?
            .unwrap_or_default();
        let admin_listen =
            get("PGRST_GUARD_ADMIN_LISTEN").map(|v| socket("PGRST_GUARD_ADMIN_LISTEN", v)).transpose()?;
        if admin_listen == Some(listen) && listen.port() != 0 {
            return Err(error("PGRST_GUARD_ADMIN_LISTEN", "must differ from PGRST_GUARD_LISTEN"));
        }
        let log_format = match required("PGRST_GUARD_LOG_FORMAT")?.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => return Err(error("PGRST_GUARD_LOG_FORMAT", format!("expected text or json, got {other:?}"))),
        };
        let db_schemas: Vec<String> = required("PGRST_GUARD_DB_SCHEMAS")?
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        if db_schemas.is_empty() {
            return Err(error("PGRST_GUARD_DB_SCHEMAS", "needs at least one schema"));
        }
        let catalog_check = match required("PGRST_GUARD_CATALOG_CHECK")?.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => true,
            "false" | "0" | "no" | "off" => false,
            other => return Err(error("PGRST_GUARD_CATALOG_CHECK", format!("expected true or false, got {other:?}"))),
        };
        let log_level = required("PGRST_GUARD_LOG_LEVEL")?;
        if tracing_subscriber::EnvFilter::try_new(&log_level).is_err() {
            return Err(error("PGRST_GUARD_LOG_LEVEL", format!("not a valid log filter: {log_level:?}")));
        }
        Ok(Config {
            listen,
            upstream,
            db_uri,
            db_channel,
            upstream_admin,
            trusted_proxies,
            upstream_ca_file,
            rest_prefix,
            passthrough_upstream,
            admin_listen,
            heal_deadline: millis("PGRST_GUARD_HEAL_DEADLINE_MS")?,
            replay_body_limit: number("PGRST_GUARD_REPLAY_BODY_LIMIT")? as usize,
            retry_backoff: millis("PGRST_GUARD_RETRY_BACKOFF_MS")?,
            admin_poll: millis("PGRST_GUARD_ADMIN_POLL_MS")?,
            db_schemas,
            catalog_check,
            catalog_recheck: Duration::from_millis(number("PGRST_GUARD_CATALOG_RECHECK_MS")?),
            reload_min_interval: Duration::from_millis(number("PGRST_GUARD_RELOAD_MIN_INTERVAL_MS")?),
            upstream_connect_timeout: millis("PGRST_GUARD_UPSTREAM_CONNECT_TIMEOUT_MS")?,
            upstream_timeout: millis("PGRST_GUARD_UPSTREAM_TIMEOUT_MS")?,
            header_read_timeout: millis("PGRST_GUARD_HEADER_READ_TIMEOUT_MS")?,
            idle_timeout: millis("PGRST_GUARD_IDLE_TIMEOUT_MS")?,
            max_connections: match number("PGRST_GUARD_MAX_CONNECTIONS")? {
                0 => return Err(error("PGRST_GUARD_MAX_CONNECTIONS", "must be greater than 0")),
                n => n as usize,
            },
            max_header_bytes: match number("PGRST_GUARD_MAX_HEADER_BYTES")? {
                n if n < 1024 => return Err(error("PGRST_GUARD_MAX_HEADER_BYTES", "must be at least 1024")),
                n => n as usize,
            },
            max_body_bytes: Some(number("PGRST_GUARD_MAX_BODY_BYTES")?).filter(|n| *n > 0),
            shutdown_timeout: millis("PGRST_GUARD_SHUTDOWN_TIMEOUT_MS")?,
            workers: match number("PGRST_GUARD_WORKERS")? {
                0 => std::thread::available_parallelism().map(usize::from).unwrap_or(1),
                n if n > 1024 => return Err(error("PGRST_GUARD_WORKERS", "at most 1024")),
                n => n as usize,
            },
            log_format,
            log_level,
        })
    }

    /// Merges file < environment < flags, then validates.
    pub fn load(config_file: Option<&Path>, env: RawConfig, flags: RawConfig) -> Result<Config, ConfigError> {
        let mut raw = match config_file {
            Some(path) => raw_from_toml(path)?,
            None => RawConfig::new(),
        };
        raw.extend(env);
        raw.extend(flags);
        Config::from_raw(&raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(pairs: &[(&str, &str)]) -> RawConfig {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_fill_everything_but_the_database() {
        let config = Config::from_raw(&raw(&[("PGRST_GUARD_DB_URI", "postgres://u:secret@db/postgres")])).unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(config.db_channel, "pgrst");
        assert_eq!(config.heal_deadline, Duration::from_secs(10));
        assert_eq!(config.replay_body_limit, 1 << 20);
        assert!(!format!("{config:?}").contains("secret"));
    }

    #[test]
    fn errors_name_the_key_and_hide_secrets() {
        let e = Config::from_raw(&raw(&[])).unwrap_err();
        assert_eq!(e.to_string(), "invalid configuration: PGRST_GUARD_DB_URI: is required");
        let e = Config::from_raw(&raw(&[
            ("PGRST_GUARD_DB_URI", "postgres://u:pw@h/db"),
            ("PGRST_GUARD_UPSTREAM", "ftp://x"),
        ]))
        .unwrap_err();
        assert_eq!(e.key, "PGRST_GUARD_UPSTREAM");
        let e = Config::from_raw(&raw(&[("PGRST_GUARD_DB_URI", "postgres://u:hunter2@h:notaport/db")])).unwrap_err();
        assert_eq!(e.key, "PGRST_GUARD_DB_URI");
        assert!(!e.to_string().contains("hunter2"));
    }

    #[test]
    fn the_supabase_shorthand_sets_gateway_mode() {
        let c = Config::from_raw(&raw(&[
            ("PGRST_GUARD_DB_URI", "postgres://u@h/db"),
            ("PGRST_GUARD_SUPABASE_URL", "https://abc.supabase.co"),
        ]))
        .unwrap();
        assert_eq!(c.upstream.to_string(), "https://abc.supabase.co/rest/v1");
        assert_eq!(c.rest_prefix.as_deref(), Some("/rest/v1"));
        assert_eq!(c.passthrough_upstream.unwrap().to_string(), "https://abc.supabase.co");
        let e = Config::from_raw(&raw(&[
            ("PGRST_GUARD_DB_URI", "postgres://u@h/db"),
            ("PGRST_GUARD_PASSTHROUGH_UPSTREAM", "https://abc.supabase.co"),
        ]))
        .unwrap_err();
        assert_eq!(e.key, "PGRST_GUARD_PASSTHROUGH_UPSTREAM");
    }

    #[test]
    fn upstream_keeps_its_path_prefix() {
        let u = UpstreamUrl::parse("https://abc.supabase.co/rest/v1/").unwrap();
        assert_eq!(u.path_prefix, "/rest/v1");
        assert_eq!(u.to_string(), "https://abc.supabase.co/rest/v1");
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_password("postgres://me:pw@host:5432/db?sslmode=require"),
            "postgres://me:***@host:5432/db?sslmode=require"
        );
        assert_eq!(redact_password("host=h password=pw user=u"), "host=h password=*** user=u");
        assert_eq!(redact_password("postgres://me@host/db"), "postgres://me@host/db");
        assert_eq!(
            redact_password("postgres://u@h/db?sslmode=require&password=secret&x=1"),
            "postgres://u@h/db?sslmode=require&password=***&x=1"
        );
        assert_eq!(redact_password("postgresql://u:p@h?password=q"), "postgresql://u:***@h?password=***");
        assert_eq!(redact_password("host=h password = 'a b\\' c' user=u"), "host=h password=*** user=u");
        assert_eq!(redact_password("password=x"), "password=***");
        assert_eq!(redact_password("user=password dbname=d"), "user=password dbname=d");
    }
}
