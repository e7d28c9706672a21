//! The write barrier: a write reaches PostgREST only when PostgREST's schema cache is shown to hold
//! the current definition of what the write takes from it.
//!
//! PostgREST casts a write's body to the column types it cached and copies cached defaults into its
//! SQL (`Prefer: missing=default`); a function call's arguments are cast the same way. After a
//! migration that changes a type or a default, a stale cache does not fail the write: it stores a
//! different value with 201 (`timestamp` → `timestamptz` drops the offset, `numeric(10,2)` →
//! `numeric(10,4)` rounds). No answer shows it, so the guard must stop such a write before it is
//! sent.
//!
//! ```text
//!  write ──► current definition of its target ──► same as the proved snapshot? ──► forward
//!             (a batched query that began           │ no (a type or default changed,
//!              after the write arrived)             │     or nothing is proved yet)
//!                                                   ▼
//!                                 proof: snapshot S, then two loads after it ──► forward
//!                                 (one task; every held write joins it)    │ deadline
//!                                                                          ▼
//!                                                             503 PGRSTG12, never a stale write
//! ```
//!
//! Why no stale write gets through:
//! - The current definition comes from a query that *began after the write arrived*, so it sees
//!   every migration committed before the write was sent.
//! - A proof takes a snapshot S of every definition in the exposed schemas, then reads each
//!   PostgREST instance's load counter (admin server, `pgrst_schema_cache_loads_total`), then
//!   NOTIFYs. PostgREST runs one load at a time; the second load counted after that baseline began
//!   after the first one ended, which was after the baseline was read, which was after S began: its
//!   cache holds S or newer. A second NOTIFY after the first rise makes that second load happen. (A
//!   counter that falls means PostgREST restarted after the baseline: its first load counts.)
//! - A write passes when its target's current definition equals S's for everything the stale cache
//!   could apply silently. Its target's definition in the cache is then S's or newer, and newer
//!   than S but equal to now is the same definition.
//! - What PostgREST had cached when the guard started, or after a NOTIFY someone else sent, is never
//!   assumed: only the guard's own proofs set S, and until the first one every write waits for it.
//!
//! What passes without a proof, because a stale cache can only fail it, never alter it (the heal
//! layer then reloads and replays): a target that is not in S (a new table or function: PGRST205,
//! PGRST202), new columns (PGRST204), a dropped column (42703), and type changes whose old type
//! either stores the same value or raises (a `varchar` widened, an integer widened, a string type
//! turned into any other, which PostgreSQL refuses at planning with 42804). A changed default
//! matters only to `Prefer: missing=default`.
//!
//! Without a load counter (no admin URL, as on Supabase's cloud; PostgREST before 12.2) the proof is
//! a marker view PostgREST must show in its cache ([`marker`]): created after S began, seen through
//! `OPTIONS`, which PostgREST answers from its cache alone. Where neither can be had (no CREATE on
//! the schema, no database), writes go on as before, counted `unverified`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_postgres::types::Type;

mod marker;

use http::HeaderMap;

use super::database::Database;
use super::load_counter::{LoadCounter, ProbeError};
use crate::config::UpstreamUrl;
use crate::metrics::Metrics;
use crate::schema_object::MAX_IDENTIFIER_BYTES;
use marker::{Marker, MarkerFailure, BORROWED};

/// The definitions of relations and functions (definitions.sql): its two statements, each for named
/// targets and for a whole snapshot.
struct DefinitionQueries {
    relations_named: String,
    relations_all: String,
    functions_named: String,
    functions_all: String,
}

static DEFINITIONS: std::sync::LazyLock<DefinitionQueries> = std::sync::LazyLock::new(|| {
    let statements: Vec<&str> = include_str!("definitions.sql").split("\n;\n").collect();
    let [relations, functions, relations_named] = statements[..] else {
        panic!("definitions.sql holds three statements");
    };
    DefinitionQueries {
        relations_named: relations_named.to_string(),
        relations_all: relations.replace("{names}", ""),
        functions_named: functions.replace("{names}", "AND p.proname = ANY ($2::text[])"),
        functions_all: functions.replace("{names}", ""),
    }
});

/// What a write depends on: the relation it writes, or the function it calls.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WriteTarget {
    pub schema: String,
    pub name: String,
    pub kind: TargetKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TargetKind {
    Relation,
    Function,
}

/// A definition as the catalog has it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Definition {
    /// Column name, nominal type with modifier, default expression ('' for none).
    Relation(Vec<(String, String, String)>),
    /// A hash of every overload.
    Function(String),
}

type Definitions = HashMap<(TargetKind, String, String), Definition>;

/// What the barrier decided for one write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Clearance {
    /// The cache is shown to hold what the write depends on.
    Current,
    /// It was not; a proof came within the deadline.
    Held,
    /// The guard cannot know (no load counters, no database): forwarded as it is.
    Unverified,
    /// No proof by the deadline: the write must not be sent.
    TimedOut,
}

impl Clearance {
    pub fn as_str(self) -> &'static str {
        match self {
            Clearance::Current => "current",
            Clearance::Held => "held",
            Clearance::Unverified => "unverified",
            Clearance::TimedOut => "timed_out",
        }
    }
}

/// The newest proof: S, and when its query began; and when a proof attempt last found that no
/// proof can be had (no load counter to read, no database to NOTIFY through).
#[derive(Clone, Default)]
struct Proof {
    snapshot: Option<Arc<Definitions>>,
    began: Option<Instant>,
    unprovable_at: Option<Instant>,
    /// When a proof attempt last failed, for whatever reason.
    failed_at: Option<Instant>,
}

/// Why a proof attempt ended without one.
enum ProofFailure {
    /// Nothing can prove a load now (PostgREST before 12.2 has no load counter, the admin server or
    /// the database cannot be reached): writes go on unverified, as without the admin URL.
    Unprovable,
    /// The loads did not come before the deadline: PostgREST is slow or stuck loading.
    Slow,
}

/// After a proof attempt found nothing can prove a load, writes go on unverified for this long
/// before another attempt.
const UNPROVABLE_PAUSE: Duration = Duration::from_secs(10);
/// While nothing is proved yet (the guard just started, or PostgREST never showed a load), a write
/// waits at most this for a proof before it goes on unverified: the cache is not *known* to be
/// stale, and PostgREST may not take NOTIFYs at all.
const UNKNOWN_WAIT: Duration = Duration::from_secs(3);

struct Batch {
    targets: HashSet<WriteTarget>,
    answer: watch::Sender<Option<Result<Arc<Definitions>, String>>>,
}

pub struct WriteBarrier {
    database: Arc<Database>,
    counters: Vec<LoadCounter>,
    /// The proof where no load counter can be read.
    marker: Marker,
    /// A waiting write's `apikey` and `Authorization`, lent to the marker's OPTIONS.
    credentials: Mutex<HeaderMap>,
    schemas: Vec<String>,
    poll: Duration,
    /// How long one proof may take.
    proof_deadline: Duration,
    /// How long a query of current definitions may take before the write goes on unverified.
    query_timeout: Duration,
    metrics: Arc<Metrics>,
    /// Targets waiting for the next query of current definitions.
    next: Mutex<Option<Batch>>,
    wake_batches: Notify,
    proof: watch::Sender<Proof>,
    /// The newest moment a waiting write needs a proof to begin after.
    proof_wanted: watch::Sender<Option<Instant>>,
    /// Writes waiting for a proof: a failed proof is tried again only while one waits.
    waiters: std::sync::atomic::AtomicUsize,
}

impl WriteBarrier {
    /// Starts the barrier's tasks (batched queries and proofs) on the current runtime, and its first
    /// proof at once.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        database: Arc<Database>,
        counters: Vec<LoadCounter>,
        upstream: UpstreamUrl,
        tls: rustls::ClientConfig,
        schemas: Vec<String>,
        poll: Duration,
        proof_deadline: Duration,
        query_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Arc<WriteBarrier> {
        let marker = Marker::new(upstream, tls, schemas[0].clone());
        let barrier = Arc::new(WriteBarrier {
            database,
            counters,
            marker,
            credentials: Mutex::new(HeaderMap::new()),
            schemas,
            poll,
            proof_deadline,
            query_timeout,
            metrics,
            next: Mutex::new(None),
            wake_batches: Notify::new(),
            proof: watch::channel(Proof::default()).0,
            proof_wanted: watch::channel(None).0,
            waiters: std::sync::atomic::AtomicUsize::new(0),
        });
        tokio::spawn(run_batches(Arc::downgrade(&barrier)));
        tokio::spawn(run_proofs(Arc::downgrade(&barrier)));
        barrier.proof_wanted.send_replace(Some(Instant::now()));
        barrier
    }

    /// Waits (until `deadline`) for the first proof; true once there is one.
    pub async fn first_proof(&self, deadline: Instant) -> bool {
        let mut proof = self.proof.subscribe();
        let settled = proof.wait_for(|p| p.snapshot.is_some() || p.unprovable_at.is_some());
        let _ = tokio::time::timeout_at(deadline, settled).await;
        self.proof.borrow().snapshot.is_some()
    }

    /// Decides whether `target` may be written now (`missing_default`: the write asks PostgREST to
    /// fill omitted columns with cached defaults), waiting for a proof until `deadline` if needed.
    /// `headers` are the write's own: its `apikey` and `Authorization` may be lent to a marker probe.
    pub async fn clear(
        &self,
        target: &WriteTarget,
        missing_default: bool,
        headers: &HeaderMap,
        deadline: Instant,
    ) -> Clearance {
        let clearance = self.decide(target, missing_default, headers, deadline).await;
        self.metrics.write_barrier(clearance.as_str());
        clearance
    }

    async fn decide(
        &self,
        target: &WriteTarget,
        missing_default: bool,
        headers: &HeaderMap,
        deadline: Instant,
    ) -> Clearance {
        // Without a database that takes a NOTIFY nothing can be known either way: PostgREST may
        // still work, so the write goes on, counted.
        if !self.database.is_connected()
            || self.proof.borrow().unprovable_at.is_some_and(|at| at.elapsed() < UNPROVABLE_PAUSE)
        {
            return Clearance::Unverified;
        }
        if target.name.len() > MAX_IDENTIFIER_BYTES || target.schema.len() > MAX_IDENTIFIER_BYTES {
            return Clearance::Current;
        }
        let asked = Instant::now();
        let current = match self.current(target, deadline.min(Instant::now() + self.query_timeout)).await {
            Ok(definitions) => definitions,
            Err(reason) => {
                tracing::warn!(%reason, "write barrier: the catalog could not be read; forwarding unverified");
                return Clearance::Unverified;
            }
        };
        let key = (target.kind, target.schema.clone(), target.name.clone());
        let now = current.get(&key);
        let proof = self.proof.borrow().clone();
        let known_stale = match (&proof.snapshot, now) {
            // Nothing proved yet: what PostgREST holds is unknown, not known to be stale.
            (None, _) => {
                if proof.failed_at.is_some_and(|at| at.elapsed() < UNPROVABLE_PAUSE) {
                    return Clearance::Unverified;
                }
                false
            }
            (Some(_), None) => return Clearance::Current,
            (Some(snapshot), Some(now)) => {
                if !snapshot.get(&key).is_some_and(|then| may_alter_silently(then, now, missing_default)) {
                    return Clearance::Current;
                }
                true
            }
        };
        let wait_until = if known_stale { deadline } else { deadline.min(Instant::now() + UNKNOWN_WAIT) };
        let held = Instant::now();
        {
            let mut credentials = self.credentials.lock().expect("barrier lock");
            credentials.clear();
            for name in BORROWED {
                if let Some(value) = headers.get(name) {
                    credentials.insert(name, value.clone());
                }
            }
        }
        self.proof_wanted.send_if_modified(|wanted| {
            if wanted.is_none_or(|at| at < asked) {
                *wanted = Some(asked);
                return true;
            }
            false
        });
        let mut proof = self.proof.subscribe();
        self.waiters.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let settled =
            proof.wait_for(|p| p.began.is_some_and(|at| at >= asked) || p.unprovable_at.is_some_and(|at| at >= asked));
        let outcome = tokio::time::timeout_at(wait_until, settled).await.ok().and_then(|r| r.ok()).map(|p| p.clone());
        self.waiters.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        self.metrics.observe_write_hold(held.elapsed());
        match outcome {
            Some(proof) if proof.began.is_some_and(|at| at >= asked) => Clearance::Held,
            Some(_) => Clearance::Unverified,
            // Known stale and no proof by the deadline: not sent. Unknown: sent, unverified.
            None if known_stale => Clearance::TimedOut,
            None => Clearance::Unverified,
        }
    }

    /// The current definitions of `target` (and of whatever else shares its batch), from a query
    /// that began after this call.
    async fn current(&self, target: &WriteTarget, deadline: Instant) -> Result<Arc<Definitions>, String> {
        let mut answer = {
            let mut next = self.next.lock().expect("barrier lock");
            let batch = next.get_or_insert_with(|| Batch { targets: HashSet::new(), answer: watch::channel(None).0 });
            batch.targets.insert(target.clone());
            batch.answer.subscribe()
        };
        self.wake_batches.notify_one();
        let answered = match tokio::time::timeout_at(deadline, answer.wait_for(Option::is_some)).await {
            Ok(Ok(answer)) => answer.clone().expect("waited for an answer"),
            Ok(Err(_)) => Err("the barrier stopped".to_string()),
            Err(_) => Err("no answer before the deadline".to_string()),
        };
        answered
    }

    /// Reads definitions: of `targets`, or of everything in the exposed schemas.
    async fn read(&self, targets: Option<&HashSet<WriteTarget>>, deadline: Instant) -> Result<Definitions, String> {
        let names = |kind: TargetKind| -> Vec<String> {
            targets
                .map(|targets| targets.iter().filter(|t| t.kind == kind).map(|t| t.name.clone()).collect())
                .unwrap_or_default()
        };
        let schemas: Vec<String> = match targets {
            Some(targets) => targets.iter().map(|t| t.schema.clone()).collect::<HashSet<_>>().into_iter().collect(),
            None => self.schemas.clone(),
        };
        let queries = &*DEFINITIONS;
        let mut definitions = Definitions::new();
        for (kind, named, all) in [
            (TargetKind::Relation, &queries.relations_named, &queries.relations_all),
            (TargetKind::Function, &queries.functions_named, &queries.functions_all),
        ] {
            let wanted = names(kind);
            let rows = match targets {
                // Only the kinds a batch names: a write to a table costs one query, not two.
                Some(_) if wanted.is_empty() => continue,
                Some(targets) if kind == TargetKind::Relation => {
                    let (schemas, names): (Vec<String>, Vec<String>) =
                        targets.iter().filter(|t| t.kind == kind).map(|t| (t.schema.clone(), t.name.clone())).unzip();
                    let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 2] =
                        [(&schemas, Type::TEXT_ARRAY), (&names, Type::TEXT_ARRAY)];
                    let rows = self.database.query(deadline, named, &params).await.map_err(|e| e.to_string())?;
                    for row in rows {
                        let (Ok(schema), Ok(name), Ok(column), Ok(nominal), Ok(default)) = (
                            row.try_get::<_, String>("schema"),
                            row.try_get::<_, String>("name"),
                            row.try_get::<_, String>("col"),
                            row.try_get::<_, String>("type"),
                            row.try_get::<_, String>("def"),
                        ) else {
                            continue;
                        };
                        let entry =
                            definitions.entry((kind, schema, name)).or_insert_with(|| Definition::Relation(Vec::new()));
                        if let Definition::Relation(columns) = entry {
                            columns.push((column, nominal, default));
                        }
                    }
                    continue;
                }
                Some(_) => {
                    let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 2] =
                        [(&schemas, Type::TEXT_ARRAY), (&wanted, Type::TEXT_ARRAY)];
                    self.database.query(deadline, named, &params).await
                }
                None => {
                    let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 1] =
                        [(&schemas, Type::TEXT_ARRAY)];
                    self.database.query(deadline, all, &params).await
                }
            }
            .map_err(|e| e.to_string())?;
            for row in rows {
                let (Ok(schema), Ok(name)) = (row.try_get::<_, String>("schema"), row.try_get::<_, String>("name"))
                else {
                    continue;
                };
                let definition = match kind {
                    TargetKind::Relation => {
                        let columns: Vec<String> = row.try_get("columns").unwrap_or_default();
                        let types: Vec<String> = row.try_get("types").unwrap_or_default();
                        let defaults: Vec<String> = row.try_get("defaults").unwrap_or_default();
                        Definition::Relation(
                            columns.into_iter().zip(types).zip(defaults).map(|((c, t), d)| (c, t, d)).collect(),
                        )
                    }
                    TargetKind::Function => {
                        let fingerprint: Option<String> = row.try_get("fingerprint").unwrap_or_default();
                        Definition::Function(fingerprint.unwrap_or_default())
                    }
                };
                definitions.insert((kind, schema, name), definition);
            }
        }
        Ok(definitions)
    }

    /// One proof: snapshot S, then two loads of every instance after it (load counters), or a
    /// marker created after S seen in PostgREST's cache.
    async fn prove(&self) -> Result<(), ProofFailure> {
        // Whether a load can be counted at all, before the snapshot's cost.
        let mut counted = !self.counters.is_empty();
        for counter in &self.counters {
            match counter.successful_loads().await {
                Ok(_) => {}
                // PostgREST before 12.2: no counter, the marker instead.
                Err(ProbeError::NoMetric) => counted = false,
                Err(e) => {
                    tracing::warn!(error = %e, "write barrier: a load counter could not be read; writes go on unverified");
                    return Err(ProofFailure::Unprovable);
                }
            }
        }
        let began = Instant::now();
        let deadline = began + self.proof_deadline;
        let snapshot = match self.read(None, deadline).await {
            Ok(snapshot) => snapshot,
            Err(reason) => {
                // The database's own log line says why; this one only what follows from it.
                tracing::debug!(%reason, "write barrier: the schema snapshot failed; writes go on unverified");
                return Err(ProofFailure::Unprovable);
            }
        };
        self.metrics.write_barrier_reload();
        if counted {
            self.prove_by_counters(deadline).await?;
        } else {
            let credentials = self.credentials.lock().expect("barrier lock").clone();
            match self.marker.prove(&self.database, &credentials, deadline).await {
                Ok(()) => {}
                Err(MarkerFailure::Unusable(reason)) => {
                    tracing::warn!(%reason, "write barrier: no proof without a load counter (the marker view); writes go on unverified");
                    return Err(ProofFailure::Unprovable);
                }
                Err(MarkerFailure::Slow) => return Err(ProofFailure::Slow),
            }
        }
        tracing::debug!(took_ms = began.elapsed().as_millis() as u64, "write barrier: schema proved");
        self.proof.send_modify(|proof| {
            proof.snapshot = Some(Arc::new(snapshot));
            proof.began = Some(began);
        });
        Ok(())
    }

    /// Two loads of every instance after a baseline read now (after the snapshot began).
    async fn prove_by_counters(&self, deadline: Instant) -> Result<(), ProofFailure> {
        let mut instances = Vec::new();
        for counter in &self.counters {
            match counter.successful_loads().await {
                Ok(count) => instances.push(Loads { baseline: count, restarted: false, count }),
                Err(e) => {
                    tracing::warn!(error = %e, "write barrier: a load counter could not be read; writes go on unverified");
                    return Err(ProofFailure::Unprovable);
                }
            }
        }
        if let Err(e) = self.database.notify_reload_for_proof(deadline).await {
            tracing::warn!(error = %e, "write barrier: the reload NOTIFY failed; writes go on unverified");
            return Err(ProofFailure::Unprovable);
        }
        let mut nudged = false;
        loop {
            tokio::time::sleep(self.poll).await;
            if Instant::now() >= deadline {
                tracing::warn!("write barrier: no two loads after the snapshot before the deadline");
                return Err(ProofFailure::Slow);
            }
            for (instance, counter) in instances.iter_mut().zip(&self.counters) {
                if let Ok(count) = counter.successful_loads().await {
                    instance.observe(count);
                }
            }
            if instances.iter().all(Loads::proved) {
                return Ok(());
            }
            // Idle, PostgREST loads once per NOTIFY: the second load needs a second NOTIFY.
            if !nudged && instances.iter().all(Loads::rose) {
                nudged = true;
                if let Err(e) = self.database.notify_reload_for_proof(deadline).await {
                    tracing::warn!(error = %e, "write barrier: the second reload NOTIFY failed; writes go on unverified");
                    return Err(ProofFailure::Unprovable);
                }
            }
        }
    }
}

/// One PostgREST instance's successful loads since a proof's baseline.
struct Loads {
    baseline: u64,
    restarted: bool,
    count: u64,
}

impl Loads {
    fn observe(&mut self, count: u64) {
        if count < self.count {
            // A restart after the baseline: every load of the new process began after it.
            self.restarted = true;
        }
        self.count = count;
    }

    fn rose(&self) -> bool {
        self.restarted || self.count > self.baseline
    }

    fn proved(&self) -> bool {
        if self.restarted {
            self.count >= 1
        } else {
            self.count >= self.baseline + 2
        }
    }
}

/// Could a cache holding `then` store a write differently than PostgreSQL would with `now`?
fn may_alter_silently(then: &Definition, now: &Definition, missing_default: bool) -> bool {
    match (then, now) {
        (Definition::Function(then), Definition::Function(now)) => then != now,
        (Definition::Relation(then), Definition::Relation(now)) => {
            then.iter().any(|(column, old_type, old_default)| {
                let Some((_, new_type, new_default)) = now.iter().find(|(name, ..)| name == column) else {
                    return false;
                };
                (old_type != new_type && !fails_or_keeps(old_type, new_type))
                    || (missing_default && old_default != new_default)
            })
        }
        _ => true,
    }
}

/// A body cast to `old` (the cached type) and assigned to a column of type `new`: either the value
/// is stored as PostgreSQL would store it, or the write fails (and is healed), never altered.
fn fails_or_keeps(old: &str, new: &str) -> bool {
    let base = |t: &str| t.split('(').next().unwrap_or(t).trim().to_string();
    let is_string = |t: &str| matches!(base(t).as_str(), "text" | "character varying" | "character" | "bpchar");
    let integer_rank = |t: &str| match base(t).as_str() {
        "smallint" => Some(1),
        "integer" => Some(2),
        "bigint" => Some(3),
        _ => None,
    };
    if is_string(old) && !is_string(new) {
        // No assignment cast from a string type: PostgreSQL refuses the statement (42804).
        return true;
    }
    if base(old) == "character varying" || base(old) == "text" {
        // A value too long for the old length raised; one that fit is the same string.
        return matches!(base(new).as_str(), "character varying" | "text");
    }
    match (integer_rank(old), integer_rank(new)) {
        (Some(old), Some(new)) => new >= old,
        (Some(_), None) => base(new) == "numeric",
        _ => false,
    }
}

/// The batch worker: one query of current definitions at a time, for every target queued before it
/// began.
async fn run_batches(barrier: std::sync::Weak<WriteBarrier>) {
    loop {
        let Some(strong) = barrier.upgrade() else { return };
        let batch = strong.next.lock().expect("barrier lock").take();
        let Some(batch) = batch else {
            let _ = tokio::time::timeout(Duration::from_secs(1), strong.wake_batches.notified()).await;
            continue;
        };
        strong.metrics.write_barrier_query();
        let answer = strong.read(Some(&batch.targets), Instant::now() + strong.proof_deadline).await.map(Arc::new);
        batch.answer.send_replace(Some(answer));
    }
}

/// The proof worker: a proof whenever a write waits for one that began after its moment.
async fn run_proofs(barrier: std::sync::Weak<WriteBarrier>) {
    let Some(strong) = barrier.upgrade() else { return };
    let mut wanted = strong.proof_wanted.subscribe();
    drop(strong);
    let mut failures = 0u32;
    loop {
        let Some(strong) = barrier.upgrade() else { return };
        let needed = *wanted.borrow_and_update();
        let newest = strong.proof.borrow().began;
        let due = match (needed, newest) {
            (Some(needed), Some(newest)) => needed > newest,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if !due {
            drop(strong);
            if wanted.changed().await.is_err() {
                return;
            }
            continue;
        }
        match strong.prove().await {
            Ok(()) => {
                failures = 0;
                continue;
            }
            Err(ProofFailure::Unprovable) => {
                // Every write waiting now learns it: none can be proved for a while.
                strong.proof.send_modify(|proof| {
                    proof.unprovable_at = Some(Instant::now());
                    proof.failed_at = Some(Instant::now());
                });
            }
            Err(ProofFailure::Slow) => strong.proof.send_modify(|proof| proof.failed_at = Some(Instant::now())),
        }
        // The proof failed (database, admin server): the writes waiting give up at their deadlines.
        // Try again after a growing pause, and only while a write still waits for it.
        failures += 1;
        tokio::time::sleep(Duration::from_millis(250u64 << failures.min(4))).await;
        if strong.waiters.load(std::sync::atomic::Ordering::Acquire) == 0 {
            strong.proof_wanted.send_replace(None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relation(columns: &[(&str, &str, &str)]) -> Definition {
        Definition::Relation(columns.iter().map(|(c, t, d)| (c.to_string(), t.to_string(), d.to_string())).collect())
    }

    #[test]
    fn silent_changes_hold_and_loud_ones_pass() {
        let was = |t: &str| relation(&[("id", "integer", ""), ("x", t, "'draft'::text")]);
        let silent = [
            ("timestamp without time zone", "timestamp with time zone"),
            ("date", "timestamp with time zone"),
            ("numeric(10,2)", "numeric(10,4)"),
            ("real", "double precision"),
            ("numeric", "integer"),
            ("uuid", "text"),
        ];
        for (old, new) in silent {
            assert!(may_alter_silently(&was(old), &was(new), false), "{old} -> {new}");
        }
        let loud = [
            ("character varying(8)", "character varying(64)"),
            ("character varying(8)", "text"),
            ("integer", "bigint"),
            ("integer", "numeric"),
            ("text", "jsonb"),
            ("smallint", "integer"),
        ];
        for (old, new) in loud {
            assert!(!may_alter_silently(&was(old), &was(new), false), "{old} -> {new}");
        }
        // New and dropped columns fail loudly (PGRST204, 42703).
        assert!(!may_alter_silently(&relation(&[("id", "integer", "")]), &was("text"), false));
        assert!(!may_alter_silently(&was("text"), &relation(&[("id", "integer", "")]), false));
        // A changed default matters only when PostgREST copies it.
        let open = relation(&[("id", "integer", ""), ("x", "text", "'open'::text")]);
        assert!(!may_alter_silently(&was("text"), &open, false));
        assert!(may_alter_silently(&was("text"), &open, true));
        assert!(may_alter_silently(&Definition::Function("a".into()), &Definition::Function("b".into()), false));
    }

    #[test]
    fn two_loads_after_the_baseline_or_one_after_a_restart() {
        let mut loads = Loads { baseline: 5, restarted: false, count: 5 };
        loads.observe(6);
        assert!(loads.rose() && !loads.proved());
        loads.observe(7);
        assert!(loads.proved());
        let mut restarted = Loads { baseline: 5, restarted: false, count: 5 };
        restarted.observe(0);
        assert!(!restarted.proved());
        restarted.observe(1);
        assert!(restarted.proved());
    }
}
