//! A real PostgREST for one test, from the binaries named by `PGRST_GUARD_TEST_POSTGREST` (a
//! directory of `postgrest-<version>` binaries or their `.xz` files; default `../shared/postgrest`
//! next to the project). It writes its own config (free ports, the usual roles), waits until the
//! schema cache is loaded, and can be stopped and restarted on the same ports.
//!
//! Tests that depend on PostgREST's behaviour run once per [`Family`]: see [`family_matrix!`].

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use super::client::{eventually, HttpClient};
use super::pg::{free_port, TestCluster};

/// The families the guard supports: the last release of each is what the matrix runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Family {
    V11,
    V12,
    V13,
    V14,
    V16,
}

impl Family {
    fn major(self) -> u32 {
        match self {
            Family::V11 => 11,
            Family::V12 => 12,
            Family::V13 => 13,
            Family::V14 => 14,
            Family::V16 => 16,
        }
    }

    /// `Proxy-Status: PostgREST; error=...` on errors and PGRST205 for unknown tables (v13+).
    pub fn has_proxy_status(self) -> bool {
        self >= Family::V13
    }

    /// `pgrst_schema_cache_loads_total` on the admin server (v12.2+).
    pub fn has_load_metrics(self) -> bool {
        self >= Family::V12
    }
}

/// SQL that makes the roles PostgREST and Supabase use: `authenticator` logs in and switches to
/// `anon` (or `authenticated` with a JWT) per request. Tables, sequences and functions that
/// `postgres` creates later in `public` are granted to both by default privileges.
pub const ROLES_SQL: &str = "
    CREATE ROLE anon NOLOGIN;
    CREATE ROLE authenticated NOLOGIN;
    CREATE ROLE authenticator LOGIN NOINHERIT;
    GRANT anon, authenticated TO authenticator;
    GRANT USAGE ON SCHEMA public TO anon, authenticated;
    ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON TABLES TO anon, authenticated;
    ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON SEQUENCES TO anon, authenticated;
    ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT EXECUTE ON FUNCTIONS TO anon, authenticated;
";

/// How a test wants its PostgREST.
#[derive(Clone, Debug)]
pub struct PostgrestOptions {
    pub db_uri: String,
    pub schemas: String,
    pub channel: String,
    /// False makes PostgREST deaf to NOTIFY: the way to hold a stale cache on purpose.
    pub channel_enabled: bool,
    pub jwt_secret: Option<String>,
    pub pool_size: u32,
    /// `info` writes one access-log line per request (see [`RealPostgrest::access_log_lines`]).
    pub log_level: &'static str,
    /// More configuration, as `PGRST_*` environment variables (values a config file cannot quote,
    /// such as a JWKS).
    pub env: Vec<(String, String)>,
    /// Listen on this port with `server-reuseport` (v16): several processes share it, as in a
    /// hand-over from an old process to a new one.
    pub shared_port: Option<u16>,
}

impl PostgrestOptions {
    /// PostgREST logging in as `authenticator` to the `postgres` database of `pg`.
    pub fn new(pg: &TestCluster) -> PostgrestOptions {
        PostgrestOptions {
            db_uri: format!("postgresql://authenticator@127.0.0.1:{}/postgres", pg.port()),
            schemas: "public".to_string(),
            channel: "pgrst".to_string(),
            channel_enabled: true,
            jwt_secret: None,
            pool_size: 10,
            log_level: "error",
            env: Vec::new(),
            shared_port: None,
        }
    }

    pub fn deaf(mut self) -> Self {
        self.channel_enabled = false;
        self
    }
}

pub struct RealPostgrest {
    pub version: String,
    binary: PathBuf,
    dir: PathBuf,
    env: Vec<(String, String)>,
    port: u16,
    admin_port: u16,
    child: Mutex<Option<Child>>,
    http: HttpClient,
}

impl RealPostgrest {
    /// Starts `family`'s binary with `options` and waits until its schema cache is loaded.
    pub async fn start(family: Family, options: PostgrestOptions) -> RealPostgrest {
        let (binary, version) = binary_for(family);
        let dir = std::env::temp_dir().join(format!("pgrst-guard-postgrest-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).expect("create PostgREST dir");
        let (port, admin_port) = (options.shared_port.unwrap_or_else(free_port), free_port());
        let mut config = format!(
            "db-uri = \"{}\"\ndb-schemas = \"{}\"\ndb-anon-role = \"anon\"\ndb-channel = \"{}\"\n\
             db-channel-enabled = {}\ndb-pool = {}\nserver-host = \"127.0.0.1\"\nserver-port = {port}\n\
             admin-server-port = {admin_port}\nlog-level = \"{}\"\n",
            options.db_uri,
            options.schemas,
            options.channel,
            options.channel_enabled,
            options.pool_size,
            options.log_level
        );
        if family >= Family::V13 {
            config.push_str("admin-server-host = \"127.0.0.1\"\n");
        }
        if options.shared_port.is_some() {
            config.push_str("server-reuseport = true\n");
        }
        if let Some(secret) = &options.jwt_secret {
            config.push_str(&format!("jwt-secret = \"{secret}\"\n"));
        }
        std::fs::write(dir.join("postgrest.conf"), config).expect("write PostgREST config");
        let server = RealPostgrest {
            version,
            binary,
            dir,
            env: options.env.clone(),
            port,
            admin_port,
            child: Mutex::new(None),
            http: HttpClient::new(),
        };
        server.launch().await;
        server
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The admin server (every family has one; v11 has no /metrics there).
    pub fn admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin_port)
    }

    /// Kills the process (SIGKILL) and waits for it to be gone.
    pub async fn stop(&self) {
        let child = self.child.lock().unwrap().take();
        if let Some(mut child) = child {
            let _ = child.kill();
            let _ = tokio::task::spawn_blocking(move || child.wait()).await;
        }
    }

    /// Stops and starts again on the same ports, with a fresh schema cache.
    pub async fn restart(&self) {
        self.stop().await;
        self.launch().await;
    }

    /// Starts the process without waiting for anything.
    pub fn spawn(&self) {
        let log = std::fs::File::create(self.dir.join("postgrest.log")).expect("PostgREST log file");
        let child = Command::new(&self.binary)
            .arg(self.dir.join("postgrest.conf"))
            .env("LANG", "C.UTF-8")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.binary.display()));
        *self.child.lock().unwrap() = Some(child);
    }

    async fn launch(&self) {
        self.spawn();
        let ready = self.wait_ready(Duration::from_secs(30)).await;
        assert!(ready, "PostgREST {} did not load its schema cache in 30 s:\n{}", self.version, self.log());
    }

    /// Waits until the admin `/ready` answers 200 (the cache is loaded and the pool is up).
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let ready = format!("{}/ready", self.admin_url());
        eventually(timeout, || async {
            matches!(self.http.try_send(http::Method::GET, &ready, &[], bytes::Bytes::new()).await,
                Ok(r) if r.status == http::StatusCode::OK)
        })
        .await
    }

    /// `pgrst_schema_cache_loads_total{status="SUCCESS"}`, on families that have it.
    pub async fn successful_loads(&self) -> Option<u64> {
        let r = self
            .http
            .try_send(http::Method::GET, &format!("{}/metrics", self.admin_url()), &[], bytes::Bytes::new())
            .await
            .ok()?;
        pgrst_guard::reload::load_counter::parse_success_count(&r.text())
    }

    /// Sends NOTIFY through `pg` and waits until a load that started after it has finished (by the
    /// load counter where there is one; else until `probe` answers as a fresh cache would).
    pub async fn reload_and_wait(&self, pg: &TestCluster) {
        let before = self.successful_loads().await;
        pg.sql("NOTIFY pgrst, 'reload schema'").await;
        match before {
            Some(before) => {
                let done = eventually(Duration::from_secs(10), || async {
                    self.successful_loads().await.is_some_and(|now| now > before)
                })
                .await;
                assert!(done, "PostgREST {} did not reload", self.version);
                // PostgREST's debounce may owe one more load; let it finish too.
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            None => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }

    /// Requests PostgREST itself logged (with `log_level: "info"`) whose request line starts with
    /// `request`, e.g. `POST /chat_messages`.
    pub fn access_log_lines(&self, request: &str) -> usize {
        self.log().lines().filter(|line| line.contains(&format!("\"{request}"))).count()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("postgrest.log")).unwrap_or_default()
    }
}

impl Drop for RealPostgrest {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Where the binaries are: `PGRST_GUARD_TEST_POSTGREST`, else `../shared/postgrest`.
pub fn binaries_dir() -> PathBuf {
    match std::env::var_os("PGRST_GUARD_TEST_POSTGREST") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/postgrest"),
    }
}

/// The binary of `family` (newest version found), decompressed once into the target directory.
fn binary_for(family: Family) -> (PathBuf, String) {
    let dir = binaries_dir();
    let unpack_to = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/postgrest");
    pgrst_guard::sandbox::newest_postgrest(&dir, Some(family.major()), &unpack_to).unwrap_or_else(|e| {
        panic!(
            "{e}: set PGRST_GUARD_TEST_POSTGREST to a directory holding postgrest-<version> binaries \
             (or their .xz files); see README, 'Tests against the real PostgREST'"
        )
    })
}

/// Runs a test body once per PostgREST family, as one test per family:
/// `family_matrix!(name, |family| async move { ... });` makes `name::v11` ... `name::v16`.
macro_rules! family_matrix {
    ($name:ident, $body:expr) => {
        mod $name {
            use super::*;
            #[tokio::test]
            async fn v11() {
                ($body)($crate::support::postgrest::Family::V11).await
            }
            #[tokio::test]
            async fn v12() {
                ($body)($crate::support::postgrest::Family::V12).await
            }
            #[tokio::test]
            async fn v13() {
                ($body)($crate::support::postgrest::Family::V13).await
            }
            #[tokio::test]
            async fn v14() {
                ($body)($crate::support::postgrest::Family::V14).await
            }
            #[tokio::test]
            async fn v16() {
                ($body)($crate::support::postgrest::Family::V16).await
            }
        }
    };
}
