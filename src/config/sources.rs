//! Where each value came from: the TOML file (read with serde, keeping each key's line), the
//! environment or a flag (both through clap). A bad value is reported with its source.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use super::keys::KEYS;
use super::ConfigError;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    File {
        path: PathBuf,
        line: usize,
    },
    Environment,
    /// The flag as written, e.g. `--listen`.
    Flag(String),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::File { path, line } => write!(f, "set in {} line {line}", path.display()),
            Source::Environment => write!(f, "set in the environment"),
            Source::Flag(flag) => write!(f, "set by {flag}"),
        }
    }
}

/// A raw value and where it was set (None: given by a program, e.g. the tests or the sandbox).
#[derive(Clone, Debug)]
pub struct Setting {
    pub value: String,
    pub source: Option<Source>,
}

/// Raw values by canonical key (`PGRST_GUARD_LISTEN`), before parsing.
pub type Settings = BTreeMap<String, Setting>;

/// The keys of a TOML file. Unknown keys are errors: a typo must not be silently ignored.
pub fn from_toml(path: &Path) -> Result<Settings, ConfigError> {
    let file_error = |problem: String| ConfigError::new("PGRST_GUARD_CONFIG", problem);
    let text = std::fs::read_to_string(path).map_err(|e| file_error(format!("cannot read {}: {e}", path.display())))?;
    let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
    let table: BTreeMap<String, toml::Spanned<toml::Value>> = toml::from_str(&text).map_err(|e| {
        let at = e.span().map(|span| format!(" line {}", line_of(span.start))).unwrap_or_default();
        file_error(format!("{}{at}: {}", path.display(), e.message()))
    })?;
    let mut settings = Settings::new();
    for (name, value) in table {
        let line = line_of(value.span().start);
        let Some(key) = KEYS.iter().find(|k| k.toml == name) else {
            return Err(file_error(format!("{} line {line}: unknown key {name:?}", path.display())));
        };
        let source = Source::File { path: path.to_path_buf(), line };
        let value = match value.into_inner() {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => {
                return Err(ConfigError::new(
                    key.env,
                    format!("expected a string or a number, got {}", other.type_str()),
                )
                .from_source(Some(source)))
            }
        };
        settings.insert(key.env.to_string(), Setting { value, source: Some(source) });
    }
    Ok(settings)
}

/// Values a program gives directly, with no source to report.
pub fn given(raw: &BTreeMap<String, String>) -> Settings {
    raw.iter().map(|(key, value)| (key.clone(), Setting { value: value.clone(), source: None })).collect()
}
