//! One typed [`Config`], assembled from a TOML file, `PGRST_GUARD_*` environment variables and
//! command-line flags (later sources win: file < environment < flags), validated once at start.
//!
//! Every source is first reduced to a map of canonical key names (`PGRST_GUARD_LISTEN`, ...) to raw
//! strings, so parsing and validation are one code path and tests never touch the process
//! environment.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use http::uri::{Authority, Scheme, Uri};

/// A configuration key: its canonical environment name, the TOML name, the CLI flag, the default
/// and what it is for. `--help` and `config/pgrst-guard.toml` document the same list.
pub struct Key {
    pub env: &'static str,
    pub toml: &'static str,
    pub default: Option<&'static str>,
    pub help: &'static str,
}

pub const KEYS: &[Key] = &[
    Key {
        env: "PGRST_GUARD_LISTEN",
        toml: "listen",
        default: Some("127.0.0.1:8080"),
        help: "address the proxy listens on (host:port)",
    },
    Key {
        env: "PGRST_GUARD_UPSTREAM",
        toml: "upstream",
        default: Some("http://127.0.0.1:3000"),
        help: "PostgREST base URL, http or https, may carry a path prefix such as /rest/v1",
    },
    Key {
        env: "PGRST_GUARD_DB_URI",
        toml: "db_uri",
        default: None,
        help: "PostgreSQL URI used to send the reload NOTIFY (required)",
    },
    Key {
        env: "PGRST_GUARD_DB_CHANNEL",
        toml: "db_channel",
        default: Some("pgrst"),
        help: "channel PostgREST listens on (its db-channel)",
    },
    Key {
        env: "PGRST_GUARD_UPSTREAM_ADMIN",
        toml: "upstream_admin",
        default: None,
        help: "PostgREST admin-server URL; its /metrics tells when a reload finished",
    },
    Key {
        env: "PGRST_GUARD_ADMIN_LISTEN",
        toml: "admin_listen",
        default: None,
        help: "address of the guard's own /healthz, /readyz and /metrics",
    },
    Key {
        env: "PGRST_GUARD_HEAL_DEADLINE_MS",
        toml: "heal_deadline_ms",
        default: Some("10000"),
        help: "longest wait for a reload before the original error goes to the client",
    },
    Key {
        env: "PGRST_GUARD_REPLAY_BODY_LIMIT",
        toml: "replay_body_limit",
        default: Some("1048576"),
        help: "largest request body (bytes) kept for a replay; bigger ones stream through unhealed",
    },
    Key {
        env: "PGRST_GUARD_RETRY_BACKOFF_MS",
        toml: "retry_backoff_ms",
        default: Some("25"),
        help: "first back-off before a replay when reload completion cannot be observed; doubles up to 1 s",
    },
    Key {
        env: "PGRST_GUARD_ADMIN_POLL_MS",
        toml: "admin_poll_ms",
        default: Some("10"),
        help: "how often the admin /metrics is polled while a reload is awaited",
    },
    Key {
        env: "PGRST_GUARD_DB_SCHEMAS",
        toml: "db_schemas",
        default: Some("public"),
        help: "PostgREST's db-schemas, comma-separated; the first is the default for unqualified names",
    },
    Key {
        env: "PGRST_GUARD_CATALOG_CHECK",
        toml: "catalog_check",
        default: Some("true"),
        help: "ask the catalog whether a missing object exists before reloading (true or false)",
    },
    Key {
        env: "PGRST_GUARD_CATALOG_REMEMBER_MS",
        toml: "catalog_remember_ms",
        default: Some("5000"),
        help: "how long a 'does not exist' answer of the catalog check is remembered",
    },
    Key {
        env: "PGRST_GUARD_RELOAD_MIN_INTERVAL_MS",
        toml: "reload_min_interval_ms",
        default: Some("1000"),
        help: "reload budget: at most one NOTIFY from this guard per interval",
    },
    Key {
        env: "PGRST_GUARD_UPSTREAM_CONNECT_TIMEOUT_MS",
        toml: "upstream_connect_timeout_ms",
        default: Some("3000"),
        help: "upstream TCP connect timeout; past it the client gets 502",
    },
    Key {
        env: "PGRST_GUARD_UPSTREAM_TIMEOUT_MS",
        toml: "upstream_timeout_ms",
        default: Some("60000"),
        help: "time for the upstream to start answering; past it the client gets 504",
    },
    Key {
        env: "PGRST_GUARD_HEADER_READ_TIMEOUT_MS",
        toml: "header_read_timeout_ms",
        default: Some("30000"),
        help: "time a client has to send its request head; then 408",
    },
    Key {
        env: "PGRST_GUARD_MAX_CONNECTIONS",
        toml: "max_connections",
        default: Some("10000"),
        help: "open client connections at most; one more gets 503",
    },
    Key {
        env: "PGRST_GUARD_MAX_HEADER_BYTES",
        toml: "max_header_bytes",
        default: Some("32768"),
        help: "largest request head (URI and headers); larger gets 431",
    },
    Key {
        env: "PGRST_GUARD_MAX_BODY_BYTES",
        toml: "max_body_bytes",
        default: Some("0"),
        help: "largest request body; larger gets 413 (0: no limit)",
    },
    Key {
        env: "PGRST_GUARD_SHUTDOWN_TIMEOUT_MS",
        toml: "shutdown_timeout_ms",
        default: Some("30000"),
        help: "after SIGTERM/SIGINT, how long open requests and heals get to finish",
    },
    Key { env: "PGRST_GUARD_LOG_FORMAT", toml: "log_format", default: Some("text"), help: "log format: text or json" },
    Key {
        env: "PGRST_GUARD_LOG_LEVEL",
        toml: "log_level",
        default: Some("info"),
        help: "log filter, e.g. info or pgrst_guard=debug",
    },
];

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
pub struct DbUri(String);

impl DbUri {
    pub fn parse(text: &str) -> Result<DbUri, String> {
        tokio_postgres::Config::from_str(text).map(|_| DbUri(text.to_string())).map_err(|_| {
            "not a valid PostgreSQL connection string (value not shown: it may hold a password)".to_string()
        })
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URI with any password replaced by `***`.
    pub fn redacted(&self) -> String {
        redact_password(&self.0)
    }
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
        if let Some(at) = rest[..authority_end].rfind('@') {
            let userinfo = &rest[..at];
            if let Some(colon) = userinfo.find(':') {
                return format!("{}{}:***{}", &uri[..scheme_end + 3], &userinfo[..colon], &rest[at..]);
            }
        }
        return uri.to_string();
    }
    // key=value form
    uri.split_whitespace()
        .map(|pair| if pair.starts_with("password=") { "password=***" } else { pair })
        .collect::<Vec<_>>()
        .join(" ")
}

#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub upstream: UpstreamUrl,
    pub db_uri: DbUri,
    pub db_channel: String,
    pub upstream_admin: Option<UpstreamUrl>,
    pub admin_listen: Option<SocketAddr>,
    pub heal_deadline: Duration,
    pub replay_body_limit: usize,
    pub retry_backoff: Duration,
    pub admin_poll: Duration,
    pub db_schemas: Vec<String>,
    pub catalog_check: bool,
    pub catalog_remember: Duration,
    pub reload_min_interval: Duration,
    pub upstream_connect_timeout: Duration,
    pub upstream_timeout: Duration,
    pub header_read_timeout: Duration,
    pub max_connections: usize,
    pub max_header_bytes: usize,
    /// None: no limit.
    pub max_body_bytes: Option<u64>,
    pub shutdown_timeout: Duration,
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
        let upstream =
            UpstreamUrl::parse(&required("PGRST_GUARD_UPSTREAM")?).map_err(|p| error("PGRST_GUARD_UPSTREAM", p))?;
        let db_uri = DbUri::parse(&required("PGRST_GUARD_DB_URI")?).map_err(|p| error("PGRST_GUARD_DB_URI", p))?;
        let db_channel = required("PGRST_GUARD_DB_CHANNEL")?;
        let upstream_admin = get("PGRST_GUARD_UPSTREAM_ADMIN")
            .map(|v| UpstreamUrl::parse(&v).map_err(|p| error("PGRST_GUARD_UPSTREAM_ADMIN", p)))
            .transpose()?;
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
            admin_listen,
            heal_deadline: millis("PGRST_GUARD_HEAL_DEADLINE_MS")?,
            replay_body_limit: number("PGRST_GUARD_REPLAY_BODY_LIMIT")? as usize,
            retry_backoff: millis("PGRST_GUARD_RETRY_BACKOFF_MS")?,
            admin_poll: millis("PGRST_GUARD_ADMIN_POLL_MS")?,
            db_schemas,
            catalog_check,
            catalog_remember: Duration::from_millis(number("PGRST_GUARD_CATALOG_REMEMBER_MS")?),
            reload_min_interval: Duration::from_millis(number("PGRST_GUARD_RELOAD_MIN_INTERVAL_MS")?),
            upstream_connect_timeout: millis("PGRST_GUARD_UPSTREAM_CONNECT_TIMEOUT_MS")?,
            upstream_timeout: millis("PGRST_GUARD_UPSTREAM_TIMEOUT_MS")?,
            header_read_timeout: millis("PGRST_GUARD_HEADER_READ_TIMEOUT_MS")?,
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
    }
}
