//! Turns PostgREST's URL grammar (select, filters, order, limit/offset) into SQL. Identifiers are
//! quoted; every client value travels as a bound parameter in text format with its type left to
//! PostgreSQL, as PostgREST's "unknown" literals do.

use std::error::Error;

use bytes::BytesMut;
use tokio_postgres::types::{Format, IsNull, ToSql, Type};

use super::cache::{fuzzy_best, qualified, Relationship, SchemaCache};
use super::error::ApiError;

/// A client value bound as a text-format parameter whose type PostgreSQL infers.
#[derive(Debug, Clone)]
pub struct Literal(pub String);

impl ToSql for Literal {
    fn to_sql(&self, _ty: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        out.extend_from_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }

    fn encode_format(&self, _ty: &Type) -> Format {
        Format::Text
    }

    tokio_postgres::types::to_sql_checked!();
}

pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

pub fn string_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

pub fn table_ref(schema: &str, table: &str) -> String {
    format!("{}.{}", ident(schema), ident(table))
}

/// Collects bound parameters and hands out their `$n` placeholders.
#[derive(Default)]
pub struct Params(pub Vec<Literal>);

impl Params {
    pub fn push(&mut self, value: impl Into<String>) -> String {
        self.0.push(Literal(value.into()));
        format!("${}", self.0.len())
    }

    pub fn as_refs(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.0.iter().map(|p| p as &(dyn ToSql + Sync)).collect()
    }
}

#[derive(Debug, Clone)]
pub enum SelectItem {
    Star,
    Column { name: String, alias: Option<String> },
    Embed { target: String, alias: Option<String>, hint: Option<String>, items: Vec<SelectItem> },
}

pub fn parse_select(text: &str) -> Result<Vec<SelectItem>, ApiError> {
    split_top_level(text).into_iter().map(|raw| parse_select_item(raw.trim(), text)).collect()
}

fn parse_select_item(raw: &str, whole: &str) -> Result<SelectItem, ApiError> {
    let parse_error = || {
        ApiError::query_param(
            format!("\"failed to parse select parameter ({whole})\" (line 1, column 1)"),
            format!("unexpected \"{raw}\""),
        )
    };
    if raw.is_empty() {
        return Err(parse_error());
    }
    let (alias, rest) = match raw.split_once(':') {
        Some((a, r)) if !a.contains('(') && !r.starts_with(':') => (Some(a.trim().to_string()), r.trim()),
        _ => (None, raw),
    };
    if let Some(open) = rest.find('(') {
        if !rest.ends_with(')') {
            return Err(parse_error());
        }
        let head = &rest[..open];
        let inner = &rest[open + 1..rest.len() - 1];
        let (target, hint) = match head.split_once('!') {
            Some((t, h)) => (t.to_string(), Some(h.to_string())),
            None => (head.to_string(), None),
        };
        let items = if inner.trim().is_empty() { vec![SelectItem::Star] } else { parse_select(inner)? };
        return Ok(SelectItem::Embed { target, alias, hint, items });
    }
    if rest == "*" {
        return Ok(SelectItem::Star);
    }
    if rest.contains("::") || rest.contains("->") || !valid_name(rest) {
        return Err(parse_error());
    }
    Ok(SelectItem::Column { name: rest.to_string(), alias })
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_alphanumeric() || c == '_' || c == '$' || c == ' ' || c == '-')
}

/// Splits on commas that are not inside parentheses or double quotes.
pub fn split_top_level(text: &str) -> Vec<&str> {
    let (mut depth, mut quoted, mut start) = (0i32, false, 0);
    let mut parts = Vec::new();
    for (i, c) in text.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted => depth -= 1,
            ',' if !quoted && depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

/// Builds the select list for rows of `schema.table` reachable as `qualifier` in SQL.
pub fn select_list(
    cache: &SchemaCache,
    schema: &str,
    table: &str,
    qualifier: &str,
    items: &[SelectItem],
    depth: &mut usize,
) -> Result<String, ApiError> {
    let mut out = Vec::new();
    for item in items {
        match item {
            SelectItem::Star => out.push(format!("{qualifier}.*")),
            SelectItem::Column { name, alias } => {
                let column = format!("{qualifier}.{}", ident(name));
                out.push(match alias {
                    Some(a) => format!("{column} AS {}", ident(a)),
                    None => column,
                });
            }
            SelectItem::Embed { target, alias, hint, items } => {
                let relationship = resolve_relationship(cache, schema, table, target, hint.as_deref())?;
                *depth += 1;
                let inner_alias = format!("pgrst_{depth}");
                let (target_schema, target_table) = relationship.target_table();
                let inner_list = select_list(cache, target_schema, target_table, &inner_alias, items, depth)?;
                let fk = relationship.foreign_key();
                let join: Vec<String> = fk
                    .columns
                    .iter()
                    .zip(&fk.foreign_columns)
                    .map(|(own, foreign)| match relationship {
                        Relationship::ManyToOne(_) => {
                            format!("{inner_alias}.{} = {qualifier}.{}", ident(foreign), ident(own))
                        }
                        Relationship::OneToMany(_) => {
                            format!("{inner_alias}.{} = {qualifier}.{}", ident(own), ident(foreign))
                        }
                    })
                    .collect();
                let from = format!(
                    "SELECT {inner_list} FROM {} AS {inner_alias} WHERE {}",
                    table_ref(target_schema, target_table),
                    join.join(" AND ")
                );
                let name = ident(alias.as_deref().unwrap_or(target));
                out.push(match relationship {
                    Relationship::ManyToOne(_) => {
                        format!("(SELECT row_to_json(pgrst_row) FROM ({from}) pgrst_row) AS {name}")
                    }
                    Relationship::OneToMany(_) => {
                        format!("COALESCE((SELECT json_agg(pgrst_row) FROM ({from}) pgrst_row), '[]') AS {name}")
                    }
                });
            }
        }
    }
    Ok(out.join(", "))
}

fn resolve_relationship<'a>(
    cache: &'a SchemaCache,
    schema: &str,
    table: &str,
    target: &str,
    hint: Option<&str>,
) -> Result<Relationship<'a>, ApiError> {
    let candidates: Vec<Relationship> = cache
        .relationships_of(schema, table)
        .into_iter()
        .filter(|r| r.target_table() == (schema, target))
        .filter(|r| match hint {
            None => true,
            Some(h) => r.foreign_key().constraint == h || r.foreign_key().columns.iter().any(|c| c == h),
        })
        .collect();
    match candidates.len() {
        1 => Ok(candidates.into_iter().next().expect("one candidate")),
        0 => Err(no_relationship(cache, schema, table, target, hint)),
        _ => Err(ambiguous_relationship(table, target, &candidates)),
    }
}

fn no_relationship(cache: &SchemaCache, schema: &str, parent: &str, child: &str, hint: Option<&str>) -> ApiError {
    let using = hint.map(|h| format!("' using the hint '{h}")).unwrap_or_default();
    let parent_relationships = cache.relationships_of(schema, parent);
    let suggestion = if parent_relationships.is_empty() {
        fuzzy_best(cache.tables_with_relationships(schema), parent, 0.33)
            .map(|p| format!("Perhaps you meant '{p}' instead of '{parent}'."))
    } else {
        let children: Vec<&str> = parent_relationships.iter().map(|r| r.target_table().1).collect();
        fuzzy_best(children.iter().copied().filter(|c| *c != child), child, 0.33)
            .filter(|_| !children.contains(&child))
            .map(|c| format!("Perhaps you meant '{c}' instead of '{child}'."))
    };
    ApiError::new(400, "PGRST200", format!("Could not find a relationship between '{parent}' and '{child}' in the schema cache"))
        .details(format!(
            "Searched for a foreign key relationship between '{parent}' and '{child}{using}' in the schema '{schema}', but no matches were found."
        ))
        .hint(suggestion)
}

fn ambiguous_relationship(parent: &str, child: &str, candidates: &[Relationship]) -> ApiError {
    let describe = |r: &Relationship| {
        let fk = r.foreign_key();
        let (cardinality, from, to, from_cols, to_cols) = match r {
            Relationship::ManyToOne(_) => {
                ("many-to-one", &fk.table, &fk.foreign_table, &fk.columns, &fk.foreign_columns)
            }
            Relationship::OneToMany(_) => {
                ("one-to-many", &fk.foreign_table, &fk.table, &fk.foreign_columns, &fk.columns)
            }
        };
        serde_json::json!({
            "cardinality": cardinality,
            "embedding": format!("{from} with {to}"),
            "relationship": format!("{} using {from}({}) and {to}({})", fk.constraint, from_cols.join(", "), to_cols.join(", ")),
        })
    };
    let hints: Vec<String> = candidates.iter().map(|r| format!("'{child}!{}'", r.foreign_key().constraint)).collect();
    let mut error = ApiError::new(
        300,
        "PGRST201",
        format!("Could not embed because more than one relationship was found for '{parent}' and '{child}'"),
    )
    .hint(Some(format!(
        "Try changing '{child}' to one of the following: {}. Find the desired relationship in the 'details' key.",
        hints.join(", ")
    )));
    error.details = Some(serde_json::Value::Array(candidates.iter().map(describe).collect()));
    error
}

/// Query-string keys that are not filters.
pub const RESERVED_KEYS: &[&str] = &["select", "order", "limit", "offset", "columns", "on_conflict"];

/// `col=op.value` and `col=not.op.value` filters, ANDed.
pub fn filters(qualifier: &str, query: &[(String, String)], params: &mut Params) -> Result<Vec<String>, ApiError> {
    let mut out = Vec::new();
    for (key, value) in query {
        if RESERVED_KEYS.contains(&key.as_str()) {
            continue;
        }
        if key == "or" || key == "and" || key.contains('.') {
            return Err(ApiError::new(400, "PGRST127", "Feature not implemented")
                .details("logical operators and filters on embedded resources are not imitated by the double"));
        }
        out.push(filter(qualifier, key, value, params)?);
    }
    Ok(out)
}

fn filter(qualifier: &str, column: &str, value: &str, params: &mut Params) -> Result<String, ApiError> {
    let parse_error = |what: &str| {
        ApiError::query_param(
            format!("\"failed to parse filter ({value})\" (line 1, column 1)"),
            format!("unexpected \"{what}\" expecting \"not\" or operator (eq, gt, ...)"),
        )
    };
    let (negated, rest) = match value.strip_prefix("not.") {
        Some(r) => (true, r),
        None => (false, value),
    };
    let (operator, operand) = rest.split_once('.').ok_or_else(|| parse_error(rest))?;
    let column_sql = format!("{qualifier}.{}", ident(column));
    let condition = match operator {
        "eq" | "neq" | "gt" | "gte" | "lt" | "lte" => {
            let sql_op = match operator {
                "eq" => "=",
                "neq" => "<>",
                "gt" => ">",
                "gte" => ">=",
                "lt" => "<",
                _ => "<=",
            };
            format!("{column_sql} {sql_op} {}", params.push(operand))
        }
        "like" | "ilike" => {
            let sql_op = if operator == "like" { "LIKE" } else { "ILIKE" };
            format!("{column_sql} {sql_op} {}", params.push(operand.replace('*', "%")))
        }
        "in" => {
            let list =
                operand.strip_prefix('(').and_then(|s| s.strip_suffix(')')).ok_or_else(|| parse_error(operand))?;
            let items: Vec<String> = if list.is_empty() {
                Vec::new()
            } else {
                split_top_level(list).into_iter().map(|i| array_element(i.trim())).collect()
            };
            format!("{column_sql} = ANY ({})", params.push(format!("{{{}}}", items.join(","))))
        }
        "is" => {
            let keyword = match operand.to_ascii_lowercase().as_str() {
                "null" => "NULL",
                "not_null" => "NOT NULL",
                "true" => "TRUE",
                "false" => "FALSE",
                "unknown" => "UNKNOWN",
                _ => return Err(parse_error(operand)),
            };
            format!("{column_sql} IS {keyword}")
        }
        other => return Err(parse_error(other)),
    };
    Ok(if negated { format!("NOT {condition}") } else { condition })
}

/// One element of a PostgreSQL array literal, always double-quoted.
fn array_element(item: &str) -> String {
    let unquoted = item.strip_prefix('"').and_then(|s| s.strip_suffix('"')).unwrap_or(item);
    format!("\"{}\"", unquoted.replace('\\', "\\\\").replace('"', "\\\""))
}

pub fn order_by(qualifier: &str, query: &[(String, String)]) -> Result<String, ApiError> {
    let Some((_, order)) = query.iter().find(|(k, _)| k == "order") else {
        return Ok(String::new());
    };
    let mut terms = Vec::new();
    for term in order.split(',') {
        let mut parts = term.split('.');
        let column = parts.next().unwrap_or_default();
        if !valid_name(column) {
            return Err(ApiError::query_param(
                format!("\"failed to parse order ({order})\" (line 1, column 1)"),
                format!("unexpected \"{term}\""),
            ));
        }
        let mut sql = format!("{qualifier}.{}", ident(column));
        for modifier in parts {
            sql.push_str(match modifier {
                "asc" => " ASC",
                "desc" => " DESC",
                "nullsfirst" => " NULLS FIRST",
                "nullslast" => " NULLS LAST",
                _ => {
                    return Err(ApiError::query_param(
                        format!("\"failed to parse order ({order})\" (line 1, column 1)"),
                        format!(
                            "unexpected \"{modifier}\" expecting \"asc\", \"desc\", \"nullsfirst\" or \"nullslast\""
                        ),
                    ))
                }
            });
        }
        terms.push(sql);
    }
    Ok(format!(" ORDER BY {}", terms.join(", ")))
}

pub fn limit_offset(query: &[(String, String)]) -> Result<(Option<u64>, u64), ApiError> {
    let number = |key: &str| -> Result<Option<u64>, ApiError> {
        match query.iter().find(|(k, _)| k == key) {
            None => Ok(None),
            Some((_, v)) => v.parse().map(Some).map_err(|_| {
                ApiError::query_param(
                    format!("\"failed to parse {key} parameter ({v})\" (line 1, column 1)"),
                    "unexpected input expecting digit",
                )
            }),
        }
    };
    Ok((number("limit")?, number("offset")?.unwrap_or(0)))
}

/// Fuzzy table hint of PGRST205, honouring the profile's score and table-count rules.
pub fn table_hint(
    cache: &SchemaCache,
    schema: &str,
    table: &str,
    min_score: f64,
    limit: Option<usize>,
) -> Option<String> {
    let names = cache.table_names(schema);
    if limit.is_some_and(|l| names.len() >= l) {
        return None;
    }
    fuzzy_best(names, table, min_score).map(|t| format!("Perhaps you meant the table '{}'", qualified(schema, &t)))
}
