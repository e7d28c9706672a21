//! PostgREST's error answers: `{"code","details","hint","message"}` (keys in aeson's alphabetical
//! order, nulls where empty), `Content-Type: application/json; charset=utf-8`, and from v13 on
//! `Proxy-Status: PostgREST; error=<code>`.

use http::StatusCode;
use serde::Serialize;
use serde_json::Value;

#[derive(Debug, Clone, Serialize)]
pub struct ApiError {
    #[serde(skip)]
    pub status: StatusCode,
    pub code: String,
    pub details: Option<Value>,
    pub hint: Option<Value>,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, code: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::from_u16(status).expect("valid status"),
            code: code.to_string(),
            details: None,
            hint: None,
            message: message.into(),
        }
    }

    pub fn details(mut self, details: impl Into<String>) -> ApiError {
        self.details = Some(Value::String(details.into()));
        self
    }

    pub fn hint(mut self, hint: Option<String>) -> ApiError {
        self.hint = hint.map(Value::String);
        self
    }

    pub fn body(&self) -> String {
        serde_json::to_string(self).expect("error serializes")
    }

    pub fn no_schema_cache() -> ApiError {
        ApiError::new(503, "PGRST002", "Could not query the database for the schema cache. Retrying.")
    }

    pub fn query_param(message: impl Into<String>, details: impl Into<String>) -> ApiError {
        ApiError::new(400, "PGRST100", message).details(details)
    }

    pub fn invalid_body(message: &str) -> ApiError {
        ApiError::new(400, "PGRST102", message)
    }

    /// A PostgreSQL error passed through with PostgREST's SQLSTATE → HTTP mapping (Error.hs).
    pub fn from_db(db: &tokio_postgres::error::DbError) -> ApiError {
        let code = db.code().code();
        let message = db.message();
        ApiError {
            status: StatusCode::from_u16(status_for_sqlstate(code, message)).expect("valid status"),
            code: code.to_string(),
            details: db.detail().map(|d| Value::String(d.to_string())),
            hint: db.hint().map(|h| Value::String(h.to_string())),
            message: message.to_string(),
        }
    }
}

pub fn status_for_sqlstate(code: &str, message: &str) -> u16 {
    let starts = |p: &str| code.starts_with(p);
    match code {
        _ if starts("08") => 503,
        _ if starts("09") => 500,
        _ if starts("0L") || starts("0P") => 403,
        "23503" | "23505" => 409,
        "25006" => 405,
        "21000" if message.ends_with("requires a WHERE clause") => 400,
        "21000" => 500,
        "22023" if message.starts_with("role") && message.ends_with("does not exist") => 401,
        "22023" => 400,
        _ if starts("25") => 500,
        _ if starts("28") => 403,
        _ if starts("2D") || starts("38") || starts("39") || starts("3B") || starts("40") => 500,
        "53400" => 500,
        _ if starts("53") => 503,
        _ if starts("54") || starts("55") => 500,
        "57P01" => 503,
        _ if starts("57") || starts("58") || starts("F0") || starts("HV") => 500,
        "P0001" => 400,
        _ if starts("P0") || starts("XX") => 500,
        "42883" if message.starts_with("function xmlagg(") => 406,
        "42883" => 404,
        "42P01" => 404,
        "42P17" => 500,
        "42501" => 401,
        _ if starts("PT") => code[2..].parse().ok().filter(|s| (100..600).contains(s)).unwrap_or(500),
        _ => 400,
    }
}
