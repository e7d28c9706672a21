//! The catalog check: before a reload, ask the database whether the object a schema-cache error
//! names really exists. If it does, PostgREST's cache is stale; if it does not, the error is the
//! client's, and no reload could cure it. Identical checks share one query, and a key is queried at
//! most once per recheck interval, so a client repeating a bad request costs no reload and a
//! bounded number of queries; an answer never serves a request sent after its query began.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::notifier::Notifier;
use crate::heal::classify::MissingObject;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatalogAnswer {
    Exists,
    Missing,
    /// Missing, by a query another request started after this one's answer was requested.
    SharedMissing,
    /// The database could not be asked in time.
    Unknown,
}

impl CatalogAnswer {
    pub fn as_str(self) -> &'static str {
        match self {
            CatalogAnswer::Exists => "exists",
            CatalogAnswer::Missing => "missing",
            CatalogAnswer::SharedMissing => "shared_missing",
            CatalogAnswer::Unknown => "unknown",
        }
    }

    pub fn is_missing(self) -> bool {
        matches!(self, CatalogAnswer::Missing | CatalogAnswer::SharedMissing)
    }
}

type CheckKey = (String, MissingObject);

/// One catalog query for a key: when it began (no earlier than its snapshot) and, once known, its
/// answer.
#[derive(Clone)]
struct Check {
    begins: Instant,
    /// The answer and when the query returned it.
    answer: watch::Receiver<Option<(CatalogAnswer, Instant)>>,
}

/// What is known of one key: the last finished check and the one scheduled or running.
#[derive(Default)]
struct KeyChecks {
    /// When the last query began, its answer, and since when the object is known to exist (for
    /// an Exists answer) or when the query returned.
    finished: Option<(Instant, CatalogAnswer, Instant)>,
    /// When the first of the Exists answers since the last Missing returned.
    exists_since: Option<Instant>,
    next: Option<Check>,
}

/// Why a remembered answer can never outlive the DDL that ends it: an answer is handed only to
/// requests whose failed answer was requested *before* the query began, so its snapshot is newer
/// than the cache that failed them. A request sent after a migration committed therefore always gets
/// an answer that sees the migration. Floods of the same bad request share one query per key per
/// `recheck` interval, and all keys together at most [`MAX_QUERIES_PER_SECOND`].
pub struct CatalogCheck {
    database: Arc<Notifier>,
    recheck: Duration,
    keys: Mutex<HashMap<CheckKey, KeyChecks>>,
    /// When the next query of any key may begin.
    next_query_slot: Mutex<Instant>,
}

/// Keys remembered at most; the least recently checked are forgotten first.
const MAX_KEYS: usize = 10_000;
/// All catalog queries together, so that random names cannot monopolise the guard's connection.
pub const MAX_QUERIES_PER_SECOND: u32 = 200;

impl CatalogCheck {
    pub fn new(database: Arc<Notifier>, recheck: Duration) -> CatalogCheck {
        CatalogCheck {
            database,
            recheck,
            keys: Mutex::new(HashMap::new()),
            next_query_slot: Mutex::new(Instant::now()),
        }
    }

    /// Does `object` exist, by a catalog snapshot taken after `requested_at` (when the request
    /// whose answer named it was sent)? `schema` is the request's schema (Accept-/Content-Profile or
    /// the first exposed one), used where PostgREST's message does not qualify the name. Exposure
    /// needs no check of its own: PostgREST answers PGRST106 for an unexposed profile before any
    /// schema-cache error, so every schema an error names is exposed. Gives up
    /// with [`CatalogAnswer::Unknown`] at `deadline`. Also says when the query returned: by then
    /// whatever made the object exist had surely committed.
    pub async fn exists(
        &self,
        object: &MissingObject,
        schema: &str,
        requested_at: Instant,
        deadline: Instant,
    ) -> (CatalogAnswer, Instant) {
        if *object == MissingObject::Unknown {
            return (CatalogAnswer::Unknown, Instant::now());
        }
        let key = (schema.to_string(), object.clone());
        loop {
            let (check, runs_it) = {
                let mut keys = self.keys.lock().expect("catalog lock");
                let entry = keys.entry(key.clone()).or_default();
                if let Some((began, answer, answered)) = entry.finished {
                    if began >= requested_at {
                        return (shared(answer), answered);
                    }
                }
                match &entry.next {
                    Some(check) => (check.clone(), None),
                    None => {
                        let earliest = entry.finished.map_or(requested_at, |(began, ..)| began + self.recheck);
                        let begins = earliest.max(Instant::now()).max(requested_at);
                        let (publish, answer) = watch::channel(None);
                        let check = Check { begins, answer };
                        entry.next = Some(check.clone());
                        let evict = keys.len() > MAX_KEYS;
                        if evict {
                            evict_oldest(&mut keys);
                        }
                        (check, Some(publish))
                    }
                }
            };
            if let Some(publish) = runs_it {
                // Cancellation (the client left) must not leave the key with a check that never
                // ends: the guard clears it and wakes the joiners whatever happens.
                let clear = ClearOnDrop { checks: self, key: &key, publish };
                let answer = tokio::time::timeout_at(deadline, self.run(object, schema, check.begins, deadline))
                    .await
                    .unwrap_or(CatalogAnswer::Unknown);
                let answered = clear.finish(check.begins, answer, Instant::now());
                return (answer, answered);
            }
            if check.begins < requested_at {
                // That query's snapshot may predate the failed answer: wait it out, then schedule
                // (or join) the next one.
                let mut receiver = check.answer.clone();
                if tokio::time::timeout_at(deadline, receiver.wait_for(Option::is_some)).await.is_err() {
                    return (CatalogAnswer::Unknown, Instant::now());
                }
                continue;
            }
            let mut receiver = check.answer.clone();
            return match tokio::time::timeout_at(deadline, receiver.wait_for(Option::is_some)).await {
                Ok(Ok(answer)) => {
                    let (answer, answered) = answer.expect("waited for an answer");
                    (shared(answer), answered)
                }
                _ => (CatalogAnswer::Unknown, Instant::now()),
            };
        }
    }

    /// Waits for the key's slot and the global one, then queries.
    async fn run(&self, object: &MissingObject, schema: &str, begins: Instant, deadline: Instant) -> CatalogAnswer {
        let slot = {
            let mut next = self.next_query_slot.lock().expect("catalog lock");
            let slot = (*next).max(begins);
            *next = slot + Duration::from_secs(1) / MAX_QUERIES_PER_SECOND;
            slot
        };
        if slot > deadline {
            return CatalogAnswer::Unknown;
        }
        tokio::time::sleep_until(slot).await;
        self.query(object, schema, deadline).await
    }

    async fn query(&self, object: &MissingObject, schema: &str, deadline: Instant) -> CatalogAnswer {
        let answer = match object {
            MissingObject::Column { table, column } => {
                self.database
                    .query_bool_until(
                        deadline,
                        "SELECT EXISTS (SELECT 1 FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
                         JOIN pg_namespace n ON n.oid = c.relnamespace
                         WHERE n.nspname = $1 AND c.relname = $2 AND a.attname = $3 AND a.attnum > 0 AND NOT a.attisdropped)",
                        &[&schema, table, column],
                    )
                    .await
            }
            MissingObject::Table { schema: named, table } => {
                self.database
                    .query_bool_until(
                        deadline,
                        "SELECT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                         WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r','v','m','f','p'))",
                        &[named, table],
                    )
                    .await
            }
            MissingObject::Function { schema: named, name, args } => {
                // PostgREST's resolution: an overload whose named inputs cover the request's keys
                // and whose inputs without a default are all among them, or one taking a single
                // unnamed json/jsonb argument (the whole body).
                self.database
                    .query_bool_until(
                        deadline,
                        "WITH f AS (
                           SELECT p.pronargs, p.pronargdefaults, p.proargtypes,
                                  ARRAY(SELECT a.name FROM unnest(COALESCE(p.proargnames, '{}'::text[]),
                                                                  COALESCE(p.proargmodes::text[], array_fill('i'::text, ARRAY[p.pronargs::int])))
                                                           WITH ORDINALITY AS a(name, mode, ord)
                                        WHERE a.mode IN ('i', 'b', 'v') ORDER BY a.ord) AS inputs
                             FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                            WHERE n.nspname = $1 AND p.proname = $2)
                         SELECT EXISTS (SELECT 1 FROM f WHERE $3::text[] <@ f.inputs
                                          AND f.inputs[1:f.pronargs - f.pronargdefaults] <@ $3::text[])
                             OR EXISTS (SELECT 1 FROM f WHERE f.pronargs = 1 AND COALESCE(f.inputs[1], '') = ''
                                          AND f.proargtypes[0] IN ('json'::regtype, 'jsonb'::regtype))",
                        &[named, name, args],
                    )
                    .await
            }
            MissingObject::Relationship { parent, child, hint } => {
                // PostgREST's embed resolution (Plan.hs findRel): many-to-one where the child is the
                // referenced table or the key's own column, one-to-many, many-to-many through a
                // junction holding keys to both; a `!hint` must name the key, one of its columns
                // (single-column keys) or the junction. Views on either side are taken on trust:
                // PostgREST infers their relationships from view definitions.
                self.database
                    .query_bool_until(
                        deadline,
                        "WITH rel AS (SELECT c.oid, c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                                      WHERE n.nspname = $1),
                         fk AS (SELECT k.conname, k.conrelid, s.relname AS source, t.relname AS target,
                                       CASE WHEN cardinality(k.conkey) = 1 THEN (SELECT a.attname::text FROM pg_attribute a
                                            WHERE a.attrelid = k.conrelid AND a.attnum = k.conkey[1]) END AS col,
                                       CASE WHEN cardinality(k.confkey) = 1 THEN (SELECT a.attname::text FROM pg_attribute a
                                            WHERE a.attrelid = k.confrelid AND a.attnum = k.confkey[1]) END AS refcol
                                  FROM pg_constraint k JOIN rel s ON s.oid = k.conrelid JOIN rel t ON t.oid = k.confrelid
                                 WHERE k.contype = 'f' AND (s.relname IN ($2, $3) OR t.relname IN ($2, $3)))
                         SELECT EXISTS (SELECT 1 FROM fk WHERE source = $2 AND (target = $3 OR col = $3)
                                          AND ($4::text IS NULL OR conname = $4 OR col = $4 OR refcol = $4))
                             OR EXISTS (SELECT 1 FROM fk WHERE target = $2 AND source = $3
                                          AND ($4::text IS NULL OR conname = $4 OR col = $4 OR refcol = $4))
                             OR EXISTS (SELECT 1 FROM fk a JOIN fk b ON a.conrelid = b.conrelid AND a.conname <> b.conname
                                         WHERE a.target = $2 AND b.target = $3
                                           AND ($4::text IS NULL OR a.source = $4 OR a.conname = $4 OR b.conname = $4))
                             OR (EXISTS (SELECT 1 FROM rel WHERE relname = $2) AND EXISTS (SELECT 1 FROM rel WHERE relname = $3)
                                 AND EXISTS (SELECT 1 FROM rel WHERE relname IN ($2, $3) AND relkind IN ('v', 'm')))",
                        &[&schema, parent, child, hint],
                    )
                    .await
            }
            MissingObject::Unknown => return CatalogAnswer::Unknown,
        };
        match answer {
            Ok(true) => CatalogAnswer::Exists,
            Ok(false) => CatalogAnswer::Missing,
            Err(e) => {
                tracing::warn!(error = %e, "catalog check failed");
                CatalogAnswer::Unknown
            }
        }
    }
}

/// Joiners of a shared query learn that it was missing from someone else's query.
fn shared(answer: CatalogAnswer) -> CatalogAnswer {
    match answer {
        CatalogAnswer::Missing => CatalogAnswer::SharedMissing,
        other => other,
    }
}

fn evict_oldest(keys: &mut HashMap<CheckKey, KeyChecks>) {
    let oldest = keys
        .iter()
        .filter(|(_, checks)| checks.next.is_none())
        .min_by_key(|(_, checks)| checks.finished.map(|(began, ..)| began))
        .map(|(key, _)| key.clone());
    if let Some(key) = oldest {
        keys.remove(&key);
    }
}

/// Ends a key's scheduled check: records its answer (Unknown if the runner was dropped) and wakes
/// everyone waiting on it.
struct ClearOnDrop<'a> {
    checks: &'a CatalogCheck,
    key: &'a CheckKey,
    publish: watch::Sender<Option<(CatalogAnswer, Instant)>>,
}

impl ClearOnDrop<'_> {
    /// Returns since when the object is known to exist (Exists) or `answered` (otherwise): a
    /// NOTIFY sent after that reaches a load that sees the object.
    fn finish(self, began: Instant, answer: CatalogAnswer, answered: Instant) -> Instant {
        let mut known = answered;
        if let Some(entry) = self.checks.keys.lock().expect("catalog lock").get_mut(self.key) {
            match answer {
                CatalogAnswer::Exists => known = *entry.exists_since.get_or_insert(answered),
                CatalogAnswer::Missing => entry.exists_since = None,
                _ => {}
            }
            if answer != CatalogAnswer::Unknown {
                entry.finished = Some((began, answer, known));
            }
        }
        self.publish.send_replace(Some((answer, known)));
        known
    }
}

impl Drop for ClearOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(entry) = self.checks.keys.lock().expect("catalog lock").get_mut(self.key) {
            entry.next = None;
        }
        if self.publish.borrow().is_none() {
            self.publish.send_replace(Some((CatalogAnswer::Unknown, Instant::now())));
        }
    }
}
