//! The PostgREST release families the double imitates, and what differs between them.

use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    V14,
    V13,
    V12_2,
    V12_0,
    V11_0,
}

impl Profile {
    pub fn server_header(self) -> &'static str {
        match self {
            Profile::V14 => "postgrest/14.17",
            Profile::V13 => "postgrest/13.0.8",
            Profile::V12_2 => "postgrest/12.2.12",
            Profile::V12_0 => "postgrest/12.0.2",
            Profile::V11_0 => "postgrest/11.0.1",
        }
    }

    /// `Proxy-Status: PostgREST; error=<code>` on errors (v13.0.0, #2967).
    pub fn sends_proxy_status(self) -> bool {
        matches!(self, Profile::V14 | Profile::V13)
    }

    /// PGRST205 exists since v13.0.0; before, reads of unknown tables go to the database and
    /// writes get `404 {}`.
    pub fn has_table_not_found(self) -> bool {
        matches!(self, Profile::V14 | Profile::V13)
    }

    /// `/metrics` and `/schema_cache` exist since v12.2.0.
    pub fn has_metrics(self) -> bool {
        matches!(self, Profile::V14 | Profile::V13 | Profile::V12_2)
    }

    /// ≤ v11.0.x dropped a reload trigger that arrived while a load was running (Workers.hs@v11.0.1).
    pub fn drops_notify_during_load(self) -> bool {
        self == Profile::V11_0
    }

    /// PGRST204 wording changed in v12.0.3 (#3361).
    pub fn column_not_found_message(self, column: &str, table: &str) -> String {
        match self {
            Profile::V12_0 | Profile::V11_0 => {
                format!("Column '{column}' of relation '{table}' does not exist")
            }
            _ => format!("Could not find the '{column}' column of '{table}' in the schema cache"),
        }
    }

    /// PGRST000 lost "Retrying the connection." in v14.13 (#4980).
    pub fn connection_error_message(self) -> &'static str {
        match self {
            Profile::V14 => "Database connection error.",
            _ => "Database connection error. Retrying the connection.",
        }
    }

    /// Minimum fuzzy score for table and function-name hints: 0.75 since v14.6 (#4675), else
    /// FuzzySet's default 0.33.
    pub fn name_hint_min_score(self) -> f64 {
        match self {
            Profile::V14 => 0.75,
            _ => 0.33,
        }
    }

    /// Since v14.3 (#4462) no table hint at all for schemas with 500 tables or more.
    pub fn table_hint_table_limit(self) -> Option<usize> {
        match self {
            Profile::V14 => Some(500),
            _ => None,
        }
    }

    /// v14.0 (#4367) restricted the reload-on-503 fallback to "a cache exists".
    pub fn reloads_on_503_only_with_cache(self) -> bool {
        self == Profile::V14
    }

    /// Invalid schema hint wording changed in v13.0.7 (#4089).
    pub fn invalid_schema_hint(self, schemas: &[String]) -> String {
        match self {
            Profile::V14 | Profile::V13 => format!("Only the following schemas are exposed: {}", schemas.join(", ")),
            _ => format!("The schema must be one of the following: {}", schemas.join(", ")),
        }
    }
}

impl FromStr for Profile {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "v14" => Ok(Profile::V14),
            "v13" => Ok(Profile::V13),
            "v12.2" => Ok(Profile::V12_2),
            "v12.0" => Ok(Profile::V12_0),
            "v11.0" => Ok(Profile::V11_0),
            other => Err(format!("unknown profile {other:?}: use v14, v13, v12.2, v12.0 or v11.0")),
        }
    }
}
