//! The catalog check: before a reload, ask the database whether PostgREST *would cache* the object a
//! schema-cache error names after a reload. If it would, the cache is stale and a reload cures it; if
//! not — the object does not exist, or it is one PostgREST never caches (a trigger function, a
//! procedure, a partition, a junction it does not recognise) — the error is permanent and passes
//! through. One query per kind of object, each in its own `.sql` file beside the PostgREST source it
//! models.
//!
//! Whatever the model misses, the guard learns from the outcome: when a reload that began after the
//! catalog confirmed an object has completed and the same error comes back, the object's catalog
//! fingerprint (the rows that define it) is remembered, and no further reload is asked for it until
//! its definition changes. A migration that changes the object changes the fingerprint, so a request
//! sent after it heals as before.
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

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_postgres::types::Type;

use super::database::Database;
use crate::heal::classify::{CallShape, MissingObject};

/// PostgREST's cache of tables and views: `src/PostgREST/SchemaCache.hs` (`tablesSqlQuery`).
const TABLES_SQL: &str = include_str!("tables.sql");
/// PostgREST's cached columns of tables and views (`tablesSqlQuery`'s `columns`).
const COLUMNS_SQL: &str = include_str!("columns.sql");
/// PostgREST's cached functions (`funcsSqlQuery`) and how a call resolves (`Plan.hs` `findProc`).
const FUNCTIONS_SQL: &str = include_str!("functions.sql");
/// PostgREST's relationships (`allM2OandO2ORels`, `addM2MRels`, views, computed relationships) and
/// how an embed resolves (`Plan.hs` `findRel`).
const RELATIONSHIPS_SQL: &str = include_str!("relationships.sql");
/// The column types PostgREST casts a write's body to (`colNominalType`, `fromJsonBodyF`).
const COLUMN_TYPES_SQL: &str = include_str!("column_types.sql");

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
    /// The catalog rows that define the object, for [`CatalogCheck::reload_did_not_cure`].
    pub fingerprint: Option<Arc<str>>,
}

type CheckKey = (String, MissingObject);

/// One finished query's word on one object.
#[derive(Clone, Debug)]
struct Answered {
    /// When the batch's query began: it serves requests sent before.
    began: Instant,
    /// None: the query failed.
    cached: Option<bool>,
    fingerprint: Arc<str>,
    known_since: Instant,
}

#[derive(Default)]
struct State {
    /// The newest answer per object, bounded by [`MAX_KEYS`].
    known: HashMap<CheckKey, Answered>,
    /// Objects waiting for the next batch, each with the channel its answer goes out on.
    queued: HashMap<CheckKey, watch::Sender<Option<Answered>>>,
    /// Objects a completed reload did not cure, with the fingerprint they had then.
    marks: HashMap<CheckKey, (Arc<str>, Mark)>,
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

/// Objects remembered at most (answers, and uncured fingerprints); the oldest are forgotten first.
const MAX_KEYS: usize = 10_000;
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
        let unknown =
            || CatalogReply { answer: CatalogAnswer::Unknown, known_since: Instant::now(), fingerprint: None };
        if *object == MissingObject::Unknown {
            return unknown();
        }
        let key = (schema.to_string(), object.clone());
        let (mut receiver, first) = {
            let mut state = self.shared.state.lock().expect("catalog lock");
            if let Some(known) = state.known.get(&key).filter(|known| known.began >= requested_at) {
                let known = known.clone();
                return reply(&state, &key, &known, false);
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
                reply(&state, &key, &answered, first)
            }
            None => unknown(),
        }
    }

    /// A reload that began after the catalog confirmed `object` (as `fingerprint`) has finished
    /// everywhere, and a replay after it still met the same error: no reload is asked for it again
    /// until its definition changes.
    pub fn doubt(&self, object: &MissingObject, schema: &str, fingerprint: Arc<str>) {
        self.mark(object, schema, fingerprint, Mark::Doubted);
    }

    /// A heal that waited out a reload which surely saw `object` gave up on the same error: until
    /// its definition changes, its error passes through at once.
    pub fn reload_did_not_cure(&self, object: &MissingObject, schema: &str, fingerprint: Arc<str>) {
        tracing::warn!(object = ?object, schema, "a reload that saw the object did not cure its error; no more reloads for it until its definition changes");
        self.mark(object, schema, fingerprint, Mark::Uncurable);
    }

    /// A replay for `object` succeeded: whatever was doubted of it is forgotten.
    pub fn cured(&self, object: &MissingObject, schema: &str) {
        let mut state = self.shared.state.lock().expect("catalog lock");
        if !state.marks.is_empty() {
            state.marks.remove(&(schema.to_string(), object.clone()));
        }
    }

    /// Is `object`, in the definition `fingerprint`, doubted or uncurable?
    pub fn marked(&self, object: &MissingObject, schema: &str, fingerprint: &Arc<str>) -> bool {
        let state = self.shared.state.lock().expect("catalog lock");
        state.marks.get(&(schema.to_string(), object.clone())).is_some_and(|(marked, _)| marked == fingerprint)
    }

    fn mark(&self, object: &MissingObject, schema: &str, fingerprint: Arc<str>, mark: Mark) {
        let mut state = self.shared.state.lock().expect("catalog lock");
        let key = (schema.to_string(), object.clone());
        if state.marks.len() >= MAX_KEYS && !state.marks.contains_key(&key) {
            let forget = state.marks.keys().next().cloned();
            if let Some(forget) = forget {
                state.marks.remove(&forget);
            }
        }
        let mark = match state.marks.get(&key) {
            // Uncurable stays so until the definition changes.
            Some((same, Mark::Uncurable)) if *same == fingerprint => Mark::Uncurable,
            _ => mark,
        };
        state.marks.insert(key, (fingerprint, mark));
    }
}

/// The reply for `key` from `answered`: the first asker of a batch gets the query's own word,
/// joiners a shared one, and an object a reload did not cure in the same definition is uncurable.
fn reply(state: &State, key: &CheckKey, answered: &Answered, first: bool) -> CatalogReply {
    let mark = state.marks.get(key).filter(|(marked, _)| *marked == answered.fingerprint).map(|(_, mark)| *mark);
    let answer = match (answered.cached, mark) {
        (None, _) => CatalogAnswer::Unknown,
        (Some(true), Some(Mark::Uncurable)) => CatalogAnswer::Uncurable,
        (Some(true), Some(Mark::Doubted)) => CatalogAnswer::Doubted,
        (Some(true), None) => CatalogAnswer::Exists,
        (Some(false), _) if first => CatalogAnswer::Missing,
        (Some(false), _) => CatalogAnswer::SharedMissing,
    };
    let fingerprint =
        matches!(answer, CatalogAnswer::Exists | CatalogAnswer::Doubted).then(|| answered.fingerprint.clone());
    CatalogReply { answer, known_since: answered.known_since, fingerprint }
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
                Some((cached, fingerprint)) => {
                    let fingerprint: Arc<str> = fingerprint.into();
                    // Known since the first answer that saw this very definition: a NOTIFY after
                    // that reaches a load that sees it.
                    let known_since = match state.known.get(&key) {
                        Some(previous)
                            if cached && previous.cached == Some(true) && previous.fingerprint == fingerprint =>
                        {
                            previous.known_since
                        }
                        _ => answered_at,
                    };
                    Answered { began, cached: Some(cached), fingerprint, known_since }
                }
                None => Answered { began, cached: None, fingerprint: "".into(), known_since: answered_at },
            };
            if answered.cached.is_some() {
                if state.known.len() >= MAX_KEYS && !state.known.contains_key(&key) {
                    forget_oldest(&mut state.known);
                }
                state.known.insert(key, answered.clone());
            }
            publish.send_replace(Some(answered));
        }
    }
}

fn forget_oldest(known: &mut HashMap<CheckKey, Answered>) {
    let oldest = known.iter().min_by_key(|(_, answered)| answered.began).map(|(key, _)| key.clone());
    if let Some(oldest) = oldest {
        known.remove(&oldest);
    }
}

/// One query per kind of object for every key of the batch, run together on the guard's
/// connection. Each answer is (would PostgREST cache it, its fingerprint), or None when the
/// database could not answer.
async fn query_batch(database: &Database, keys: &[&CheckKey], deadline: Instant) -> Vec<Option<(bool, String)>> {
    let mut tables = KindBatch::default();
    let mut columns = KindBatch::default();
    let mut functions = KindBatch::default();
    let mut relationships = KindBatch::default();
    let mut column_types = KindBatch::default();
    for (index, (schema, object)) in keys.iter().enumerate() {
        match object {
            MissingObject::Table { schema: named, table } => tables.push(index, [named.as_str(), table].map(Some)),
            MissingObject::Column { table, column } => columns.push(index, [schema.as_str(), table, column].map(Some)),
            MissingObject::Function { schema: named, name, args, call } => {
                let args = serde_json::to_string(args).expect("strings serialize");
                functions.push_owned(
                    index,
                    vec![Some(named.clone()), Some(name.clone()), Some(args), Some(call.as_str().to_string())],
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
        tables.run(database, TABLES_SQL, deadline),
        columns.run(database, COLUMNS_SQL, deadline),
        functions.run(database, FUNCTIONS_SQL, deadline),
        relationships.run(database, RELATIONSHIPS_SQL, deadline),
        column_types.run(database, COLUMN_TYPES_SQL, deadline),
    );
    let mut answers = vec![None; keys.len()];
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

    /// Runs `sql` (parameters: one text array per value, rows: `idx` from 1, `cached`,
    /// `fingerprint`) and pairs each answer with its batch index.
    async fn run(self, database: &Database, sql: &str, deadline: Instant) -> Vec<(usize, Option<(bool, String)>)> {
        if self.indexes.is_empty() {
            return Vec::new();
        }
        let params: Vec<(&(dyn tokio_postgres::types::ToSql + Sync), Type)> = self
            .params
            .iter()
            .map(|column| (column as &(dyn tokio_postgres::types::ToSql + Sync), Type::TEXT_ARRAY))
            .collect();
        let mut answers: Vec<Option<(bool, String)>> = vec![None; self.indexes.len()];
        match database.query(deadline, sql, &params).await {
            Ok(rows) => {
                for row in rows {
                    let (Ok(idx), Ok(cached), Ok(fingerprint)) = (
                        row.try_get::<_, i64>("idx"),
                        row.try_get::<_, bool>("cached"),
                        row.try_get::<_, Option<String>>("fingerprint"),
                    ) else {
                        continue;
                    };
                    if let Some(slot) = usize::try_from(idx - 1).ok().and_then(|i| answers.get_mut(i)) {
                        *slot = Some((cached, fingerprint.unwrap_or_default()));
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "catalog check failed"),
        }
        self.indexes.into_iter().zip(answers).collect()
    }
}

impl CallShape {
    /// How the SQL names it.
    fn as_str(self) -> &'static str {
        match self {
            CallShape::Get => "get",
            CallShape::Json => "json",
            CallShape::Text => "text",
            CallShape::Xml => "xml",
            CallShape::Bytea => "bytea",
        }
    }
}
