//! What a schema-cache error names, as the heal reads it and the catalog check resolves it: a
//! neutral module both depend on, so that neither depends on the other.

use http::Method;

/// PostgreSQL's identifiers are at most this long (NAMEDATALEN - 1): a longer name is no catalog
/// object, whatever a client sends.
pub const MAX_IDENTIFIER_BYTES: usize = 63;

/// What the error says is missing, read from PostgREST's message.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum MissingObject {
    Column {
        table: String,
        column: String,
    },
    Table {
        schema: String,
        table: String,
    },
    /// `args` are the argument names PostgREST looked for (the request's keys); `call` how the
    /// request passes them, which decides whether a single argument can take the body, and
    /// `single_argument_unnamed` whether that argument must be unnamed (PostgREST 14.2 and later).
    Function {
        schema: String,
        name: String,
        args: Vec<String>,
        call: CallShape,
        single_argument_unnamed: bool,
    },
    /// `hint` is the embed's `!hint` (a foreign key's name, one of its columns, or a junction table).
    Relationship {
        parent: String,
        child: String,
        hint: Option<String>,
    },
    /// A write's body that PostgreSQL could not cast: `cast_to` is the type the error names (the
    /// one PostgREST cast to, from its cache), `columns` the body's columns (sorted). For 42804 the
    /// error also names the `column` and its `current` type.
    ColumnTypes {
        table: String,
        columns: Vec<String>,
        cast_to: String,
        column: Option<String>,
        current: Option<String>,
    },
    Unknown,
}

/// How an RPC passes its arguments (PostgREST's `findProc`): by query string, or in a POST body whose
/// media type decides which single unnamed argument may take the whole body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CallShape {
    /// GET or HEAD: named arguments from the query string.
    Get,
    /// A JSON body: named arguments, or one unnamed `json`/`jsonb` argument.
    Json,
    /// `text/plain`: one unnamed `text` argument.
    Text,
    /// `text/xml`: one unnamed `xml` argument.
    Xml,
    /// `application/octet-stream`: one unnamed `bytea` argument.
    Bytea,
}

impl CallShape {
    /// How the catalog's SQL names it.
    pub fn as_str(self) -> &'static str {
        match self {
            CallShape::Get => "get",
            CallShape::Json => "json",
            CallShape::Text => "text",
            CallShape::Xml => "xml",
            CallShape::Bytea => "bytea",
        }
    }

    /// The shape of a call with `method` and `content_type`.
    pub fn of(method: &Method, content_type: Option<&str>) -> CallShape {
        if matches!(*method, Method::GET | Method::HEAD) {
            return CallShape::Get;
        }
        let media = content_type.unwrap_or("application/json").split(';').next().unwrap_or_default().trim();
        match media.to_ascii_lowercase().as_str() {
            "text/plain" => CallShape::Text,
            "text/xml" => CallShape::Xml,
            "application/octet-stream" => CallShape::Bytea,
            _ => CallShape::Json,
        }
    }
}
