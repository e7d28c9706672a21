//! Reads an upstream answer and returns a [`Verdict`]: pass it through, or heal it. PostgREST v13+
//! names the error in `Proxy-Status`; older versions only in the JSON body, which is read for error
//! statuses with a JSON content type and only up to a small cap. Success bodies are never touched.

use bytes::{Bytes, BytesMut};
use http::{header, Method, Response, StatusCode};
use http_body::Body;
use http_body_util::BodyExt;
use serde::Deserialize;

use crate::body::{full, GuardBody};

/// Error bodies larger than this are not PostgREST schema-cache errors; they pass unread.
pub const ERROR_BODY_CAP: usize = 64 * 1024;

/// The schema-cache errors a reload can cure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StaleCode {
    /// PGRST200: no relationship for an embed.
    Relationship,
    /// PGRST202: no function.
    Function,
    /// PGRST204: no column.
    Column,
    /// PGRST205: no table (v13+).
    Table,
    /// Before v13, a write to a table missing from the cache is `404 {}`.
    LegacyTableWrite,
    /// PostgreSQL could not cast a write's body to the column types PostgREST cached (22001,
    /// 22003, 22P02, 22007 or 42804): the columns may have changed type since.
    ColumnType(&'static str),
}

/// The SQLSTATEs a write's body can meet when PostgREST casts it to stale column types.
const TYPE_ERRORS: [&str; 5] = ["22001", "22003", "22P02", "22007", "42804"];

/// Is `code` one of [`TYPE_ERRORS`]? The `'static` copy of it if so.
fn type_error(code: &str) -> Option<&'static str> {
    TYPE_ERRORS.iter().copied().find(|known| *known == code)
}

impl StaleCode {
    pub fn as_str(self) -> &'static str {
        match self {
            StaleCode::Relationship => "PGRST200",
            StaleCode::Function => "PGRST202",
            StaleCode::Column => "PGRST204",
            StaleCode::Table => "PGRST205",
            StaleCode::LegacyTableWrite => "404{}",
            StaleCode::ColumnType(code) => code,
        }
    }
}

pub use crate::schema_object::{CallShape, MissingObject};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Not ours to heal: the answer goes to the client as it is.
    PassThrough,
    /// The schema cache lacks something: reload, wait, replay.
    Stale { code: StaleCode, object: MissingObject },
    /// PGRST002: PostgREST has no schema cache at all right now; wait it out and replay.
    CacheEmpty,
    /// 42P01, 42703 or 42883 from PostgreSQL: a stale cache built SQL for a dropped or renamed
    /// object, or the client named one that does not exist. Healed only while a reload is known
    /// to be in progress; the transaction was rolled back.
    StaleDatabase { code: &'static str },
}

/// What the request itself says, to tell an error it caused from one an application wrote.
#[derive(Clone, Copy)]
pub struct RequestFacts<'a> {
    pub method: &'a Method,
    /// The path as PostgREST sees it: `/table` or `/rpc/function`.
    pub path: &'a str,
    pub query: Option<&'a str>,
    /// The request's `Content-Type`, which says how to read the body's column names.
    pub content_type: Option<&'a str>,
    /// The request body, when it was kept whole.
    pub body: Option<&'a [u8]>,
}

/// A path segment as PostgREST reads it: percent-decoded (`/my%20table` names `my table`).
pub fn decoded_segment(segment: &str) -> std::borrow::Cow<'_, str> {
    percent_encoding::percent_decode_str(segment).decode_utf8_lossy()
}

impl RequestFacts<'_> {
    /// A POST, PATCH or PUT to a table or view: what PostgREST casts to cached column types.
    fn writes_a_table(&self) -> bool {
        matches!(*self.method, Method::POST | Method::PATCH | Method::PUT) && self.rpc().is_none()
    }

    /// The table the path names (its last segment, decoded).
    pub fn target(&self) -> std::borrow::Cow<'_, str> {
        decoded_segment(self.path.rsplit('/').next().unwrap_or_default())
    }

    /// The function an `/rpc/` path names, decoded.
    pub fn rpc(&self) -> Option<std::borrow::Cow<'_, str>> {
        let rest = self.path.rsplit_once("/rpc/")?.1;
        (!rest.is_empty() && !rest.contains('/')).then(|| decoded_segment(rest))
    }

    fn query_param(&self, name: &str) -> Option<String> {
        self.query?.split('&').find_map(|pair| {
            let (key, value) = pair.split_once('=')?;
            (key == name).then(|| percent_encoding::percent_decode_str(value).decode_utf8_lossy().into_owned())
        })
    }

    /// The keys a write names: its `columns` parameter, else the CSV header or the first JSON
    /// object's keys, as PostgREST reads the body.
    pub fn written_columns(&self) -> Vec<String> {
        if let Some(columns) = self.query_param("columns") {
            return columns.split(',').map(|c| c.trim().trim_matches('"').to_string()).collect();
        }
        let Some(body) = self.body else {
            return Vec::new();
        };
        if self.content_type.is_some_and(|t| t.trim_start().to_ascii_lowercase().starts_with("text/csv")) {
            return csv_header(body);
        }
        let object = match serde_json::from_slice::<serde_json::Value>(body) {
            Ok(serde_json::Value::Array(items)) => items.into_iter().next(),
            Ok(value) => Some(value),
            Err(_) => None,
        };
        match object {
            Some(serde_json::Value::Object(map)) => map.keys().cloned().collect(),
            _ => Vec::new(),
        }
    }

    /// The names a `select` mentions (columns, embedded resources, hints), split at punctuation.
    fn selected_names(&self) -> Vec<String> {
        self.query_param("select")
            .map(|select| {
                select
                    .split([',', '(', ')', '!', ':', '.'])
                    .map(|name| name.trim().trim_matches('"').to_string())
                    .filter(|name| !name.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Did a cast failure surely come from PostgREST casting the body to its cached column types,
    /// before any row was written? Only then may a replay follow. A body the guard reads (JSON, or
    /// CSV), no cast of its own in `select` (that one runs on the rows written), and no filter
    /// holding the value the message quotes (a filter's value is cast to the column's type when the
    /// statement runs). What the table itself may raise (triggers, generated columns) the catalog
    /// check rules out.
    fn shows_a_body_cast(&self, message: Option<&str>) -> bool {
        let media = self.content_type.unwrap_or("application/json").split(';').next().unwrap_or_default();
        let media = media.trim().to_ascii_lowercase();
        let readable_body = media == "application/json" || media == "text/csv";
        let select_casts = self.query_param("select").is_some_and(|select| select.contains("::"));
        let value_in_filters = message.and_then(cast_value).is_some_and(|value| {
            self.query.is_some_and(|query| {
                query.split('&').any(|pair| {
                    let decoded = percent_encoding::percent_decode_str(pair).decode_utf8_lossy();
                    decoded.contains(value)
                })
            })
        });
        readable_body && !select_casts && !value_in_filters
    }

    /// Could PostgREST have raised this schema-cache error for *this* request? An application's
    /// answer shaped like one (an RPC setting `response.status`) names other things, or comes from
    /// an RPC where only PGRST202 is PostgREST's own.
    fn explains(&self, object: &MissingObject, code: StaleCode) -> bool {
        match (code, object, self.rpc()) {
            (StaleCode::Function, MissingObject::Function { name, .. }, Some(function)) => *name == function,
            (StaleCode::Function, ..) | (_, _, Some(_)) => false,
            (StaleCode::Column, MissingObject::Column { table, column }, None) => {
                *table == self.target() && self.written_columns().iter().any(|written| written == column)
            }
            (StaleCode::Table, MissingObject::Table { table, .. }, None) => *table == self.target(),
            (StaleCode::LegacyTableWrite, _, None) => {
                matches!(*self.method, Method::POST | Method::PATCH | Method::PUT) && !self.target().is_empty()
            }
            (StaleCode::ColumnType(_), MissingObject::ColumnTypes { column, .. }, None) => {
                self.writes_a_table()
                    && column.as_ref().is_none_or(|column| self.written_columns().iter().any(|c| c == column))
            }
            (StaleCode::Relationship, MissingObject::Relationship { parent, child, .. }, None) => {
                let names = self.selected_names();
                let target = self.target();
                let named = |table: &String| *table == target || names.iter().any(|n| n == table);
                named(parent) && named(child)
            }
            _ => false,
        }
    }
}

/// The column names in the first line of a CSV body, unquoted as PostgREST's CSV reader does.
fn csv_header(body: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(body);
    let line = text.split('\n').next().unwrap_or_default().trim_end_matches('\r');
    let mut names = Vec::new();
    let (mut current, mut quoted, mut chars) = (String::new(), false, line.chars().peekable());
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                current.push('"');
                chars.next();
            }
            '"' => quoted = !quoted,
            ',' if !quoted => names.push(std::mem::take(&mut current)),
            c => current.push(c),
        }
    }
    names.push(current);
    names
}

/// The major version in `Server: postgrest/13.0`.
pub fn server_major<B>(response: &Response<B>) -> Option<u32> {
    server_version(response).map(|(major, _)| major)
}

/// The major and minor version in `Server: postgrest/14.17` (minor 0 when absent).
pub fn server_version<B>(response: &Response<B>) -> Option<(u32, u32)> {
    let server = response.headers().get(header::SERVER)?.to_str().ok()?;
    let mut parts = server.strip_prefix("postgrest/")?.split(['.', ' ']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next().and_then(|minor| minor.parse().ok()).unwrap_or(0);
    Some((major, minor))
}

#[derive(Deserialize)]
pub struct PostgrestError {
    code: Option<String>,
    message: Option<String>,
    /// A string for PGRST200 (it carries the embed hint); a list for the ambiguities.
    details: Option<serde_json::Value>,
}

/// True when the head alone says the answer passes through untouched: no PostgREST schema-cache
/// code in `Proxy-Status` and nothing in the body worth reading. The common case, decided without
/// touching the body.
pub fn passes_by_head(response: &Response<GuardBody>, method: &Method) -> bool {
    match proxy_status_error(response) {
        Some(code) if type_error(&code).is_some() => !matches!(*method, Method::POST | Method::PATCH | Method::PUT),
        Some(code) => code_verdict(&code, None) == Verdict::PassThrough,
        // From v13 on PostgREST names every error of its own in Proxy-Status: an error-shaped body
        // without it is the application's answer (an RPC that set `response.status`).
        None if server_major(response).is_some_and(|major| major >= 13) => true,
        None => {
            !matches!(
                response.status(),
                StatusCode::BAD_REQUEST | StatusCode::NOT_FOUND | StatusCode::SERVICE_UNAVAILABLE
            ) || !is_json(response)
                || *method == Method::HEAD
        }
    }
}

/// Classifies `response`; an error body that was read is put back, so the answer is whole either way.
/// The body is read only until `deadline`: a body that stalls past it goes to the client as it comes.
pub async fn inspect(
    response: Response<GuardBody>,
    request: &RequestFacts<'_>,
    deadline: tokio::time::Instant,
) -> (Response<GuardBody>, Verdict) {
    let method = request.method;
    if passes_by_head(&response, method) {
        return (response, Verdict::PassThrough);
    }
    let status = response.status();
    let proxy_status_code = proxy_status_error(&response);
    let worth_reading = match &proxy_status_code {
        Some(code) => code_verdict(code, None) != Verdict::PassThrough,
        None => {
            matches!(status, StatusCode::BAD_REQUEST | StatusCode::NOT_FOUND | StatusCode::SERVICE_UNAVAILABLE)
                && is_json(&response)
        }
    };
    if !worth_reading || *method == Method::HEAD {
        let verdict = match &proxy_status_code {
            Some(code) => code_verdict(code, None),
            None => Verdict::PassThrough,
        };
        return (response, verdict);
    }
    let (parts, body) = response.into_parts();
    match read_capped(body, ERROR_BODY_CAP, deadline).await {
        Ok(bytes) => {
            let (verdict, message) = body_verdict(status, method, &bytes, proxy_status_code.as_deref());
            // A type error is healed only for a write to a table, whoever names it (an RPC casts
            // its arguments the same way), and only when the body's cast surely raised it.
            let verdict = match &verdict {
                Verdict::Stale { code: StaleCode::ColumnType(_), .. }
                    if !request.shows_a_body_cast(message.as_deref()) =>
                {
                    Verdict::PassThrough
                }
                Verdict::Stale { code: StaleCode::ColumnType(_), .. } => attribute(verdict, request),
                _ if proxy_status_code.is_some() => verdict,
                _ => attribute(verdict, request),
            };
            (Response::from_parts(parts, full(bytes)), verdict)
        }
        Err(partial) => (Response::from_parts(parts, partial), Verdict::PassThrough),
    }
}

/// The `error` parameter of PostgREST's own member of `Proxy-Status` (RFC 9209: a list, one
/// member per intermediary, each appending its own after PostgREST's), from every header line.
fn proxy_status_error<B>(response: &Response<B>) -> Option<String> {
    response
        .headers()
        .get_all("proxy-status")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(split_outside_quotes(','))
        .find_map(|member| {
            let mut params = split_outside_quotes(';')(member).map(str::trim);
            let item = params.next()?.trim_matches('"');
            if !item.eq_ignore_ascii_case("PostgREST") {
                return None;
            }
            params.find_map(|p| p.strip_prefix("error=")).map(|c| c.trim().trim_matches('"').to_string())
        })
}

/// Splits a structured header field at `separator`, but not inside a quoted string.
fn split_outside_quotes(separator: char) -> impl Fn(&str) -> std::vec::IntoIter<&str> {
    move |text: &str| {
        let (mut parts, mut start, mut quoted, mut escaped) = (Vec::new(), 0, false, false);
        for (at, c) in text.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' if quoted => escaped = true,
                '"' => quoted = !quoted,
                c if c == separator && !quoted => {
                    parts.push(&text[start..at]);
                    start = at + c.len_utf8();
                }
                _ => {}
            }
        }
        parts.push(&text[start..]);
        parts.into_iter()
    }
}

fn is_json<B>(response: &Response<B>) -> bool {
    response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json") || v.starts_with("application/vnd.pgrst"))
}

/// The verdict a read error body gives, with PostgREST's (or PostgreSQL's) message.
fn body_verdict(
    status: StatusCode,
    method: &Method,
    body: &[u8],
    header_code: Option<&str>,
) -> (Verdict, Option<String>) {
    let parsed: Option<PostgrestError> = serde_json::from_slice(body).ok();
    if status == StatusCode::NOT_FOUND && body == b"{}" && matches!(*method, Method::POST | Method::PATCH | Method::PUT)
    {
        return (Verdict::Stale { code: StaleCode::LegacyTableWrite, object: MissingObject::Unknown }, None);
    }
    let Some(error) = parsed else {
        return (Verdict::PassThrough, None);
    };
    let code = header_code.map(str::to_string).or(error.code.clone());
    match code {
        Some(code) => (code_verdict(&code, Some(&error)), error.message.clone()),
        None => (Verdict::PassThrough, None),
    }
}

/// Before v13 nothing in an answer tells PostgREST's own errors from an application's: heal only
/// what the request itself can have caused.
fn attribute(verdict: Verdict, request: &RequestFacts<'_>) -> Verdict {
    match &verdict {
        Verdict::Stale { code, object } if request.explains(object, *code) => verdict,
        // PostgreSQL's errors arrive from a rolled-back transaction, but an RPC can also answer a
        // committed call with a body that looks like one: on /rpc/ they are trusted only with
        // Proxy-Status.
        Verdict::StaleDatabase { .. } if request.rpc().is_none() => verdict,
        Verdict::CacheEmpty if request.rpc().is_none() => verdict,
        _ => Verdict::PassThrough,
    }
}

/// The heal policy by code. PGRST201/203 are ambiguities, not staleness, and every other error —
/// including PGRST111/112, raised after a commit — passes through.
pub fn code_verdict(code: &str, error: Option<&PostgrestError>) -> Verdict {
    let object = || error.map(PostgrestError::missing_object).unwrap_or(MissingObject::Unknown);
    let stale = |code| Verdict::Stale { code, object: object() };
    match code {
        "PGRST200" => stale(StaleCode::Relationship),
        "PGRST202" => stale(StaleCode::Function),
        "PGRST204" => stale(StaleCode::Column),
        "PGRST205" => stale(StaleCode::Table),
        "PGRST002" => Verdict::CacheEmpty,
        "42P01" => Verdict::StaleDatabase { code: "42P01" },
        "42703" => Verdict::StaleDatabase { code: "42703" },
        "42883" => Verdict::StaleDatabase { code: "42883" },
        _ => match (type_error(code), error) {
            // Which types: only the body says, once read.
            (Some(code), None) => Verdict::Stale { code: StaleCode::ColumnType(code), object: MissingObject::Unknown },
            (Some(code), Some(error)) => match error.message.as_deref().and_then(|m| cast_failure(code, m)) {
                Some(object) => Verdict::Stale { code: StaleCode::ColumnType(code), object },
                // Unreadable (another wording, another language): not ours to judge.
                None => Verdict::PassThrough,
            },
            (None, _) => Verdict::PassThrough,
        },
    }
}

/// What a cast failure's message (PostgreSQL's English wording) says: the type cast to, and for
/// 42804 the column and its current type. Messages that name no type (22008, `numeric field
/// overflow`) give None.
fn cast_failure(code: &str, message: &str) -> Option<MissingObject> {
    let object = |cast_to: &str, column: Option<&str>, current: Option<&str>| MissingObject::ColumnTypes {
        table: String::new(),
        columns: Vec::new(),
        cast_to: cast_to.trim().to_string(),
        column: column.map(str::to_string),
        current: current.map(|c| c.trim().to_string()),
    };
    match code {
        "42804" => {
            let rest = message.strip_prefix("column \"")?;
            let (column, rest) = rest.split_once("\" is of type ")?;
            let (current, cast_to) = rest.split_once(" but expression is of type ")?;
            Some(object(cast_to, Some(column), Some(current)))
        }
        "22001" => {
            let cast_to = message
                .strip_prefix("value too long for type ")
                .or_else(|| message.strip_prefix("bit string too long for type "))?;
            Some(object(cast_to, None, None))
        }
        "22003" => {
            if let Some((_, cast_to)) = message.split_once("\" is out of range for type ") {
                return Some(object(cast_to, None, None));
            }
            let cast_to = message.strip_suffix(" out of range")?;
            matches!(cast_to, "smallint" | "integer" | "bigint").then(|| object(cast_to, None, None))
        }
        "22P02" | "22007" => {
            let rest = message
                .strip_prefix("invalid input syntax for type ")
                .or_else(|| message.strip_prefix("invalid input value for enum "))?;
            Some(object(type_before_value(rest)?.0, None, None))
        }
        _ => None,
    }
}

/// Splits `<type>: "<value>"`, the tail of PostgreSQL's `invalid input syntax for type %s: "%s"`,
/// into the type and the value. The value is quoted but not escaped, so it may hold `: "` itself;
/// the type, as `format_type` writes it, holds one only inside a double-quoted identifier. So the
/// first `: "` outside quotes ends the type, whatever the client put in the value.
fn type_before_value(text: &str) -> Option<(&str, &str)> {
    let mut quoted = false;
    for (at, c) in text.char_indices() {
        match c {
            // A doubled quote inside an identifier toggles twice: still quoted.
            '"' => quoted = !quoted,
            ':' if !quoted && text[at..].starts_with(": \"") => {
                let value = text[at + 3..].strip_suffix('"')?;
                return Some((&text[..at], value));
            }
            _ => {}
        }
    }
    None
}

/// The value a cast failure quotes, if its message quotes one.
fn cast_value(message: &str) -> Option<&str> {
    let rest = message
        .strip_prefix("invalid input syntax for type ")
        .or_else(|| message.strip_prefix("invalid input value for enum "));
    if let Some(rest) = rest {
        return type_before_value(rest).map(|(_, value)| value);
    }
    let rest = message.strip_prefix("value \"")?;
    rest.split_once("\" is out of range for type ").map(|(value, _)| value)
}

impl PostgrestError {
    fn missing_object(&self) -> MissingObject {
        let object = self.message.as_deref().map(missing_object).unwrap_or(MissingObject::Unknown);
        match object {
            MissingObject::Relationship { parent, child, .. } => {
                let details = self.details.as_ref().and_then(serde_json::Value::as_str);
                MissingObject::Relationship { parent, child, hint: details.and_then(embed_hint) }
            }
            other => other,
        }
    }
}

/// The `!hint` PGRST200's details name: "Searched for a foreign key relationship between 'a' and
/// 'b' using the hint 'h' in the schema 's', but no matches were found."
fn embed_hint(details: &str) -> Option<String> {
    let (_, rest) = details.split_once("' using the hint '")?;
    let (hint, _) = rest.rsplit_once("' in the schema '")?;
    Some(hint.to_string())
}

/// Reads PostgREST's message templates (Error.hs), old and new wordings.
pub fn missing_object(message: &str) -> MissingObject {
    let between = |text: &str, start: &str, end: &str| -> Option<String> {
        text.strip_prefix(start)?.strip_suffix(end).map(str::to_string)
    };
    if let Some(inner) = between(message, "Could not find the '", "' in the schema cache") {
        if let Some((column, table)) = inner.split_once("' column of '") {
            return MissingObject::Column { table: table.to_string(), column: column.to_string() };
        }
    }
    if let Some(inner) = between(message, "Column '", "' does not exist") {
        if let Some((column, table)) = inner.split_once("' of relation '") {
            return MissingObject::Column { table: table.to_string(), column: column.to_string() };
        }
    }
    if let Some(qualified) = between(message, "Could not find the table '", "' in the schema cache") {
        if let Some((schema, table)) = qualified.split_once('.') {
            return MissingObject::Table { schema: schema.to_string(), table: table.to_string() };
        }
    }
    if let Some(inner) = between(message, "Could not find the function ", " in the schema cache") {
        let (qualified, args) = if let Some(q) = inner.strip_suffix(" without parameters") {
            (q.to_string(), Vec::new())
        } else if let Some((q, list)) = inner.split_once('(') {
            let list = list.trim_end_matches(')');
            (q.to_string(), list.split(", ").filter(|a| !a.is_empty()).map(str::to_string).collect())
        } else {
            (inner.clone(), Vec::new())
        };
        if let Some((schema, name)) = qualified.split_once('.') {
            return MissingObject::Function {
                schema: schema.to_string(),
                name: name.to_string(),
                args,
                call: CallShape::Json,
                single_argument_unnamed: false,
            };
        }
    }
    if let Some(inner) = between(message, "Could not find a relationship between '", "' in the schema cache") {
        if let Some((parent, child)) = inner.split_once("' and '") {
            return MissingObject::Relationship { parent: parent.to_string(), child: child.to_string(), hint: None };
        }
    }
    MissingObject::Unknown
}

/// Collects at most `cap` bytes by `deadline`. When the body is longer or slower, hands back a body
/// that replays what was read and then streams the rest.
async fn read_capped<B>(mut body: B, cap: usize, deadline: tokio::time::Instant) -> Result<Bytes, GuardBody>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<crate::body::BoxError>,
{
    let mut collected = BytesMut::new();
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(_) => {
                let head = http_body_util::Full::new(collected.freeze()).map_err(|never| match never {});
                return Err(GuardBody::boxed(Chain { head: Some(head), tail: body.map_err(Into::into) }));
            }
        };
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                let error: crate::body::BoxError = e.into();
                let prefix = collected.freeze();
                let failed = futures_util::stream::iter(vec![Ok(http_body::Frame::data(prefix)), Err(error)]);
                return Err(GuardBody::boxed(http_body_util::StreamBody::new(failed)));
            }
        };
        if let Some(data) = frame.data_ref() {
            collected.extend_from_slice(data);
            if collected.len() > cap {
                let prefix = collected.freeze();
                let head = http_body_util::Full::new(prefix).map_err(|never| match never {});
                return Err(GuardBody::boxed(Chain { head: Some(head), tail: body.map_err(Into::into) }));
            }
        }
    }
    Ok(collected.freeze())
}

pin_project_lite::pin_project! {
    /// One body after another: the part already read, then the rest of the stream.
    struct Chain<H, T> {
        #[pin] head: Option<H>,
        #[pin] tail: T,
    }
}

impl<H, T> Body for Chain<H, T>
where
    H: Body<Data = Bytes, Error = crate::body::BoxError>,
    T: Body<Data = Bytes, Error = crate::body::BoxError>,
{
    type Data = Bytes;
    type Error = crate::body::BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        if let Some(head) = this.head.as_mut().as_pin_mut() {
            match std::task::ready!(head.poll_frame(cx)) {
                Some(frame) => return std::task::Poll::Ready(Some(frame)),
                None => this.head.set(None),
            }
        }
        this.tail.poll_frame(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_objects_from_postgrest_messages() {
        assert_eq!(
            missing_object("Could not find the 'artifact_ids' column of 'chat_messages' in the schema cache"),
            MissingObject::Column { table: "chat_messages".into(), column: "artifact_ids".into() }
        );
        assert_eq!(
            missing_object("Column 'artifact_ids' of relation 'chat_messages' does not exist"),
            MissingObject::Column { table: "chat_messages".into(), column: "artifact_ids".into() }
        );
        assert_eq!(
            missing_object("Could not find the table 'public.artifacts' in the schema cache"),
            MissingObject::Table { schema: "public".into(), table: "artifacts".into() }
        );
        assert_eq!(
            missing_object("Could not find the function public.summarize(a, message_id) in the schema cache"),
            MissingObject::Function {
                schema: "public".into(),
                name: "summarize".into(),
                args: vec!["a".into(), "message_id".into()],
                call: CallShape::Json,
                single_argument_unnamed: false
            }
        );
        assert_eq!(
            missing_object("Could not find the function public.ping without parameters in the schema cache"),
            MissingObject::Function {
                schema: "public".into(),
                name: "ping".into(),
                args: vec![],
                call: CallShape::Json,
                single_argument_unnamed: false
            }
        );
        assert_eq!(
            missing_object("Could not find a relationship between 'chat_messages' and 'projects' in the schema cache"),
            MissingObject::Relationship { parent: "chat_messages".into(), child: "projects".into(), hint: None }
        );
    }

    #[test]
    fn reads_the_embed_hint_from_details() {
        let error: PostgrestError = serde_json::from_str(
            r#"{"code":"PGRST200","message":"Could not find a relationship between 'chat_messages' and 'users' in the schema cache",
                "details":"Searched for a foreign key relationship between 'chat_messages' and 'users' using the hint 'author_id' in the schema 'public', but no matches were found.","hint":null}"#,
        )
        .unwrap();
        assert_eq!(
            error.missing_object(),
            MissingObject::Relationship {
                parent: "chat_messages".into(),
                child: "users".into(),
                hint: Some("author_id".into())
            }
        );
        assert_eq!(
            embed_hint("Searched for a foreign key relationship between 'a' and 'b' in the schema 'public', but no matches were found."),
            None
        );
    }

    #[test]
    fn only_staleness_is_healed() {
        for code in ["PGRST201", "PGRST203", "PGRST111", "PGRST112", "PGRST116", "23505", "42P10", "PGRST000"] {
            assert_eq!(code_verdict(code, None), Verdict::PassThrough, "{code}");
        }
        assert_eq!(code_verdict("PGRST002", None), Verdict::CacheEmpty);
        assert_eq!(code_verdict("42703", None), Verdict::StaleDatabase { code: "42703" });
        assert!(matches!(code_verdict("PGRST204", None), Verdict::Stale { code: StaleCode::Column, .. }));
    }

    fn response(status: u16, headers: &[(&str, &str)], body: &'static str) -> Response<GuardBody> {
        let mut builder = Response::builder().status(status);
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        builder.body(full(Bytes::from_static(body.as_bytes()))).unwrap()
    }

    fn far() -> tokio::time::Instant {
        tokio::time::Instant::now() + std::time::Duration::from_secs(10)
    }

    fn facts<'a>(method: &'a Method, path: &'a str, body: &'a str) -> RequestFacts<'a> {
        RequestFacts { method, path, query: None, content_type: None, body: Some(body.as_bytes()) }
    }

    #[tokio::test]
    async fn classifies_by_header_or_by_body_and_keeps_the_body() {
        let insert = facts(&Method::POST, "/t", r#"{"a":1}"#);
        let read = facts(&Method::GET, "/t", "");
        let body = r#"{"code":"PGRST204","details":null,"hint":null,"message":"Could not find the 'a' column of 't' in the schema cache"}"#;
        let with_header = response(
            400,
            &[("proxy-status", "PostgREST; error=PGRST204"), ("content-type", "application/json; charset=utf-8")],
            body,
        );
        let (kept, verdict) = inspect(with_header, &insert, far()).await;
        assert!(matches!(verdict, Verdict::Stale { code: StaleCode::Column, object: MissingObject::Column { .. } }));
        assert_eq!(kept.into_body().collect().await.unwrap().to_bytes(), body);

        let without_header = response(400, &[("content-type", "application/json; charset=utf-8")], body);
        assert!(matches!(inspect(without_header, &insert, far()).await.1, Verdict::Stale { .. }));

        let legacy = response(404, &[("content-type", "application/json; charset=utf-8")], "{}");
        assert_eq!(
            inspect(legacy, &insert, far()).await.1,
            Verdict::Stale { code: StaleCode::LegacyTableWrite, object: MissingObject::Unknown }
        );

        let ok = response(200, &[("content-type", "application/json")], "[]");
        assert_eq!(inspect(ok, &read, far()).await.1, Verdict::PassThrough);
        let ambiguous = response(300, &[("proxy-status", "PostgREST; error=PGRST201")], "{}");
        assert_eq!(inspect(ambiguous, &read, far()).await.1, Verdict::PassThrough);
    }

    #[test]
    fn proxy_status_names_postgrests_own_member_whatever_intermediaries_append() {
        let with = |values: &[&str]| {
            let mut builder = Response::builder();
            for value in values {
                builder = builder.header("proxy-status", *value);
            }
            builder.body(()).unwrap()
        };
        assert_eq!(proxy_status_error(&with(&["PostgREST; error=PGRST204"])).as_deref(), Some("PGRST204"));
        assert_eq!(
            proxy_status_error(&with(&["PostgREST; error=PGRST204, cdn; error=http_protocol_error"])).as_deref(),
            Some("PGRST204")
        );
        assert_eq!(
            proxy_status_error(&with(&["PostgREST; error=PGRST205", "cdn; error=\"x, y\"; details=\"a;b\""]))
                .as_deref(),
            Some("PGRST205")
        );
        assert_eq!(proxy_status_error(&with(&["cdn; error=PGRST204"])), None, "another intermediary's entry");
        assert_eq!(proxy_status_error(&with(&["\"PostgREST\"; error=\"PGRST200\""])).as_deref(), Some("PGRST200"));
    }

    #[test]
    fn csv_headers_and_encoded_paths_are_read_as_postgrest_reads_them() {
        assert_eq!(
            csv_header(b"content,\"artifact ids\",\"a\"\"b\"\nx,y,z\n"),
            vec!["content", "artifact ids", "a\"b"]
        );
        let body = "content,artifact_ids\nhi,\"{a}\"\n";
        let facts = RequestFacts {
            method: &Method::POST,
            path: "/my%20table",
            query: None,
            content_type: Some("text/csv"),
            body: Some(body.as_bytes()),
        };
        assert_eq!(facts.target(), "my table");
        assert!(facts.explains(
            &MissingObject::Column { table: "my table".into(), column: "artifact_ids".into() },
            StaleCode::Column
        ));
        let rpc = RequestFacts { path: "/rpc/say%20hi", ..facts };
        assert_eq!(rpc.rpc().as_deref(), Some("say hi"));
    }

    #[tokio::test]
    async fn an_applications_error_shaped_answer_is_never_healed() {
        let body = r#"{"code":"PGRST204","details":null,"hint":null,"message":"Could not find the 'a' column of 't' in the schema cache"}"#;
        let json = ("content-type", "application/json; charset=utf-8");
        // v13+: no Proxy-Status means PostgREST did not raise it.
        let v14 = response(400, &[json, ("server", "postgrest/14.17")], body);
        assert_eq!(inspect(v14, &facts(&Method::POST, "/t", r#"{"a":1}"#), far()).await.1, Verdict::PassThrough);
        // v12: the request must be able to have caused it.
        let rpc = response(400, &[json, ("server", "postgrest/12.2")], body);
        assert_eq!(inspect(rpc, &facts(&Method::POST, "/rpc/t", r#"{"a":1}"#), far()).await.1, Verdict::PassThrough);
        let other_column = response(400, &[json, ("server", "postgrest/12.2")], body);
        assert_eq!(
            inspect(other_column, &facts(&Method::POST, "/t", r#"{"b":1}"#), far()).await.1,
            Verdict::PassThrough
        );
        let caused = response(400, &[json, ("server", "postgrest/12.2")], body);
        assert!(matches!(
            inspect(caused, &facts(&Method::POST, "/t", r#"[{"a":1}]"#), far()).await.1,
            Verdict::Stale { .. }
        ));
        let rpc_404 = response(404, &[json, ("server", "postgrest/12.2")], "{}");
        assert_eq!(inspect(rpc_404, &facts(&Method::POST, "/rpc/t", "{}"), far()).await.1, Verdict::PassThrough);
    }

    #[test]
    fn cast_failures_name_the_type_cast_to() {
        let cast = |code, message: &str| match cast_failure(code, message) {
            Some(MissingObject::ColumnTypes { cast_to, column, current, .. }) => Some((cast_to, column, current)),
            _ => None,
        };
        let named = |t: &str| Some((t.to_string(), None, None));
        assert_eq!(cast("22001", "value too long for type character varying(8)"), named("character varying(8)"));
        assert_eq!(cast("22003", "value \"5000000000\" is out of range for type integer"), named("integer"));
        assert_eq!(cast("22003", "smallint out of range"), named("smallint"));
        assert_eq!(cast("22P02", "invalid input syntax for type integer: \"1.5\""), named("integer"));
        assert_eq!(cast("22P02", "invalid input value for enum api.mood: \"happy: yes\""), named("api.mood"));
        assert_eq!(
            cast("22007", "invalid input syntax for type timestamp with time zone: \"soon\""),
            named("timestamp with time zone")
        );
        assert_eq!(
            cast("42804", "column \"data\" is of type jsonb but expression is of type text"),
            Some(("text".to_string(), Some("data".to_string()), Some("jsonb".to_string())))
        );
        // No type named, or not PostgreSQL's English: not ours to judge.
        assert_eq!(cast("22008", "date/time field value out of range: \"2024-02-30\""), None);
        assert_eq!(cast("22003", "numeric field overflow"), None);
        assert_eq!(cast("22001", "valeur trop longue pour le type character varying(8)"), None);
    }

    #[test]
    fn a_quote_in_the_value_cannot_move_the_type() {
        let cast = |message: &str| match cast_failure("22P02", message) {
            Some(MissingObject::ColumnTypes { cast_to, .. }) => Some(cast_to),
            _ => None,
        };
        for value in ["k17: \"x", "a: \"b: \"c", "\"", ": \"", ""] {
            let message = format!("invalid input syntax for type integer: \"{value}\"");
            assert_eq!(cast(&message).as_deref(), Some("integer"), "{message}");
            assert_eq!(cast_value(&message), Some(value), "{message}");
        }
        // A quoted identifier may hold `: "` itself: format_type doubles its quotes.
        assert_eq!(
            cast("invalid input value for enum api.\"odd: \"\"name\": \"x: \"y\"").as_deref(),
            Some("api.\"odd: \"\"name\"")
        );
        assert_eq!(cast_value("value \"5000000000\" is out of range for type integer"), Some("5000000000"));
    }

    #[test]
    fn only_a_body_cast_is_evidence_for_a_replay() {
        let message = Some("invalid input syntax for type integer: \"k17: \"x\"");
        let write = |query, content_type| RequestFacts {
            method: &Method::POST,
            path: "/memos",
            query,
            content_type,
            body: Some(br#"{"body":"k17: \"x"}"#),
        };
        assert!(write(None, None).shows_a_body_cast(message));
        assert!(write(None, Some("application/json; charset=utf-8")).shows_a_body_cast(message));
        assert!(write(Some("columns=body"), Some("text/csv")).shows_a_body_cast(message));
        // The select's own cast runs on the written rows.
        assert!(!write(Some("select=id,body::int"), None).shows_a_body_cast(message));
        // A form body's columns are not read.
        assert!(!write(None, Some("application/x-www-form-urlencoded")).shows_a_body_cast(message));
        // The value the message quotes is a filter's.
        let patch = RequestFacts { method: &Method::PATCH, ..write(Some("id=eq.k17%3A%20%22x"), None) };
        assert!(!patch.shows_a_body_cast(message));
        let other = RequestFacts { method: &Method::PATCH, ..write(Some("id=eq.5"), None) };
        assert!(other.shows_a_body_cast(message));
    }

    #[test]
    fn versions_come_from_the_server_header() {
        let with = |server: &str| Response::builder().header("server", server).body(()).unwrap();
        assert_eq!(server_version(&with("postgrest/14.17")), Some((14, 17)));
        assert_eq!(server_version(&with("postgrest/11.2.2")), Some((11, 2)));
        assert_eq!(server_version(&with("postgrest/13")), Some((13, 0)));
        assert_eq!(server_version(&with("nginx")), None);
    }

    #[tokio::test]
    async fn type_errors_are_healed_only_for_writes_to_tables() {
        let body =
            r#"{"code":"22001","details":null,"hint":null,"message":"value too long for type character varying(8)"}"#;
        let answer = || {
            response(
                400,
                &[("proxy-status", "PostgREST; error=22001"), ("content-type", "application/json; charset=utf-8")],
                body,
            )
        };
        let write = facts(&Method::POST, "/orders", r#"{"code":"xxxxxxxxxxxx"}"#);
        assert!(matches!(
            inspect(answer(), &write, far()).await.1,
            Verdict::Stale { code: StaleCode::ColumnType("22001"), .. }
        ));
        let rpc = facts(&Method::POST, "/rpc/orders", r#"{"code":"xxxxxxxxxxxx"}"#);
        assert_eq!(inspect(answer(), &rpc, far()).await.1, Verdict::PassThrough);
        let read = facts(&Method::GET, "/orders", "");
        assert_eq!(inspect(answer(), &read, far()).await.1, Verdict::PassThrough);
    }
}
