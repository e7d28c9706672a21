//! One typed [`Config`], assembled from a TOML file, `PGRST_GUARD_*` environment variables and
//! command-line flags (later sources win: file < environment < flags), validated once at start.
//!
//! The parts: [`keys`] is the one list of keys; [`sources`] reads the file (serde) and records
//! where each value was set (file line, environment, flag — clap reads the last two); this module
//! parses and validates; [`upstream_url`] and [`db_uri`] are the two URL types, the second keeping
//! its password out of every message.

pub mod db_uri;
pub mod keys;
pub mod sources;
pub mod upstream_url;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use db_uri::{redact_password, DbUri};
pub use keys::{toml_template, Key, KEYS};
pub use sources::{Setting, Settings, Source};
pub use upstream_url::UpstreamUrl;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub upstream: UpstreamUrl,
    pub db_uri: DbUri,
    pub db_channel: String,
    pub db_timeout: Duration,
    pub db_check_interval: Duration,
    pub db_keepalive_idle: Duration,
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
    pub replay_memory_limit: usize,
    pub retry_backoff: Duration,
    pub admin_poll: Duration,
    pub db_schemas: Vec<String>,
    pub catalog_check: bool,
    /// Hold writes until PostgREST's cache is shown to hold their targets' current definitions.
    pub write_barrier: bool,
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

/// A configuration problem, named by its key and, when known, where the bad value was set.
/// Displays as one line.
#[derive(Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub problem: String,
    pub source: Option<Source>,
}

impl ConfigError {
    pub fn new(key: &str, problem: impl Into<String>) -> ConfigError {
        ConfigError { key: key.to_string(), problem: problem.into(), source: None }
    }

    pub fn from_source(mut self, source: Option<Source>) -> ConfigError {
        self.source = source;
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Some(source) => write!(f, "invalid configuration: {} ({source}): {}", self.key, self.problem),
            None => write!(f, "invalid configuration: {}: {}", self.key, self.problem),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Raw values by canonical key, as a program gives them.
pub type RawConfig = BTreeMap<String, String>;

impl Config {
    /// Parses and validates values a program gives; defaults fill what is missing.
    pub fn from_raw(raw: &RawConfig) -> Result<Config, ConfigError> {
        Config::from_settings(&sources::given(raw))
    }

    /// Parses and validates the merged settings; an error names where its value was set.
    pub fn from_settings(settings: &Settings) -> Result<Config, ConfigError> {
        let raw: RawConfig = settings.iter().map(|(key, setting)| (key.clone(), setting.value.clone())).collect();
        Config::validate(&raw).map_err(|e| {
            let source = settings.get(&e.key).and_then(|setting| setting.source.clone());
            e.from_source(source)
        })
    }

    fn validate(raw: &RawConfig) -> Result<Config, ConfigError> {
        let get = |env: &str| -> Option<String> {
            raw.get(env)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
                .or_else(|| KEYS.iter().find(|k| k.env == env).and_then(|k| k.default).map(str::to_string))
        };
        let required = |env: &str| get(env).ok_or_else(|| ConfigError::new(env, "is required"));
        let socket = |env: &str, value: String| {
            value
                .parse::<SocketAddr>()
                .map_err(|_| ConfigError::new(env, format!("expected host:port with an IP address, got {value:?}")))
        };
        let number = |env: &str| -> Result<u64, ConfigError> {
            let value = required(env)?;
            value.parse::<u64>().map_err(|_| ConfigError::new(env, format!("expected a whole number, got {value:?}")))
        };
        let millis = |env: &str| -> Result<Duration, ConfigError> {
            match number(env)? {
                0 => Err(ConfigError::new(env, "must be greater than 0")),
                n => Ok(Duration::from_millis(n)),
            }
        };

        let listen = socket("PGRST_GUARD_LISTEN", required("PGRST_GUARD_LISTEN")?)?;
        let supabase = get("PGRST_GUARD_SUPABASE_URL")
            .map(|v| UpstreamUrl::parse(&v).map_err(|p| ConfigError::new("PGRST_GUARD_SUPABASE_URL", p)))
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
                return Err(ConfigError::new(
                    "PGRST_GUARD_REST_PREFIX",
                    format!("expected a path such as /rest/v1, got {prefix:?}"),
                ))
            }
            Some(prefix) => Some(prefix.trim_end_matches('/').to_string()).filter(|p| !p.is_empty()),
            None => None,
        };
        let passthrough_upstream = match (&supabase, explicit("PGRST_GUARD_PASSTHROUGH_UPSTREAM")) {
            (_, Some(text)) => {
                Some(UpstreamUrl::parse(&text).map_err(|p| ConfigError::new("PGRST_GUARD_PASSTHROUGH_UPSTREAM", p))?)
            }
            (Some(project), None) => Some(project.clone()),
            (None, None) => None,
        };
        if passthrough_upstream.is_some() && rest_prefix.is_none() {
            return Err(ConfigError::new(
                "PGRST_GUARD_PASSTHROUGH_UPSTREAM",
                "needs PGRST_GUARD_REST_PREFIX, which says which paths are REST requests",
            ));
        }
        let upstream = UpstreamUrl::parse(&upstream_text).map_err(|p| ConfigError::new("PGRST_GUARD_UPSTREAM", p))?;
        let db_uri =
            DbUri::parse(&required("PGRST_GUARD_DB_URI")?).map_err(|p| ConfigError::new("PGRST_GUARD_DB_URI", p))?;
        let db_channel = required("PGRST_GUARD_DB_CHANNEL")?;
        let upstream_ca_file = get("PGRST_GUARD_UPSTREAM_CA_FILE").map(PathBuf::from);
        if let Some(path) = &upstream_ca_file {
            crate::tls::root_store(Some(path)).map_err(|p| ConfigError::new("PGRST_GUARD_UPSTREAM_CA_FILE", p))?;
        }
        let upstream_admin = get("PGRST_GUARD_UPSTREAM_ADMIN")
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|url| !url.is_empty())
                    .map(|url| UpstreamUrl::parse(url).map_err(|p| ConfigError::new("PGRST_GUARD_UPSTREAM_ADMIN", p)))
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?
            .unwrap_or_default();
        let trusted_proxies = get("PGRST_GUARD_TRUSTED_PROXIES")
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|net| !net.is_empty())
                    .map(|net| net.parse().map_err(|p: String| ConfigError::new("PGRST_GUARD_TRUSTED_PROXIES", p)))
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?
            .unwrap_or_default();
        let admin_listen =
            get("PGRST_GUARD_ADMIN_LISTEN").map(|v| socket("PGRST_GUARD_ADMIN_LISTEN", v)).transpose()?;
        if admin_listen == Some(listen) && listen.port() != 0 {
            return Err(ConfigError::new("PGRST_GUARD_ADMIN_LISTEN", "must differ from PGRST_GUARD_LISTEN"));
        }
        let log_format = match required("PGRST_GUARD_LOG_FORMAT")?.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(ConfigError::new("PGRST_GUARD_LOG_FORMAT", format!("expected text or json, got {other:?}")))
            }
        };
        let db_schemas: Vec<String> = required("PGRST_GUARD_DB_SCHEMAS")?
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        if db_schemas.is_empty() {
            return Err(ConfigError::new("PGRST_GUARD_DB_SCHEMAS", "needs at least one schema"));
        }
        let switch = |key: &'static str| -> Result<bool, ConfigError> {
            match required(key)?.to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => Ok(true),
                "false" | "0" | "no" | "off" => Ok(false),
                other => Err(ConfigError::new(key, format!("expected true or false, got {other:?}"))),
            }
        };
        let catalog_check = switch("PGRST_GUARD_CATALOG_CHECK")?;
        let write_barrier = switch("PGRST_GUARD_WRITE_BARRIER")?;
        let log_level = required("PGRST_GUARD_LOG_LEVEL")?;
        if tracing_subscriber::EnvFilter::try_new(&log_level).is_err() {
            return Err(ConfigError::new("PGRST_GUARD_LOG_LEVEL", format!("not a valid log filter: {log_level:?}")));
        }
        Ok(Config {
            listen,
            upstream,
            db_uri,
            db_channel,
            db_timeout: millis("PGRST_GUARD_DB_TIMEOUT_MS")?,
            db_check_interval: millis("PGRST_GUARD_DB_CHECK_INTERVAL_MS")?,
            db_keepalive_idle: match millis("PGRST_GUARD_DB_KEEPALIVE_IDLE_MS")? {
                idle if idle < Duration::from_secs(1) => {
                    return Err(ConfigError::new("PGRST_GUARD_DB_KEEPALIVE_IDLE_MS", "must be at least 1000"))
                }
                idle => idle,
            },
            upstream_admin,
            trusted_proxies,
            upstream_ca_file,
            rest_prefix,
            passthrough_upstream,
            admin_listen,
            heal_deadline: millis("PGRST_GUARD_HEAL_DEADLINE_MS")?,
            replay_body_limit: number("PGRST_GUARD_REPLAY_BODY_LIMIT")? as usize,
            replay_memory_limit: number("PGRST_GUARD_REPLAY_MEMORY_LIMIT")? as usize,
            retry_backoff: millis("PGRST_GUARD_RETRY_BACKOFF_MS")?,
            admin_poll: millis("PGRST_GUARD_ADMIN_POLL_MS")?,
            db_schemas,
            catalog_check,
            write_barrier,
            catalog_recheck: Duration::from_millis(number("PGRST_GUARD_CATALOG_RECHECK_MS")?),
            reload_min_interval: Duration::from_millis(number("PGRST_GUARD_RELOAD_MIN_INTERVAL_MS")?),
            upstream_connect_timeout: millis("PGRST_GUARD_UPSTREAM_CONNECT_TIMEOUT_MS")?,
            upstream_timeout: millis("PGRST_GUARD_UPSTREAM_TIMEOUT_MS")?,
            header_read_timeout: millis("PGRST_GUARD_HEADER_READ_TIMEOUT_MS")?,
            idle_timeout: millis("PGRST_GUARD_IDLE_TIMEOUT_MS")?,
            max_connections: match number("PGRST_GUARD_MAX_CONNECTIONS")? {
                0 => return Err(ConfigError::new("PGRST_GUARD_MAX_CONNECTIONS", "must be greater than 0")),
                n => n as usize,
            },
            max_header_bytes: match number("PGRST_GUARD_MAX_HEADER_BYTES")? {
                n if n < 1024 => return Err(ConfigError::new("PGRST_GUARD_MAX_HEADER_BYTES", "must be at least 1024")),
                n => n as usize,
            },
            max_body_bytes: Some(number("PGRST_GUARD_MAX_BODY_BYTES")?).filter(|n| *n > 0),
            shutdown_timeout: millis("PGRST_GUARD_SHUTDOWN_TIMEOUT_MS")?,
            workers: match number("PGRST_GUARD_WORKERS")? {
                0 => std::thread::available_parallelism().map(usize::from).unwrap_or(1),
                n if n > 1024 => return Err(ConfigError::new("PGRST_GUARD_WORKERS", "at most 1024")),
                n => n as usize,
            },
            log_format,
            log_level,
        })
    }

    /// Merges the file with `overrides` (the environment and flags, as clap read them), then
    /// validates.
    pub fn load(config_file: Option<&Path>, overrides: Settings) -> Result<Config, ConfigError> {
        let mut settings = match config_file {
            Some(path) => sources::from_toml(path)?,
            None => Settings::new(),
        };
        settings.extend(overrides);
        Config::from_settings(&settings)
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
