//! The PostgreSQL connection string for NOTIFY: parsed once, with its password kept out of every
//! log line and error message.
//!
//! tokio-postgres parses the string; the redaction stays hand-written because no crate of this field
//! redacts both URI and libpq key/value forms (`password = 'a b'` included).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::tls::SslMode;

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
            taken.insert(k.to_string(), percent_encoding::percent_decode_str(v).decode_utf8_lossy().into_owned());
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

#[cfg(test)]
mod tests {
    use tokio_postgres::config::{Host, TargetSessionAttrs};

    use super::*;

    // A failover-aware URI reaches the primary among several hosts: all of it must reach tokio-postgres.
    #[test]
    fn a_multi_host_uri_asking_for_the_primary_keeps_every_host() {
        for text in [
            "postgresql://guard:secret@10.0.0.1:5433,10.0.0.2:5434/app?target_session_attrs=read-write&sslmode=disable",
            "host=10.0.0.1,10.0.0.2 port=5433,5434 user=guard password=secret dbname=app target_session_attrs=read-write",
        ] {
            let uri = DbUri::parse(text).expect("a multi-host URI");
            let config = uri.pg_config();
            let hosts = [Host::Tcp("10.0.0.1".to_string()), Host::Tcp("10.0.0.2".to_string())];
            assert_eq!(config.get_hosts(), hosts.as_slice(), "{text}");
            assert_eq!(config.get_ports(), [5433, 5434].as_slice(), "{text}");
            assert_eq!(config.get_target_session_attrs(), TargetSessionAttrs::ReadWrite, "{text}");
            assert!(!uri.redacted().contains("secret"), "{}", uri.redacted());
        }
    }
}
