//! Test bed shared by the integration tests, the examples and the benchmarks: a throwaway
//! PostgreSQL cluster, the PostgREST double, and small HTTP client helpers.

pub mod client;
pub mod double;
pub mod echo;
pub mod guard;
pub mod nginx;
pub mod pg;
pub mod pgbouncer;
pub mod pki;
#[macro_use]
pub mod postgrest;
pub mod relay;
pub mod replica;
pub mod stale_upstream;

use std::time::Duration;

use double::{DoubleOptions, PostgrestDouble};
use pg::TestCluster;
use postgrest::{Family, PostgrestOptions, RealPostgrest};

/// A cluster with `setup_sql` applied, and a double in front of it.
pub struct TestBed {
    pub pg: TestCluster,
    pub double: PostgrestDouble,
    pub http: client::HttpClient,
}

impl TestBed {
    pub async fn start(setup_sql: &str) -> TestBed {
        Self::start_with(setup_sql, |o| o).await
    }

    pub async fn start_with(setup_sql: &str, configure: impl FnOnce(DoubleOptions) -> DoubleOptions) -> TestBed {
        let _ = tracing_subscriber::fmt().with_test_writer().with_env_filter("info").try_init();
        let pg = TestCluster::start().await;
        if !setup_sql.is_empty() {
            pg.sql(setup_sql).await;
        }
        let double =
            PostgrestDouble::start(configure(DoubleOptions::new(pg.uri("postgres")))).await.expect("double starts");
        TestBed { pg, double, http: client::HttpClient::new() }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.double.url(), path)
    }

    /// Sends NOTIFY and waits until the double has finished a load that started after it.
    pub async fn notify_and_wait_reload(&self) {
        let before = self.double.successful_loads();
        self.pg.sql("NOTIFY pgrst, 'reload schema'").await;
        let reloaded =
            client::eventually(Duration::from_secs(10), || async { self.double.successful_loads() > before }).await;
        assert!(reloaded, "the double did not reload after NOTIFY");
    }
}

/// A cluster with PostgREST's roles and `setup_sql` applied, and a real PostgREST of `family` in
/// front of it.
pub struct RealBed {
    pub pg: TestCluster,
    pub postgrest: RealPostgrest,
    pub http: client::HttpClient,
}

impl RealBed {
    pub async fn start(family: Family, setup_sql: &str) -> RealBed {
        Self::start_with(family, setup_sql, |o| o).await
    }

    /// PostgREST's own reload, in ms: NOTIFY until its load counter has risen (12.2 and later).
    #[allow(dead_code, reason = "for the benchmark examples")]
    pub async fn reload_time_ms(&self) -> f64 {
        let before = self.postgrest.successful_loads().await.expect("this family has the load counter");
        let started = std::time::Instant::now();
        self.pg.sql("NOTIFY pgrst, 'reload schema'").await;
        loop {
            if self.postgrest.successful_loads().await.is_some_and(|now| now > before) {
                return started.elapsed().as_secs_f64() * 1000.0;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// A clock for the reloads that heals cause (12.2 and later): see [`ReloadClock`].
    #[allow(dead_code, reason = "for the benchmark examples")]
    pub async fn reload_clock(&self) -> ReloadClock {
        ReloadClock { notifies: self.notify_counter().await }
    }

    pub async fn start_with(
        family: Family,
        setup_sql: &str,
        configure: impl FnOnce(PostgrestOptions) -> PostgrestOptions,
    ) -> RealBed {
        let _ = tracing_subscriber::fmt().with_test_writer().with_env_filter("info").try_init();
        let pg = TestCluster::start().await;
        pg.sql(postgrest::ROLES_SQL).await;
        if !setup_sql.is_empty() {
            pg.sql(setup_sql).await;
        }
        let postgrest = RealPostgrest::start(family, configure(PostgrestOptions::new(&pg))).await;
        RealBed { pg, postgrest, http: client::HttpClient::new() }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.postgrest.url(), path)
    }

    /// A guard in front of this PostgREST, with its admin URL, NOTIFYing through `db_uri` (this
    /// cluster's, or a relay's in front of it); `extra` sets or overrides keys.
    pub async fn guard(&self, db_uri: &str, extra: &[(&str, &str)]) -> pgrst_guard::RunningGuard {
        let admin = self.postgrest.admin_url();
        let mut keys = vec![("PGRST_GUARD_UPSTREAM_ADMIN", admin.as_str())];
        keys.extend_from_slice(extra);
        guard::start_guard(&self.postgrest.url(), db_uri, &keys).await
    }

    /// Counts the reload NOTIFYs on PostgREST's channel from now on.
    pub async fn notify_counter(&self) -> guard::NotifyCounter {
        guard::NotifyCounter::listen(&self.pg.uri("postgres"), "pgrst").await
    }

    /// One number from the database, e.g. `SELECT count(*) FROM t`.
    pub async fn scalar(&self, sql: &str) -> i64 {
        self.pg.connect("postgres").await.query_one(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}")).get(0)
    }
}

/// Times the reload a piece of work causes, whoever sends its NOTIFY: from the moment the NOTIFY
/// reaches a listener of its own (PostgREST hears it at the same moment) to the rise of PostgREST's
/// load counter. Heal time minus this is what the heal adds to that very reload, with PostgREST's
/// spread of reload times taken out.
#[allow(dead_code, reason = "for the benchmark examples")]
pub struct ReloadClock {
    notifies: guard::NotifyCounter,
}

impl ReloadClock {
    /// Runs `work`; returns its output and, in ms, the reload it caused: from its first NOTIFY heard
    /// to the load counter's rise (polled every 2 ms).
    #[allow(dead_code, reason = "for the benchmark examples")]
    pub async fn time<F: std::future::Future>(&mut self, bed: &RealBed, work: F) -> (F::Output, f64) {
        let earlier = self.notifies.count();
        let baseline = bed.postgrest.successful_loads().await.expect("this family has the load counter");
        let rise = async {
            loop {
                if bed.postgrest.successful_loads().await.is_some_and(|now| now > baseline) {
                    return std::time::Instant::now();
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        };
        let (output, risen) = tokio::join!(work, tokio::time::timeout(Duration::from_secs(60), rise));
        let heard = self.notifies.heard_at(earlier).expect("the work's NOTIFY was heard");
        let risen = risen.expect("the reload finished within a minute");
        (output, risen.duration_since(heard).as_secs_f64() * 1000.0)
    }
}

/// Holds PostgREST's schema reload in the middle: its cache query opens every view (to ask whether it
/// is updatable), so an ACCESS EXCLUSIVE lock on one, held in an open transaction, makes a reload
/// wait for as long as the test wants — a real PostgREST mid-reload, serving from its old cache.
/// The view is [`RELOAD_BLOCKER_SQL`]'s.
pub struct ReloadBlocker {
    client: tokio_postgres::Client,
    watcher: tokio_postgres::Client,
}

/// The view a [`ReloadBlocker`] locks; part of a test's set-up.
pub const RELOAD_BLOCKER_SQL: &str = "CREATE VIEW reload_blocker AS SELECT 1 AS one;";

impl ReloadBlocker {
    pub async fn hold(pg: &pg::TestCluster) -> ReloadBlocker {
        let client = pg.connect("postgres").await;
        client.batch_execute("BEGIN; LOCK TABLE reload_blocker IN ACCESS EXCLUSIVE MODE;").await.expect("lock");
        ReloadBlocker { client, watcher: pg.connect("postgres").await }
    }

    /// Is a reload waiting on the lock now?
    pub async fn reload_waiting(&self) -> bool {
        let row = self
            .watcher
            .query_one("SELECT count(*) FROM pg_locks WHERE relation = 'reload_blocker'::regclass AND NOT granted", &[])
            .await
            .expect("pg_locks");
        row.get::<_, i64>(0) > 0
    }

    /// Lets the reload go on.
    pub async fn release(self) {
        self.client.batch_execute("COMMIT").await.expect("commit");
    }
}
