//! The catalog check: before a reload, ask the database whether PostgREST *would cache* the object a
//! schema-cache error names after a reload. If it would, the cache is stale and a reload cures it; if
//! not — the object does not exist, or it is one PostgREST never caches (a trigger function, a
//! procedure, a partition, a junction it does not recognise) — the error is permanent and passes
//! through. One query per kind of object, each in its own `.sql` file beside the PostgREST source it
//! models.
//!
//! Whatever the model misses, the guard learns from the outcome: when a reload that began after the
//! catalog confirmed an object has completed and the same error comes back, the object is marked,
//! and no further reload is asked for it until its definition changes. A mark is keyed by the
//! catalog object the query resolved (a relation's oid, a function's name in its schema, an
//! embed's origin and target), never by the request's text, so a client that varies a value, an
//! argument name or a hint meets the same mark; and it holds a fingerprint of what PostgREST caches
//! of the object (names, types with modifiers, defaults, keys, signatures), never row versions, so
//! TRUNCATE, GRANT, VACUUM FULL or an identical CREATE OR REPLACE change nothing, while a migration
//! that changes the object does, and a request sent after it heals as before.
//!
//! ```text
//!  request ──► check(object, sent_at) ──► an answer from a query that began after sent_at? ──► reply
//!                    │ no                                                      ▲
//!                    └──► queued for the next batch ──► batch worker ──────────┘
//!                          (one entry per object,        (its own task: one query per kind for
//!                           joined by every request)      every queued object, at most one batch
//!                                                         per PGRST_GUARD_CATALOG_RECHECK_MS)
//! ```
//!
//! Why a remembered answer never outlives the DDL that ends it: an answer serves only requests whose
//! failed answer was requested *before* its query began, so its snapshot is newer than the cache
//! that failed them. Why a flood cannot delay a real heal: every queued object, however many, goes
//! into the next batch, so a real check waits for at most one batch interval and one query, and the
//! database sees at most one batch of queries per interval. The batch worker is a task of its own: a
//! client that leaves changes nothing for the others waiting on the same answer.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_postgres::types::Type;

use super::database::Database;
use crate::schema_object::{MissingObject, MAX_IDENTIFIER_BYTES};

/// PostgREST's cache of tables and views: `src/PostgREST/SchemaCache.hs` (`tablesSqlQuery`).
static TABLES_SQL: LazyLock<String> = LazyLock::new(|| with_fingerprints(include_str!("tables.sql")));
/// PostgREST's cached columns of tables and views (`tablesSqlQuery`'s `columns`).
static COLUMNS_SQL: LazyLock<String> = LazyLock::new(|| with_fingerprints(include_str!("columns.sql")));
/// PostgREST's cached functions (`funcsSqlQuery`) and how a call resolves (`Plan.hs` `findProc`).
const FUNCTIONS_SQL: &str = include_str!("functions.sql");
/// PostgREST's relationships (`allM2OandO2ORels`, `addM2MRels`, views, computed relationships) and
/// how an embed resolves (`Plan.hs` `findRel`).
static RELATIONSHIPS_SQL: LazyLock<String> = LazyLock::new(|| with_fingerprints(include_str!("relationships.sql")));
/// The column types PostgREST casts a write's body to (`colNominalType`, `fromJsonBodyF`).
static COLUMN_TYPES_SQL: LazyLock<String> = LazyLock::new(|| with_fingerprints(include_str!("column_types.sql")));
/// What PostgREST caches of one relation, hashed; shared by every query that names a relation, so
/// that a mark set through one kind of error holds for the others.
const RELATION_FINGERPRINT_SQL: &str = include_str!("relation_fingerprint.sql");

/// Puts the relation fingerprint where a query asks for it: `{relation_fingerprint(c)}` for the
/// pg_class alias `c`.
fn with_fingerprints(sql: &str) -> String {
    let expression: String = RELATION_FINGERPRINT_SQL
        .lines()
        .filter(|line| !line.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = sql.to_string();
    while let Some(start) = out.find("{relation_fingerprint(") {
        let end = start + out[start..].find(")}").expect("a closed placeholder") + 2;
        let alias = &out[start + "{relation_fingerprint(".len()..end - 2];
        let expanded = expression.replace(":rel", alias);
        out.replace_range(start..end, &expanded);
    }
    out
}

/// The catalog object a check resolved to, and what PostgREST caches of it. Marks are keyed by the
/// identity (oids and names the catalog vouched for), never by the text of a request or a message,
/// so a client that varies its text meets the same mark.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Definition {
    pub identity: Arc<str>,
    pub fingerprint: Arc<str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatalogAnswer {
    /// PostgREST would cache it after a reload.
    Exists,
    /// PostgREST would not cache it (or it does not exist).
    Missing,
    /// Missing, by a query another request started after this one's answer was requested.
    SharedMissing,
    /// It exists, but a reload that surely saw it has finished everywhere and a replay after it
    /// still met the same error (a replica may lag): no reload is asked for it again in this
    /// definition, though a replay may still succeed.
    Doubted,
    /// It exists, but a heal that waited out a reload which surely saw it gave up on the same
    /// error, and its definition has not changed since: the error passes through at once.
    Uncurable,
    /// The database could not be asked in time.
    Unknown,
}

impl CatalogAnswer {
    pub fn as_str(self) -> &'static str {
        match self {
            CatalogAnswer::Exists => "exists",
            CatalogAnswer::Missing => "missing",
            CatalogAnswer::SharedMissing => "shared_missing",
            CatalogAnswer::Doubted => "doubted",
            CatalogAnswer::Uncurable => "uncurable",
            CatalogAnswer::Unknown => "unknown",
        }
    }

    pub fn is_missing(self) -> bool {
        matches!(self, CatalogAnswer::Missing | CatalogAnswer::SharedMissing)
    }
}

/// What one check tells a request.
#[derive(Clone, Debug)]
pub struct CatalogReply {
    pub answer: CatalogAnswer,
    /// For [`CatalogAnswer::Exists`]: since when the object is known to exist in this definition (a
    /// NOTIFY sent after that reaches a load that sees it); otherwise when the answer came.
    pub known_since: Instant,
    /// The catalog object and its definition, for [`CatalogCheck::reload_did_not_cure`].
    pub definition: Option<Definition>,
}

type CheckKey = (String, MissingObject);

/// One finished query's word on one object.
#[derive(Clone, Debug)]
struct Answered {
    /// When the batch's query began: it serves requests sent before.
    began: Instant,
    /// None: the query failed.
    cached: Option<bool>,
    definition: Option<Definition>,
    known_since: Instant,
}

#[derive(Default)]
struct State {
    /// The newest answer per request text, bounded by [`MAX_KEYS`]; `answered_order` lists them
    /// oldest first, so the oldest goes in O(1) (an entry whose answer was replaced since is skipped).
    known: HashMap<CheckKey, Answered>,
    answered_order: VecDeque<(CheckKey, Instant)>,
    /// The names the remembered answers' keys hold, in bytes, bounded by [`MAX_KEY_BYTES`].
    known_bytes: usize,
    /// Objects waiting for the next batch, each with the channel its answer goes out on.
    queued: HashMap<CheckKey, watch::Sender<Option<Answered>>>,
    /// Catalog objects a completed reload did not cure, by identity, with the fingerprint they had
    /// then. Only a reload sets one, so a flood of requests cannot add any, nor push one out.
    marks: HashMap<Arc<str>, (Arc<str>, Mark)>,
    marks_order: VecDeque<Arc<str>>,
}

/// What a reload that surely saw an object left behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mark {
    Doubted,
    Uncurable,
}

struct Shared {
    database: Arc<Database>,
    /// The shortest time between two batches.
    spacing: Duration,
    state: Mutex<State>,
    wake: Notify,
}

pub struct CatalogCheck {
    shared: Arc<Shared>,
}

/// Objects remembered at most (answers, and uncured definitions); the oldest are forgotten first.
const MAX_KEYS: usize = 10_000;
/// The names remembered answers may hold in all: a flood of long distinct names (a call with a
/// hundred 63-byte argument names is 6 KiB) costs at most this, however many keys it brings.
const MAX_KEY_BYTES: usize = 4 << 20;
/// A batch's queries end by then, whatever the database does.
const BATCH_DEADLINE: Duration = Duration::from_secs(5);

impl CatalogCheck {
    /// Starts the batch worker on the current runtime. `spacing` is the shortest time between two
    /// batches (`PGRST_GUARD_CATALOG_RECHECK_MS`).
    pub fn new(database: Arc<Database>, spacing: Duration) -> CatalogCheck {
        let shared = Arc::new(Shared { database, spacing, state: Mutex::new(State::default()), wake: Notify::new() });
        tokio::spawn(run_batches(Arc::downgrade(&shared)));
        CatalogCheck { shared }
    }

    /// Would PostgREST cache `object` after a reload, by a catalog snapshot taken after
    /// `requested_at` (when the request whose answer named it was sent)? `schema` is the request's
    /// schema (Accept-/Content-Profile or the first exposed one), used where PostgREST's message
    /// does not qualify the name. Exposure needs no check of its own: PostgREST answers PGRST106
    /// for an unexposed profile before any schema-cache error, so every schema an error names is
    /// exposed. Gives up with [`CatalogAnswer::Unknown`] at `deadline`.
    pub async fn check(
        &self,
        object: &MissingObject,
        schema: &str,
        requested_at: Instant,
        deadline: Instant,
    ) -> CatalogReply {
        let unknown = || CatalogReply { answer: CatalogAnswer::Unknown, known_since: Instant::now(), definition: None };
        if *object == MissingObject::Unknown {
            return unknown();
        }
        if !names_fit(object, schema) {
            return CatalogReply { answer: CatalogAnswer::Missing, known_since: Instant::now(), definition: None };
        }
        let key = (schema.to_string(), object.clone());
        let (mut receiver, first) = {
            let mut state = self.shared.state.lock().expect("catalog lock");
            if let Some(known) = state.known.get(&key).filter(|known| known.began >= requested_at) {
                let known = known.clone();
                return reply(&state, &known, false);
            }
            match state.queued.get(&key) {
                Some(queued) => (queued.subscribe(), false),
                None => {
                    let (publish, receiver) = watch::channel(None);
                    state.queued.insert(key.clone(), publish);
                    (receiver, true)
                }
            }
        };
        self.shared.wake.notify_one();
        let answered = tokio::time::timeout_at(deadline, receiver.wait_for(Option::is_some))
            .await
            .ok()
            .and_then(|answered| answered.ok().and_then(|answered| answered.clone()));
        match answered {
            Some(answered) => {
                let state = self.shared.state.lock().expect("catalog lock");
                reply(&state, &answered, first)
            }
            None => unknown(),
        }
    }

    /// A reload that began after the catalog confirmed the object (in `definition`) has finished
    /// everywhere, and a replay after it still met the same error: no reload is asked for it again
    /// until its definition changes.
    pub fn doubt(&self, definition: &Definition) {
        self.mark(definition, Mark::Doubted);
    }

    /// A heal that waited out a completed reload which surely saw the object gave up on the same
    /// error: until its definition changes, its error passes through at once.
    pub fn reload_did_not_cure(&self, object: &MissingObject, definition: &Definition) {
        tracing::warn!(object = ?object, identity = %definition.identity, "a reload that saw the object did not cure its error; no more reloads for it until its definition changes");
        self.mark(definition, Mark::Uncurable);
    }

    /// A replay for the object succeeded: whatever was doubted of it is forgotten.
    pub fn cured(&self, definition: &Definition) {
        let mut state = self.shared.state.lock().expect("catalog lock");
        if !state.marks.is_empty() {
            state.marks.remove(&definition.identity);
        }
    }

    /// What the check remembers now: answers, the bytes of their keys' names, and marks.
    pub fn remembered(&self) -> Remembered {
        let state = self.shared.state.lock().expect("catalog lock");
        Remembered { answers: state.known.len(), answer_bytes: state.known_bytes, marks: state.marks.len() }
    }

    /// Is the object, in this definition, doubted or uncurable?
    pub fn marked(&self, definition: &Definition) -> bool {
        let state = self.shared.state.lock().expect("catalog lock");
        state.marks.get(&definition.identity).is_some_and(|(marked, _)| *marked == definition.fingerprint)
    }

    fn mark(&self, definition: &Definition, mark: Mark) {
        let mut state = self.shared.state.lock().expect("catalog lock");
        let identity = definition.identity.clone();
        if !state.marks.contains_key(&identity) {
            while state.marks.len() >= MAX_KEYS {
                let Some(oldest) = state.marks_order.pop_front() else { break };
                state.marks.remove(&oldest);
            }
            state.marks_order.push_back(identity.clone());
        }
        let mark = match state.marks.get(&identity) {
            // Uncurable stays so until the definition changes.
            Some((same, Mark::Uncurable)) if *same == definition.fingerprint => Mark::Uncurable,
            _ => mark,
        };
        state.marks.insert(identity, (definition.fingerprint.clone(), mark));
    }
}

/// Are the names `object` carries short enough to be catalog objects at all?
fn names_fit(object: &MissingObject, schema: &str) -> bool {
    let fits = |name: &str| name.len() <= MAX_IDENTIFIER_BYTES;
    fits(schema)
        && match object {
            MissingObject::Column { table, column } => fits(table) && fits(column),
            MissingObject::Table { schema, table } => fits(schema) && fits(table),
            // FUNC_MAX_ARGS is 100: a call with more keys matches no function.
            MissingObject::Function { schema, name, args, .. } => {
                fits(schema) && fits(name) && args.len() <= 100 && args.iter().all(|a| fits(a))
            }
            MissingObject::Relationship { parent, child, hint } => {
                fits(parent) && fits(child) && hint.as_deref().is_none_or(fits)
            }
            // MaxHeapAttributeNumber is 1600.
            MissingObject::ColumnTypes { table, columns, column, .. } => {
                fits(table)
                    && columns.len() <= 1600
                    && columns.iter().all(|c| fits(c))
                    && column.as_deref().is_none_or(fits)
            }
            MissingObject::Unknown => false,
        }
}

/// The reply for `key` from `answered`: the first asker of a batch gets the query's own word,
/// joiners a shared one, and an object a reload did not cure in the same definition is uncurable.
fn reply(state: &State, answered: &Answered, first: bool) -> CatalogReply {
    let mark = answered.definition.as_ref().and_then(|definition| {
        state.marks.get(&definition.identity).filter(|(marked, _)| *marked == definition.fingerprint).map(|(_, m)| *m)
    });
    let answer = match (answered.cached, mark) {
        (None, _) => CatalogAnswer::Unknown,
        (Some(true), Some(Mark::Uncurable)) => CatalogAnswer::Uncurable,
        (Some(true), Some(Mark::Doubted)) => CatalogAnswer::Doubted,
        (Some(true), None) => CatalogAnswer::Exists,
        (Some(false), _) if first => CatalogAnswer::Missing,
        (Some(false), _) => CatalogAnswer::SharedMissing,
    };
    let definition =
        matches!(answer, CatalogAnswer::Exists | CatalogAnswer::Doubted).then(|| answered.definition.clone()).flatten();
    CatalogReply { answer, known_since: answered.known_since, definition }
}

/// The batch worker: waits for queued objects, at most one batch per spacing, and answers every
/// object queued before the batch began.
async fn run_batches(shared: Weak<Shared>) {
    let mut last_began: Option<Instant> = None;
    loop {
        let Some(strong) = shared.upgrade() else { return };
        if strong.state.lock().expect("catalog lock").queued.is_empty() {
            // A permit stored by notify_one while nobody waited makes this return at once. The
            // timeout re-checks now and then that the check itself still exists.
            let _ = tokio::time::timeout(Duration::from_secs(1), strong.wake.notified()).await;
            continue;
        }
        if let Some(last) = last_began {
            tokio::time::sleep_until(last + strong.spacing).await;
        }
        let began = Instant::now();
        last_began = Some(began);
        let batch: Vec<(CheckKey, watch::Sender<Option<Answered>>)> =
            strong.state.lock().expect("catalog lock").queued.drain().collect();
        let keys: Vec<&CheckKey> = batch.iter().map(|(key, _)| key).collect();
        let answers = query_batch(&strong.database, &keys, began + BATCH_DEADLINE).await;
        let answered_at = Instant::now();
        let mut state = strong.state.lock().expect("catalog lock");
        for ((key, publish), answer) in batch.into_iter().zip(answers) {
            let answered = match answer {
                Some(Resolved { cached, definition }) => {
                    // Known since the first answer that saw this very definition: a NOTIFY after
                    // that reaches a load that sees it.
                    let known_since = match state.known.get(&key) {
                        Some(previous)
                            if cached && previous.cached == Some(true) && previous.definition == definition =>
                        {
                            previous.known_since
                        }
                        _ => answered_at,
                    };
                    Answered { began, cached: Some(cached), definition, known_since }
                }
                None => Answered { began, cached: None, definition: None, known_since: answered_at },
            };
            if answered.cached.is_some() {
                remember(&mut state, key, answered.clone());
            }
            publish.send_replace(Some(answered));
        }
    }
}

/// Keeps `answered` as the newest answer for `key`, forgetting the oldest answers beyond
/// [`MAX_KEYS`] in O(1) each, whatever keys a flood brings.
fn remember(state: &mut State, key: CheckKey, answered: Answered) {
    let size = key_bytes(&key);
    if let Some(previous) = state.known.remove(&key) {
        state.known_bytes -= size;
        drop(previous);
    }
    while state.known.len() >= MAX_KEYS || state.known_bytes + size > MAX_KEY_BYTES {
        let Some((oldest, began)) = state.answered_order.pop_front() else { break };
        if state.known.get(&oldest).is_some_and(|current| current.began == began) {
            state.known.remove(&oldest);
            state.known_bytes -= key_bytes(&oldest);
        }
    }
    state.answered_order.push_back((key.clone(), answered.began));
    state.known.insert(key, answered);
    state.known_bytes += size;
    // Entries of answers replaced since: dropped once they outnumber the live ones.
    if state.answered_order.len() > 2 * MAX_KEYS {
        let known = &state.known;
        state.answered_order.retain(|(key, began)| known.get(key).is_some_and(|current| current.began == *began));
    }
}

/// The bytes of names a key holds (twice: the map's copy and the order's).
fn key_bytes((schema, object): &CheckKey) -> usize {
    let names: usize = match object {
        MissingObject::Column { table, column } => table.len() + column.len(),
        MissingObject::Table { schema, table } => schema.len() + table.len(),
        MissingObject::Function { schema, name, args, .. } => {
            schema.len() + name.len() + args.iter().map(|a| a.len() + 24).sum::<usize>()
        }
        MissingObject::Relationship { parent, child, hint } => {
            parent.len() + child.len() + hint.as_ref().map_or(0, String::len)
        }
        MissingObject::ColumnTypes { table, columns, cast_to, column, current } => {
            table.len()
                + columns.iter().map(|c| c.len() + 24).sum::<usize>()
                + cast_to.len()
                + column.as_ref().map_or(0, String::len)
                + current.as_ref().map_or(0, String::len)
        }
        MissingObject::Unknown => 0,
    };
    2 * (schema.len() + names + 128)
}

/// The size of what a [`CatalogCheck`] remembers.
#[derive(Clone, Copy, Debug)]
pub struct Remembered {
    pub answers: usize,
    pub answer_bytes: usize,
    pub marks: usize,
}

/// Answers remembered at most, and the bytes their keys may hold: see [`MAX_KEYS`], [`MAX_KEY_BYTES`].
pub const REMEMBERED_LIMITS: (usize, usize) = (MAX_KEYS, MAX_KEY_BYTES);

/// What the catalog said of one object: would PostgREST cache it, and which object it is.
#[derive(Clone)]
struct Resolved {
    cached: bool,
    definition: Option<Definition>,
}

/// One query per kind of object for every key of the batch, run together on the guard's
/// connection. Each answer is what the catalog resolved, or None when the database could not answer.
async fn query_batch(database: &Database, keys: &[&CheckKey], deadline: Instant) -> Vec<Option<Resolved>> {
    let mut tables = KindBatch::default();
    let mut columns = KindBatch::default();
    let mut functions = KindBatch::default();
    let mut relationships = KindBatch::default();
    let mut column_types = KindBatch::default();
    for (index, (schema, object)) in keys.iter().enumerate() {
        match object {
            MissingObject::Table { schema: named, table } => tables.push(index, [named.as_str(), table].map(Some)),
            MissingObject::Column { table, column } => columns.push(index, [schema.as_str(), table, column].map(Some)),
            MissingObject::Function { schema: named, name, args, call, single_argument_unnamed } => {
                let args = serde_json::to_string(args).expect("strings serialize");
                functions.push_owned(
                    index,
                    vec![
                        Some(named.clone()),
                        Some(name.clone()),
                        Some(args),
                        Some(call.as_str().to_string()),
                        Some(single_argument_unnamed.to_string()),
                    ],
                )
            }
            MissingObject::Relationship { parent, child, hint } => relationships
                .push_owned(index, vec![Some(schema.clone()), Some(parent.clone()), Some(child.clone()), hint.clone()]),
            MissingObject::ColumnTypes { table, columns, cast_to, column, current } => column_types.push_owned(
                index,
                vec![
                    Some(schema.clone()),
                    Some(table.clone()),
                    Some(serde_json::to_string(columns).expect("strings serialize")),
                    Some(cast_to.clone()),
                    column.clone(),
                    current.clone(),
                ],
            ),
            MissingObject::Unknown => {}
        }
    }
    let (tables, columns, functions, relationships, column_types) = tokio::join!(
        tables.run(database, &TABLES_SQL, deadline),
        columns.run(database, &COLUMNS_SQL, deadline),
        functions.run(database, FUNCTIONS_SQL, deadline),
        relationships.run(database, &RELATIONSHIPS_SQL, deadline),
        column_types.run(database, &COLUMN_TYPES_SQL, deadline),
    );
    let mut answers: Vec<Option<Resolved>> = vec![None; keys.len()];
    for kind in [tables, columns, functions, relationships, column_types] {
        for (index, answer) in kind {
            answers[index] = answer;
        }
    }
    answers
}

/// The keys of one kind in a batch: their indexes in the batch and one text array per parameter.
#[derive(Default)]
struct KindBatch {
    indexes: Vec<usize>,
    params: Vec<Vec<Option<String>>>,
}

impl KindBatch {
    fn push<const N: usize>(&mut self, index: usize, values: [Option<&str>; N]) {
        self.push_owned(index, values.iter().map(|v| v.map(str::to_string)).collect());
    }

    fn push_owned(&mut self, index: usize, values: Vec<Option<String>>) {
        if self.params.is_empty() {
            self.params = vec![Vec::new(); values.len()];
        }
        for (column, value) in self.params.iter_mut().zip(values) {
            column.push(value);
        }
        self.indexes.push(index);
    }

    /// Runs `sql` (parameters: one text array per value, rows: `idx` from 1, `cached`, `identity`,
    /// `fingerprint`) and pairs each answer with its batch index. A large batch (a flood of distinct
    /// keys) goes in chunks of [`CHUNK_KEYS`], one after another: each query stays short, so none
    /// outlasts the connection's operation timeout and costs the connection every heal needs.
    async fn run(self, database: &Database, sql: &str, deadline: Instant) -> Vec<(usize, Option<Resolved>)> {
        let mut answers: Vec<Option<Resolved>> = vec![None; self.indexes.len()];
        for start in (0..self.indexes.len()).step_by(CHUNK_KEYS) {
            let end = (start + CHUNK_KEYS).min(self.indexes.len());
            let chunk: Vec<Vec<Option<String>>> =
                self.params.iter().map(|column| column[start..end].to_vec()).collect();
            let params: Vec<(&(dyn tokio_postgres::types::ToSql + Sync), Type)> = chunk
                .iter()
                .map(|column| (column as &(dyn tokio_postgres::types::ToSql + Sync), Type::TEXT_ARRAY))
                .collect();
            let rows = match database.query(deadline, sql, &params).await {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::warn!(error = %e, "catalog check failed");
                    break;
                }
            };
            for row in rows {
                let (Ok(idx), Ok(cached), Ok(identity), Ok(fingerprint)) = (
                    row.try_get::<_, i64>("idx"),
                    row.try_get::<_, bool>("cached"),
                    row.try_get::<_, Option<String>>("identity"),
                    row.try_get::<_, Option<String>>("fingerprint"),
                ) else {
                    continue;
                };
                let definition = match (identity, fingerprint) {
                    (Some(identity), Some(fingerprint)) => {
                        Some(Definition { identity: identity.into(), fingerprint: fingerprint.into() })
                    }
                    _ => None,
                };
                if let Some(slot) = usize::try_from(idx - 1).ok().and_then(|i| answers.get_mut(start + i)) {
                    *slot = Some(Resolved { cached, definition });
                }
            }
        }
        self.indexes.into_iter().zip(answers).collect()
    }
}

/// Keys of one kind in one query at most.
const CHUNK_KEYS: usize = 500;
