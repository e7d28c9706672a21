//! The request side of the double: resource routing, schema selection, cache lookups that raise the
//! PGRST2xx errors, and one transaction per request on the real database.

use std::collections::BTreeSet;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{Map, Value};

use super::cache::{fuzzy_best, Routine, SchemaCache, Table};
use super::error::ApiError;
use super::pool::PoolError;
use super::query::{self, ident, string_literal, table_ref, Params, SelectItem};
use super::{reload, State};

type Reply = Result<Response<Full<Bytes>>, ApiError>;

pub async fn handle<B>(state: Arc<State>, request: Request<B>) -> Response<Full<Bytes>>
where
    B: http_body::Body,
    B::Error: std::fmt::Display,
{
    let (parts, body) = request.into_parts();
    let origin = parts.headers.contains_key(header::ORIGIN);
    let mut response = match body.collect().await {
        Ok(body) => route(&state, &parts.method, &parts.uri, &parts.headers, body.to_bytes()).await,
        Err(e) => Err(ApiError::invalid_body(&format!("Error reading request body: {e}"))),
    }
    .unwrap_or_else(|error| error_response(&state, &error));
    if response.status() == StatusCode::SERVICE_UNAVAILABLE {
        // PostgREST's fallback reloader: a 503 pokes the schema loader (v14: only while a cache exists).
        let has_cache = state.cache.read().unwrap().is_some();
        if has_cache || !state.profile.reloads_on_503_only_with_cache() {
            reload::trigger(&state);
        }
        response.headers_mut().insert("retry-after", "0".parse().unwrap());
    }
    let headers = response.headers_mut();
    headers.insert(header::SERVER, state.profile.server_header().parse().unwrap());
    if origin {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, "*".parse().unwrap());
        headers.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            "Content-Encoding, Content-Location, Content-Range, Content-Type, Date, Location, Server, Transfer-Encoding, Range-Unit"
                .parse()
                .unwrap(),
        );
    }
    if parts.method == Method::HEAD {
        *response.body_mut() = Full::new(Bytes::new());
    }
    response
}

pub fn error_response(state: &State, error: &ApiError) -> Response<Full<Bytes>> {
    let mut builder =
        Response::builder().status(error.status).header(header::CONTENT_TYPE, "application/json; charset=utf-8");
    if state.profile.sends_proxy_status() {
        builder = builder.header("proxy-status", format!("PostgREST; error={}", error.code));
    }
    if error.status == StatusCode::UNAUTHORIZED {
        builder = builder.header(header::WWW_AUTHENTICATE, "Bearer");
    }
    builder.body(Full::new(Bytes::from(error.body()))).expect("valid error response")
}

/// What a request asks for after its path is read.
enum Resource<'a> {
    Root,
    Table(&'a str),
    Rpc(&'a str),
}

async fn route(state: &State, method: &Method, uri: &http::Uri, headers: &HeaderMap, body: Bytes) -> Reply {
    let path = uri.path().trim_start_matches('/');
    let segments: Vec<&str> = if path.is_empty() { Vec::new() } else { path.split('/').collect() };
    let resource = match segments.as_slice() {
        [] => Resource::Root,
        ["rpc", name] => Resource::Rpc(name),
        [name] => Resource::Table(name),
        _ => return Err(ApiError::new(404, "PGRST125", "Invalid path specified in request URL")),
    };
    if method == Method::OPTIONS && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD) {
        return Ok(cors_preflight(headers));
    }
    let query = query_pairs(uri);
    let schema = select_schema(state, method, headers)?;
    let cache = state.cache.read().unwrap().clone().ok_or_else(ApiError::no_schema_cache)?;
    let request = Ctx { state, cache: &cache, schema: &schema, method, headers, query: &query, body };
    match resource {
        Resource::Root => Ok(json_response(StatusCode::OK, openapi(&cache, &schema).to_string())),
        Resource::Rpc(name) => request.rpc(&percent_decode(name)).await,
        Resource::Table(name) => request.table(&percent_decode(name)).await,
    }
}

struct Ctx<'a> {
    state: &'a State,
    cache: &'a SchemaCache,
    schema: &'a str,
    method: &'a Method,
    headers: &'a HeaderMap,
    query: &'a [(String, String)],
    body: Bytes,
}

impl Ctx<'_> {
    async fn table(&self, name: &str) -> Reply {
        let table = self.cache.table(self.schema, name);
        if table.is_none() {
            if self.state.profile.has_table_not_found() {
                let p = self.state.profile;
                return Err(ApiError::new(
                    404,
                    "PGRST205",
                    format!("Could not find the table '{}.{name}' in the schema cache", self.schema),
                )
                .hint(query::table_hint(
                    self.cache,
                    self.schema,
                    name,
                    p.name_hint_min_score(),
                    p.table_hint_table_limit(),
                )));
            }
            // Before v13 a write to a table the cache lacks is a bare 404 `{}`; reads go to the database.
            if matches!(*self.method, Method::POST | Method::PATCH | Method::PUT) {
                return Ok(json_response(StatusCode::NOT_FOUND, "{}".to_string()));
            }
        }
        match *self.method {
            Method::GET | Method::HEAD => self.read(name).await,
            Method::POST => self.insert(table.expect("checked above"), name).await,
            Method::PATCH => self.update(table.expect("checked above"), name).await,
            Method::DELETE => self.delete(name).await,
            Method::OPTIONS => Ok(Response::builder()
                .status(StatusCode::OK)
                .header(header::ALLOW, "OPTIONS,GET,HEAD,POST,PUT,PATCH,DELETE")
                .body(Full::new(Bytes::new()))
                .expect("valid response")),
            ref other => Err(ApiError::new(405, "PGRST117", format!("Unsupported HTTP method: {other}"))),
        }
    }

    fn select_items(&self) -> Result<Vec<SelectItem>, ApiError> {
        match self.query.iter().find(|(k, _)| k == "select") {
            Some((_, s)) => query::parse_select(s),
            None => Ok(vec![SelectItem::Star]),
        }
    }

    async fn read(&self, name: &str) -> Reply {
        let target = table_ref(self.schema, name);
        let items = self.select_items()?;
        let list = query::select_list(self.cache, self.schema, name, &target, &items, &mut 0)?;
        let mut params = Params::default();
        let conditions = query::filters(&target, self.query, &mut params)?;
        let order = query::order_by(&target, self.query)?;
        let (limit, offset) = query::limit_offset(self.query)?;
        let sql = format!(
            "SELECT coalesce(json_agg(_postgrest_t), '[]')::text, count(_postgrest_t)::bigint FROM (SELECT {list} FROM {target}{}{order}{}{}) _postgrest_t",
            where_clause(&conditions),
            limit.map(|l| format!(" LIMIT {l}")).unwrap_or_default(),
            if offset > 0 { format!(" OFFSET {offset}") } else { String::new() },
        );
        let (body, count) = self.run(true, &sql, &params).await?;
        self.rows_response(StatusCode::OK, body, count, offset, true)
    }

    async fn insert(&self, table: &Table, name: &str) -> Reply {
        let rows = parse_rows(&self.body)?;
        let columns: Vec<String> = match self.query.iter().find(|(k, _)| k == "columns") {
            Some((_, list)) => list.split(',').map(|c| c.trim().trim_matches('"').to_string()).collect(),
            None => {
                let keys = |row: &Map<String, Value>| row.keys().cloned().collect::<BTreeSet<_>>();
                let first = rows.first().map(keys).unwrap_or_default();
                if rows.iter().any(|r| keys(r) != first) {
                    return Err(ApiError::invalid_body("All object keys must match"));
                }
                rows.first().map(|r| r.keys().cloned().collect()).unwrap_or_default()
            }
        };
        let prefer = Prefer::from(self.headers);
        let target = table_ref(self.schema, name);
        let mut params = Params::default();
        let payload = params.push(Value::Array(rows.into_iter().map(Value::Object).collect()).to_string());
        let insert = if columns.is_empty() {
            format!("INSERT INTO {target} SELECT FROM json_array_elements({payload}::json) RETURNING {target}.*")
        } else {
            let record_type = self.record_type(table, &columns)?;
            let values: Vec<String> = columns
                .iter()
                .map(|c| {
                    let value = format!("pgrst_body.{}", ident(c));
                    match table.column(c).and_then(|col| col.default.as_ref()).filter(|_| prefer.missing_default) {
                        Some(default) => format!(
                            "CASE WHEN pgrst_rows.elem::jsonb ? {} THEN {value} ELSE {default} END",
                            string_literal(c)
                        ),
                        None => value,
                    }
                })
                .collect();
            let conflict = match prefer.resolution {
                None => String::new(),
                Some(resolution) => {
                    let target_columns: Vec<String> = match self.query.iter().find(|(k, _)| k == "on_conflict") {
                        Some((_, list)) => list.split(',').map(|c| ident(c.trim())).collect(),
                        None => table.primary_key.iter().map(|c| ident(c)).collect(),
                    };
                    if target_columns.is_empty() {
                        String::new()
                    } else if resolution == Resolution::IgnoreDuplicates {
                        format!(" ON CONFLICT ({}) DO NOTHING", target_columns.join(", "))
                    } else {
                        let sets: Vec<String> =
                            columns.iter().map(|c| format!("{} = EXCLUDED.{}", ident(c), ident(c))).collect();
                        format!(" ON CONFLICT ({}) DO UPDATE SET {}", target_columns.join(", "), sets.join(", "))
                    }
                }
            };
            format!(
                "INSERT INTO {target}({}) SELECT {} FROM json_array_elements({payload}::json) WITH ORDINALITY AS pgrst_rows(elem, n), \
                 LATERAL json_to_record(pgrst_rows.elem) AS pgrst_body({record_type}) ORDER BY pgrst_rows.n{conflict} RETURNING {target}.*",
                columns.iter().map(|c| ident(c)).collect::<Vec<_>>().join(", "),
                values.join(", "),
            )
        };
        self.mutate(insert, params, &prefer, StatusCode::CREATED, name).await
    }

    async fn update(&self, table: &Table, name: &str) -> Reply {
        let row = match serde_json::from_slice::<Value>(&self.body) {
            Ok(Value::Object(row)) => row,
            _ => return Err(ApiError::invalid_body("Empty or invalid json")),
        };
        let columns: Vec<String> = row.keys().cloned().collect();
        let prefer = Prefer::from(self.headers);
        if columns.is_empty() {
            return self.empty_mutation(&prefer);
        }
        let record_type = self.record_type(table, &columns)?;
        let target = table_ref(self.schema, name);
        let mut params = Params::default();
        let payload = params.push(Value::Object(row).to_string());
        let conditions = query::filters(&target, self.query, &mut params)?;
        let sets: Vec<String> = columns.iter().map(|c| format!("{} = pgrst_body.{}", ident(c), ident(c))).collect();
        let sql = format!(
            "UPDATE {target} SET {} FROM (SELECT * FROM json_to_record({payload}::json) AS pgrst_body({record_type})) pgrst_body{} RETURNING {target}.*",
            sets.join(", "),
            where_clause(&conditions)
        );
        self.mutate(sql, params, &prefer, StatusCode::OK, name).await
    }

    async fn delete(&self, name: &str) -> Reply {
        let target = table_ref(self.schema, name);
        let mut params = Params::default();
        let conditions = query::filters(&target, self.query, &mut params)?;
        let sql = format!("DELETE FROM {target}{} RETURNING {target}.*", where_clause(&conditions));
        self.mutate(sql, params, &Prefer::from(self.headers), StatusCode::OK, name).await
    }

    /// Column definitions for json_to_record, typed from the cache; an unknown key is PGRST204.
    fn record_type(&self, table: &Table, columns: &[String]) -> Result<String, ApiError> {
        columns
            .iter()
            .map(|c| match table.column(c) {
                Some(col) => Ok(format!("{} {}", ident(c), col.data_type)),
                None => {
                    Err(ApiError::new(400, "PGRST204", self.state.profile.column_not_found_message(c, &table.name)))
                }
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|defs| defs.join(", "))
    }

    async fn mutate(
        &self,
        statement: String,
        params: Params,
        prefer: &Prefer,
        representation_status: StatusCode,
        name: &str,
    ) -> Reply {
        let items = self.select_items()?;
        let list = query::select_list(self.cache, self.schema, name, "pgrst_source", &items, &mut 0)?;
        let sql = format!(
            "WITH pgrst_source AS ({statement}) SELECT coalesce(json_agg(_postgrest_t), '[]')::text, count(_postgrest_t)::bigint \
             FROM (SELECT {list} FROM pgrst_source) _postgrest_t"
        );
        let (body, count) = self.run(false, &sql, &params).await?;
        let created = *self.method == Method::POST;
        if prefer.representation {
            let status = if created { StatusCode::CREATED } else { representation_status };
            return self.rows_response(status, body, count, 0, false);
        }
        let status = if created { StatusCode::CREATED } else { StatusCode::NO_CONTENT };
        let range = if created { "*/*".to_string() } else { content_range(count, 0) };
        Ok(Response::builder()
            .status(status)
            .header(header::CONTENT_RANGE, range)
            .body(Full::new(Bytes::new()))
            .expect("valid response"))
    }

    fn empty_mutation(&self, prefer: &Prefer) -> Reply {
        if prefer.representation {
            return Ok(json_response(StatusCode::OK, "[]".to_string()));
        }
        Ok(Response::builder().status(StatusCode::NO_CONTENT).body(Full::new(Bytes::new())).expect("valid response"))
    }

    async fn rpc(&self, name: &str) -> Reply {
        let (args, read_only_request) = match *self.method {
            Method::GET | Method::HEAD => {
                let args: Map<String, Value> = self
                    .query
                    .iter()
                    .filter(|(k, _)| !query::RESERVED_KEYS.contains(&k.as_str()))
                    .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                    .collect();
                (args, true)
            }
            Method::POST => match self.body.is_empty() {
                true => (Map::new(), false),
                false => match serde_json::from_slice::<Value>(&self.body) {
                    Ok(Value::Object(args)) => (args, false),
                    _ => return Err(ApiError::invalid_body("Empty or invalid json")),
                },
            },
            ref other => return Err(ApiError::new(405, "PGRST101", format!("Cannot use the {other} method on RPC"))),
        };
        let routine = self.find_routine(name, &args)?;
        let mut params = Params::default();
        let (from, call_args) = if args.is_empty() {
            (String::new(), String::new())
        } else {
            let payload = params.push(Value::Object(args.clone()).to_string());
            let defs: Vec<String> = args
                .keys()
                .map(|k| {
                    let ty =
                        &routine.params.iter().find(|p| &p.name == k).expect("matched routine has the arg").data_type;
                    format!("{} {ty}", ident(k))
                })
                .collect();
            let call: Vec<String> = args.keys().map(|k| format!("{} := pgrst_args.{}", ident(k), ident(k))).collect();
            (format!(" FROM json_to_record({payload}::json) AS pgrst_args({})", defs.join(", ")), call.join(", "))
        };
        let function = format!("{}({call_args})", table_ref(&routine.schema, &routine.name));
        let sql = match (routine.returns_set, routine.returns_composite) {
            (_, true) => format!(
                "SELECT coalesce(json_agg(_postgrest_t), '[]')::text, count(_postgrest_t)::bigint FROM (SELECT pgrst_call.*{from}{} LATERAL {function} pgrst_call) _postgrest_t",
                if from.is_empty() { " FROM" } else { "," }
            ),
            (true, false) => format!(
                "SELECT coalesce(json_agg(_postgrest_t.pgrst_scalar), '[]')::text, count(_postgrest_t)::bigint FROM (SELECT {function} AS pgrst_scalar{from}) _postgrest_t"
            ),
            (false, false) => format!("SELECT to_json({function})::text, 1::bigint{from}"),
        };
        let read_only = read_only_request || !routine.volatile;
        let (mut body, count) = self.run(read_only, &sql, &params).await?;
        if routine.returns_composite && !routine.returns_set {
            body = serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|v| v.get(0).cloned())
                .unwrap_or(Value::Null)
                .to_string();
        }
        let _ = count;
        Ok(json_response(StatusCode::OK, body))
    }

    fn find_routine(&self, name: &str, args: &Map<String, Value>) -> Result<&Routine, ApiError> {
        let overloads = self.cache.routines_named(self.schema, name);
        let matching: Vec<&Routine> = overloads
            .iter()
            .filter(|r| {
                args.keys().all(|k| r.params.iter().any(|p| &p.name == k))
                    && r.params.iter().all(|p| p.has_default || args.contains_key(&p.name))
            })
            .collect();
        match matching.as_slice() {
            [one] => Ok(one),
            [] => Err(self.no_routine(name, args, overloads)),
            many => {
                let described: Vec<String> = many
                    .iter()
                    .map(|r| {
                        let params: Vec<String> =
                            r.params.iter().map(|p| format!("{} => {}", p.name, p.data_type)).collect();
                        format!("{}.{}({})", r.schema, r.name, params.join(", "))
                    })
                    .collect();
                Err(ApiError::new(300, "PGRST203", format!("Could not choose the best candidate function between: {}", described.join(", ")))
                    .hint(Some("Try renaming the parameters or the function itself in the database so function overloading can be resolved".to_string())))
            }
        }
    }

    fn no_routine(&self, name: &str, args: &Map<String, Value>, overloads: &[Routine]) -> ApiError {
        let keys: Vec<&str> = args.keys().map(String::as_str).collect();
        let function = format!("{}.{name}", self.schema);
        let (message_params, detail_params) = if keys.is_empty() {
            (" without parameters".to_string(), " without parameters".to_string())
        } else {
            let list = keys.join(", ");
            (format!("({list})"), format!(" with parameter{} {list}", if keys.len() > 1 { "s" } else { "" }))
        };
        let json_alternative =
            if *self.method == Method::POST { " or with a single unnamed json/jsonb parameter" } else { "" };
        let as_list = |mut names: Vec<&str>| {
            names.sort();
            format!("({})", names.join(", "))
        };
        let suggestion = if overloads.is_empty() {
            fuzzy_best(self.cache.routine_names(self.schema), name, self.state.profile.name_hint_min_score())
        } else {
            let lists: Vec<String> =
                overloads.iter().map(|r| as_list(r.params.iter().map(|p| p.name.as_str()).collect())).collect();
            fuzzy_best(lists.iter().map(String::as_str), &as_list(keys.clone()), 0.33).map(|l| format!("{name}{l}"))
        };
        ApiError::new(404, "PGRST202", format!("Could not find the function {function}{message_params} in the schema cache"))
            .details(format!("Searched for the function {function}{detail_params}{json_alternative}, but no matches were found in the schema cache."))
            .hint(suggestion.map(|s| format!("Perhaps you meant to call the function {}.{s}", self.schema)))
    }

    /// One transaction: BEGIN (READ ONLY for reads), the statement, COMMIT. Failures roll back.
    async fn run(&self, read_only: bool, sql: &str, params: &Params) -> Result<(String, i64), ApiError> {
        let mut pooled = self.state.pool.get().await.map_err(|e| match e {
            PoolError::Connect(e) => {
                ApiError::new(503, "PGRST000", self.state.profile.connection_error_message()).details(e.to_string())
            }
            PoolError::Timeout => {
                ApiError::new(504, "PGRST003", "Timed out acquiring connection from connection pool.")
            }
        })?;
        let singular = self.wants_singular();
        let client = pooled.client();
        let tx = client.build_transaction().read_only(read_only).start().await.map_err(db_error)?;
        let row = tx.query_one(sql, &params.as_refs()).await.map_err(db_error)?;
        let (body, count): (String, i64) = (row.get(0), row.get(1));
        if singular && count != 1 {
            let _ = tx.rollback().await;
            return Err(ApiError::new(406, "PGRST116", "Cannot coerce the result to a single JSON object")
                .details(format!("The result contains {count} rows")));
        }
        tx.commit().await.map_err(db_error)?;
        Ok((body, count))
    }

    fn wants_singular(&self) -> bool {
        self.headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("application/vnd.pgrst.object"))
    }

    fn rows_response(&self, status: StatusCode, body: String, count: i64, offset: u64, ranged: bool) -> Reply {
        let body = if self.wants_singular() {
            serde_json::from_str::<Value>(&body).ok().and_then(|v| v.get(0).cloned()).unwrap_or(Value::Null).to_string()
        } else {
            body
        };
        let range = if ranged { content_range(count, offset) } else { "*/*".to_string() };
        let mut response = json_response(status, body);
        response.headers_mut().insert(header::CONTENT_RANGE, range.parse().expect("valid range"));
        Ok(response)
    }
}

fn db_error(e: tokio_postgres::Error) -> ApiError {
    match e.as_db_error() {
        Some(db) => ApiError::from_db(db),
        None => {
            ApiError::new(503, "PGRST001", "Database client error. Retrying the connection.").details(e.to_string())
        }
    }
}

fn content_range(count: i64, offset: u64) -> String {
    if count == 0 {
        "*/*".to_string()
    } else {
        format!("{offset}-{}/*", offset + count as u64 - 1)
    }
}

fn where_clause(conditions: &[String]) -> String {
    if conditions.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conditions.join(" AND "))
    }
}

fn json_response(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json; charset=utf-8")
        .body(Full::new(Bytes::from(body)))
        .expect("valid response")
}

fn parse_rows(body: &[u8]) -> Result<Vec<Map<String, Value>>, ApiError> {
    let invalid = || ApiError::invalid_body("Empty or invalid json");
    match serde_json::from_slice::<Value>(body).map_err(|_| invalid())? {
        Value::Object(row) => Ok(vec![row]),
        Value::Array(items) => items
            .into_iter()
            .map(|v| match v {
                Value::Object(row) => Ok(row),
                _ => Err(invalid()),
            })
            .collect(),
        _ => Err(invalid()),
    }
}

fn select_schema(state: &State, method: &Method, headers: &HeaderMap) -> Result<String, ApiError> {
    let header_name = if matches!(*method, Method::GET | Method::HEAD) { "accept-profile" } else { "content-profile" };
    match headers.get(header_name).and_then(|v| v.to_str().ok()) {
        None => Ok(state.schemas[0].clone()),
        Some(wanted) if state.schemas.iter().any(|s| s == wanted) => Ok(wanted.to_string()),
        Some(wanted) => Err(ApiError::new(406, "PGRST106", format!("Invalid schema: {wanted}"))
            .hint(Some(state.profile.invalid_schema_hint(&state.schemas)))),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Resolution {
    MergeDuplicates,
    IgnoreDuplicates,
}

#[derive(Default)]
struct Prefer {
    representation: bool,
    missing_default: bool,
    resolution: Option<Resolution>,
}

impl From<&HeaderMap> for Prefer {
    fn from(headers: &HeaderMap) -> Prefer {
        let mut prefer = Prefer::default();
        for value in headers.get_all("prefer").iter().filter_map(|v| v.to_str().ok()) {
            for token in value.split(',').map(str::trim) {
                match token {
                    "return=representation" => prefer.representation = true,
                    "missing=default" => prefer.missing_default = true,
                    "resolution=merge-duplicates" => prefer.resolution = Some(Resolution::MergeDuplicates),
                    "resolution=ignore-duplicates" => prefer.resolution = Some(Resolution::IgnoreDuplicates),
                    _ => {}
                }
            }
        }
        prefer
    }
}

fn cors_preflight(headers: &HeaderMap) -> Response<Full<Bytes>> {
    let requested =
        headers.get(header::ACCESS_CONTROL_REQUEST_HEADERS).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let mut allowed = "Authorization".to_string();
    if !requested.is_empty() {
        allowed = format!("{allowed}, {requested}");
    }
    Response::builder()
        .status(StatusCode::OK)
        .header(header::ACCESS_CONTROL_ALLOW_METHODS, "GET, POST, PATCH, PUT, DELETE, OPTIONS, HEAD")
        .header(header::ACCESS_CONTROL_ALLOW_HEADERS, allowed)
        .header(header::ACCESS_CONTROL_MAX_AGE, "86400")
        .body(Full::new(Bytes::new()))
        .expect("valid response")
}

fn openapi(cache: &SchemaCache, schema: &str) -> Value {
    let paths: Map<String, Value> = cache
        .table_names(schema)
        .into_iter()
        .map(|t| (format!("/{t}"), serde_json::json!({})))
        .chain(cache.routine_names(schema).into_iter().map(|r| (format!("/rpc/{r}"), serde_json::json!({}))))
        .collect();
    serde_json::json!({ "swagger": "2.0", "info": { "title": "PostgREST double" }, "paths": paths })
}

pub fn query_pairs(uri: &http::Uri) -> Vec<(String, String)> {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

pub fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
