//! `pgrst-guard sandbox`: a throwaway PostgreSQL, a real PostgREST and the guard in front, in one
//! command, until Ctrl-C. With `--show` it plays the story the guard exists for once: a migration
//! adds a column, PostgREST alone answers PGRST204, the guard heals the same insert. With
//! `--migrations DIR` it applies a developer's own `*.sql` files (a Supabase project's
//! `supabase/migrations` as they are written) and stays up as the local API they develop against;
//! with `--watch` it applies each new file as it appears, and the guard heals the running API across it.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::config::{Config, RawConfig};
use crate::RunningGuard;

/// What `pgrst-guard sandbox` was asked for.
#[derive(Debug, Clone, Default)]
pub struct SandboxOptions {
    pub listen: Option<SocketAddr>,
    pub postgrest_bin: Option<PathBuf>,
    pub migrations: Option<PathBuf>,
    /// Play the migration story once.
    pub show: bool,
    /// Stop after start-up (and the story), instead of waiting for Ctrl-C.
    pub once: bool,
    /// Apply new files of `migrations` as they appear.
    pub watch: bool,
}

/// What PostgREST and Supabase have before a project's first migration: PostgREST's roles
/// (`authenticator` switching to `anon`, `authenticated` or `service_role` per request), Supabase's
/// grants in `public`, and the `auth` schema's `uid()`, `role()`, `email()` and `jwt()` reading the
/// request's JWT claims as Supabase defines them, with a minimal `auth.users` for foreign keys.
const PLATFORM: &str = "
    CREATE ROLE anon NOLOGIN NOINHERIT;
    CREATE ROLE authenticated NOLOGIN NOINHERIT;
    CREATE ROLE service_role NOLOGIN NOINHERIT BYPASSRLS;
    CREATE ROLE authenticator LOGIN NOINHERIT;
    GRANT anon, authenticated, service_role TO authenticator;
    GRANT USAGE ON SCHEMA public TO anon, authenticated, service_role;
    ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON TABLES TO anon, authenticated, service_role;
    ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON SEQUENCES TO anon, authenticated, service_role;
    ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT EXECUTE ON FUNCTIONS TO anon, authenticated, service_role;
    CREATE EXTENSION IF NOT EXISTS pgcrypto;
    CREATE SCHEMA auth;
    GRANT USAGE ON SCHEMA auth TO anon, authenticated, service_role;
    CREATE TABLE auth.users (
      id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
      email text UNIQUE,
      raw_user_meta_data jsonb DEFAULT '{}'::jsonb,
      created_at timestamptz DEFAULT now()
    );
    CREATE FUNCTION auth.jwt() RETURNS jsonb LANGUAGE sql STABLE AS $$
      SELECT coalesce(nullif(current_setting('request.jwt.claim', true), ''),
                      nullif(current_setting('request.jwt.claims', true), ''))::jsonb $$;
    CREATE FUNCTION auth.uid() RETURNS uuid LANGUAGE sql STABLE AS $$
      SELECT coalesce(nullif(current_setting('request.jwt.claim.sub', true), ''),
                      (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub'))::uuid $$;
    CREATE FUNCTION auth.role() RETURNS text LANGUAGE sql STABLE AS $$
      SELECT coalesce(nullif(current_setting('request.jwt.claim.role', true), ''),
                      (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'role'))::text $$;
    CREATE FUNCTION auth.email() RETURNS text LANGUAGE sql STABLE AS $$
      SELECT coalesce(nullif(current_setting('request.jwt.claim.email', true), ''),
                      (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'email'))::text $$;
    GRANT EXECUTE ON FUNCTION auth.jwt(), auth.uid(), auth.role(), auth.email() TO anon, authenticated, service_role;
    GRANT SELECT ON auth.users TO service_role;";

/// The demo table of `--show` and of a sandbox without `--migrations`.
const DEMO_SCHEMA: &str =
    "CREATE TABLE chat_messages (id bigserial PRIMARY KEY, content text NOT NULL, created_at timestamptz DEFAULT now());";

/// The sandbox's JWT secret, as Supabase's local development stack has one: fixed, and known to be
/// a development secret.
const JWT_SECRET: &str = "pgrst-guard-sandbox-jwt-secret-not-for-production-use";

/// Runs the sandbox; returns the process exit code. Everything it made is removed on the way out.
pub async fn run(options: SandboxOptions) -> i32 {
    let started = Instant::now();
    let sandbox = match Sandbox::start(&options).await {
        Ok(sandbox) => sandbox,
        Err(problem) => {
            eprintln!("pgrst-guard sandbox: {problem}");
            return 2;
        }
    };
    println!("PostgreSQL  {}", sandbox.db_uri);
    println!("PostgREST   {}  (admin {})", sandbox.postgrest_url, sandbox.admin_url);
    println!("pgrst-guard {}  (send your requests here)", sandbox.guard.url());
    println!("jwt secret  {JWT_SECRET}");
    println!("anon key    {}", sandbox_key("anon"));
    println!("service key {}", sandbox_key("service_role"));
    println!("files       {}", sandbox.dir.0.display());
    println!("ready in {:.1} s", started.elapsed().as_secs_f64());
    let mut code = 0;
    if options.show {
        if let Err(problem) = sandbox.show().await {
            eprintln!("pgrst-guard sandbox: {problem}");
            code = 1;
        } else {
            println!("first healed request {:.1} s after the command", started.elapsed().as_secs_f64());
        }
    }
    if !options.once {
        println!("Ctrl-C stops everything and removes it.");
        match (&options.migrations, options.watch) {
            (Some(dir), true) => {
                println!("watching {} for new migrations", dir.display());
                tokio::select! {
                    _ = wait_for_signal() => {}
                    _ = sandbox.watch(dir) => {}
                }
            }
            _ => wait_for_signal().await,
        }
    }
    sandbox.stop().await;
    code
}

/// Fields drop in this order: the guard, PostgREST, PostgreSQL, then the directory.
struct Sandbox {
    guard: RunningGuard,
    postgrest: KillOnDrop,
    pg: PgServer,
    dir: SandboxDir,
    db_uri: String,
    postgrest_url: String,
    admin_url: String,
    /// The migration files applied so far, in order.
    applied: std::sync::Mutex<Vec<PathBuf>>,
}

impl Sandbox {
    async fn start(options: &SandboxOptions) -> Result<Sandbox, String> {
        let bindir = postgres_bindir()?;
        let postgrest_bin = postgrest_binary(options.postgrest_bin.as_deref())?;
        let dir = SandboxDir::create()?;
        let pg = tokio::task::spawn_blocking({
            let (dir, bindir) = (dir.0.clone(), bindir.clone());
            move || PgServer::start(&dir, &bindir)
        })
        .await
        .map_err(|e| e.to_string())??;
        let db_uri = format!("postgres://postgres@127.0.0.1:{}/postgres", pg.port);
        execute(&db_uri, PLATFORM).await?;
        let mut applied = Vec::new();
        match &options.migrations {
            None => execute(&db_uri, DEMO_SCHEMA).await?,
            Some(migrations) => {
                for file in migration_files(migrations)? {
                    apply_migration(&db_uri, &file).await?;
                    applied.push(file);
                }
            }
        }

        let (port, admin_port) = (free_port()?, free_port()?);
        let config = format!(
            "db-uri = \"postgresql://authenticator@127.0.0.1:{}/postgres\"\ndb-schemas = \"public\"\n\
             db-anon-role = \"anon\"\ndb-channel = \"pgrst\"\nserver-host = \"127.0.0.1\"\nserver-port = {port}\n\
             admin-server-port = {admin_port}\nlog-level = \"error\"\njwt-secret = \"{JWT_SECRET}\"\n",
            pg.port
        );
        let config_path = dir.0.join("postgrest.conf");
        std::fs::write(&config_path, config).map_err(|e| e.to_string())?;
        let log = std::fs::File::create(dir.0.join("postgrest.log")).map_err(|e| e.to_string())?;
        let postgrest = Command::new(&postgrest_bin)
            .arg(&config_path)
            .env("LANG", "C.UTF-8")
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", postgrest_bin.display()))?;
        let postgrest = KillOnDrop(postgrest);
        let (postgrest_url, admin_url) = (format!("http://127.0.0.1:{port}"), format!("http://127.0.0.1:{admin_port}"));
        if !wait_ready(&format!("{admin_url}/ready"), Duration::from_secs(30)).await {
            let log = std::fs::read_to_string(dir.0.join("postgrest.log")).unwrap_or_default();
            return Err(format!("PostgREST did not become ready in 30 s:\n{log}"));
        }

        let mut raw = RawConfig::new();
        let listen = options.listen.map_or_else(|| "127.0.0.1:8080".to_string(), |a| a.to_string());
        raw.insert("PGRST_GUARD_LISTEN".into(), listen);
        raw.insert("PGRST_GUARD_UPSTREAM".into(), postgrest_url.clone());
        raw.insert("PGRST_GUARD_UPSTREAM_ADMIN".into(), admin_url.clone());
        raw.insert("PGRST_GUARD_DB_URI".into(), db_uri.clone());
        let config = Config::from_raw(&raw).map_err(|e| e.to_string())?;
        let guard = RunningGuard::start(config).await.map_err(|e| format!("the guard cannot listen: {e}"))?;
        let connected = wait_until(Duration::from_secs(10), || guard.database.is_connected()).await;
        if !connected {
            return Err("the guard's database connection did not come up".to_string());
        }
        Ok(Sandbox {
            guard,
            postgrest,
            pg,
            dir,
            db_uri,
            postgrest_url,
            admin_url,
            applied: std::sync::Mutex::new(applied),
        })
    }

    /// Applies each new `*.sql` file of `dir` (named after the last one applied) as it appears,
    /// without a reload: the guard heals the running API across it.
    async fn watch(&self, dir: &Path) {
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let Ok(files) = migration_files(dir) else { continue };
            let last = self.applied.lock().expect("applied lock").last().cloned();
            for file in files.into_iter().filter(|f| last.as_ref().is_none_or(|last| f > last)) {
                // A file still being written is read again on the next turn.
                match apply_migration(&self.db_uri, &file).await {
                    Ok(()) => println!("applied {}", file.display()),
                    Err(problem) => eprintln!("pgrst-guard sandbox: {problem}"),
                }
                self.applied.lock().expect("applied lock").push(file);
            }
        }
    }

    /// The story: a migration adds a column; the same insert fails straight to PostgREST and is
    /// healed through the guard.
    async fn show(&self) -> Result<(), String> {
        let migration = "ALTER TABLE chat_messages ADD COLUMN artifact_ids text[] DEFAULT '{}'";
        execute(&self.db_uri, migration).await?;
        println!("\nmigration: {migration}");
        let body = r#"{"content":"hi","artifact_ids":["a1"]}"#;
        let direct = post(&format!("{}/chat_messages", self.postgrest_url), body).await?;
        println!("POST straight to PostgREST: {} {}", direct.0, direct.2);
        let healed = post(&format!("{}/chat_messages", self.guard.url()), body).await?;
        println!("POST through pgrst-guard:   {} X-Pgrst-Guard: {}", healed.0, healed.1.as_deref().unwrap_or("(none)"));
        if healed.0 != 201 || healed.1.as_deref() != Some("replayed") {
            return Err(format!("the guard did not heal the insert: {} {}", healed.0, healed.2));
        }
        Ok(())
    }

    async fn stop(self) {
        let Sandbox { guard, postgrest, pg, dir, .. } = self;
        guard.shutdown().await;
        drop(postgrest);
        let _ = tokio::task::spawn_blocking(move || {
            drop(pg);
            drop(dir);
        })
        .await;
    }
}

/// The sandbox's directory, removed with everything in it when dropped.
struct SandboxDir(PathBuf);

impl SandboxDir {
    fn create() -> Result<SandboxDir, String> {
        let dir = std::env::temp_dir().join(format!("pgrst-guard-sandbox-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        Ok(SandboxDir(dir))
    }
}

impl Drop for SandboxDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// PostgREST, killed when dropped.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A PostgreSQL cluster in the sandbox directory, run as `postgres` when we are root.
struct PgServer {
    data: PathBuf,
    bindir: PathBuf,
    port: u16,
    as_postgres: bool,
}

impl PgServer {
    fn start(dir: &Path, bindir: &Path) -> Result<PgServer, String> {
        let as_postgres = running_as_root();
        if as_postgres {
            run_checked(Command::new("chown").arg("postgres:postgres").arg(dir))?;
        }
        let server = PgServer { data: dir.join("data"), bindir: bindir.to_path_buf(), port: free_port()?, as_postgres };
        let data = server.data.to_string_lossy().into_owned();
        run_checked(
            &mut server.tool("initdb", &["-D", &data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"]),
        )?;
        let options = format!("-p {} -k {} -c listen_addresses=127.0.0.1", server.port, dir.display());
        let log = dir.join("postgresql.log").to_string_lossy().into_owned();
        run_checked(&mut server.tool("pg_ctl", &["-D", &data, "-l", &log, "-o", &options, "-w", "-t", "60", "start"]))?;
        Ok(server)
    }

    fn tool(&self, name: &str, args: &[&str]) -> Command {
        let program = self.bindir.join(name);
        let mut command = if self.as_postgres {
            let runuser =
                ["/usr/sbin/runuser", "/sbin/runuser"].into_iter().find(|p| Path::new(p).exists()).unwrap_or("runuser");
            let mut c = Command::new(runuser);
            c.arg("-u").arg("postgres").arg("--").arg(program);
            c
        } else {
            Command::new(program)
        };
        command.args(args).stdin(Stdio::null());
        command
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let data = self.data.to_string_lossy().into_owned();
        let _ = self.tool("pg_ctl", &["-D", &data, "-m", "fast", "-w", "stop"]).output();
    }
}

fn run_checked(command: &mut Command) -> Result<(), String> {
    let out = command.output().map_err(|e| format!("cannot run {command:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{command:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// PostgreSQL's server binaries, found as the tests find them.
fn postgres_bindir() -> Result<PathBuf, String> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("PG_BINDIR").map(PathBuf::from).into_iter().collect();
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        candidates.push(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    }
    if let Ok(versions) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut found: Vec<PathBuf> = versions.flatten().map(|v| v.path().join("bin")).collect();
        found.sort();
        candidates.extend(found.into_iter().rev());
    }
    candidates.into_iter().find(|dir| dir.join("initdb").exists() && dir.join("pg_ctl").exists()).ok_or_else(|| {
        "PostgreSQL's server binaries (initdb, pg_ctl) were not found: install them \
         (Debian/Ubuntu: `apt-get install postgresql-15`) or set PG_BINDIR"
            .to_string()
    })
}

/// `--postgrest-bin`, then `postgrest` on PATH, then the newest binary (or `.xz`) in the directory
/// `PGRST_GUARD_TEST_POSTGREST` names (default `../shared/postgrest`).
fn postgrest_binary(explicit: Option<&Path>) -> Result<PathBuf, String> {
    let missing = "PostgREST was not found: put `postgrest` on PATH (the Linux release from \
                   https://github.com/PostgREST/postgrest/releases; it needs libpq5 libgmp10 libffi8 zlib1g), \
                   or pass --postgrest-bin PATH, or set PGRST_GUARD_TEST_POSTGREST to a directory of postgrest binaries";
    if let Some(path) = explicit {
        return if path.is_file() {
            Ok(path.to_path_buf())
        } else {
            Err(format!("--postgrest-bin {}: no such file. {missing}", path.display()))
        };
    }
    if let Some(path) = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("postgrest"))
        .find(|candidate| candidate.is_file())
    {
        return Ok(path);
    }
    // As the tests look for them: the variable, else the test bed's `../shared/postgrest`.
    let dir = std::env::var_os("PGRST_GUARD_TEST_POSTGREST")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("../shared/postgrest"));
    let unpack_to = std::env::temp_dir().join("pgrst-guard-postgrest");
    newest_postgrest(&dir, None, &unpack_to).map(|(path, _)| path).map_err(|e| format!("{e}. {missing}"))
}

/// The newest `postgrest-<version>` binary (or its `.xz`) in `dir`, of major version `major` when
/// given; a compressed one is unpacked once into `unpack_to` (several processes may race: each
/// writes its own file and renames it). Returns the binary and its version. The test bed uses the
/// same lookup.
pub fn newest_postgrest(dir: &Path, major: Option<u32>, unpack_to: &Path) -> Result<(PathBuf, String), String> {
    let mut found: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let version =
                name.strip_prefix("postgrest-")?.split(['-', '_']).next()?.trim_end_matches(".xz").to_string();
            let key: Vec<u32> = version.split('.').map(|p| p.parse().unwrap_or(0)).collect();
            major.is_none_or(|major| key.first() == Some(&major)).then_some((key, entry.path()))
        })
        .collect();
    found.sort();
    let (key, path) = found.pop().ok_or_else(|| match major {
        Some(major) => format!("no PostgREST {major} binary in {}", dir.display()),
        None => format!("no PostgREST binary in {}", dir.display()),
    })?;
    let version = key.iter().map(u32::to_string).collect::<Vec<_>>().join(".");
    if path.extension().is_none_or(|e| e != "xz") {
        return Ok((path, version));
    }
    let target = unpack_to.join(format!("postgrest-{version}"));
    if !target.exists() {
        std::fs::create_dir_all(unpack_to).map_err(|e| format!("{}: {e}", unpack_to.display()))?;
        let partial = unpack_to.join(format!("postgrest-{version}.{}.partial", std::process::id()));
        let out = std::fs::File::create(&partial).map_err(|e| e.to_string())?;
        let status = Command::new("xz")
            .arg("-dc")
            .arg(&path)
            .stdout(out)
            .status()
            .map_err(|e| format!("cannot run xz to unpack {}: {e} (apt-get install xz-utils)", path.display()))?;
        if !status.success() {
            return Err(format!("xz -dc {} failed", path.display()));
        }
        run_checked(Command::new("chmod").arg("+x").arg(&partial))?;
        std::fs::rename(&partial, &target).map_err(|e| e.to_string())?;
    }
    Ok((target, version))
}

/// The `*.sql` files of `dir`, in name order.
fn migration_files(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("--migrations {}: {e}", dir.display()))?
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|e| e == "sql"))
        .collect();
    files.sort();
    Ok(files)
}

/// Applies one migration file in a transaction of its own; a failure names the file, PostgreSQL's
/// message and the line it points at.
async fn apply_migration(db_uri: &str, file: &Path) -> Result<(), String> {
    let sql = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let (client, connection) = tokio_postgres::connect(db_uri, tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("cannot connect to the sandbox database: {e}"))?;
    tokio::spawn(connection);
    client.batch_execute("BEGIN").await.map_err(|e| crate::reload::database::describe(&e))?;
    match client.batch_execute(&sql).await {
        Ok(()) => client.batch_execute("COMMIT").await.map_err(|e| crate::reload::database::describe(&e)),
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            let line = match e.as_db_error().and_then(|db| db.position()) {
                Some(tokio_postgres::error::ErrorPosition::Original(at)) => {
                    // PostgreSQL counts characters from 1.
                    let upto: String = sql.chars().take((*at as usize).saturating_sub(1)).collect();
                    format!(" at line {}", upto.matches('\n').count() + 1)
                }
                _ => String::new(),
            };
            Err(format!(
                "migration {} failed{line}: {}; nothing of it was applied",
                file.display(),
                crate::reload::database::describe(&e)
            ))
        }
    }
}

/// A key signed with the sandbox's secret, as Supabase's anon and service keys are: HS256, a role,
/// no expiry worth mentioning.
pub fn sandbox_key(role: &str) -> String {
    sign_hs256(JWT_SECRET, &serde_json::json!({"role": role, "iss": "pgrst-guard-sandbox", "exp": 4_102_444_800u64}))
}

/// An HS256 JWT of `claims` signed with `secret`.
pub fn sign_hs256(secret: &str, claims: &serde_json::Value) -> String {
    let header = base64url(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = base64url(claims.to_string().as_bytes());
    let signing_input = format!("{header}.{payload}");
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let signature = ring::hmac::sign(&key, signing_input.as_bytes());
    format!("{signing_input}.{}", base64url(signature.as_ref()))
}

/// Base64url without padding, as JWTs spell their parts.
pub fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len() * 4 / 3 + 4);
    for chunk in bytes.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

async fn execute(db_uri: &str, sql: &str) -> Result<(), String> {
    let (client, connection) = tokio_postgres::connect(db_uri, tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("cannot connect to the sandbox database: {e}"))?;
    tokio::spawn(connection);
    client.batch_execute(sql).await.map_err(|e| crate::reload::database::describe(&e))
}

/// POSTs JSON; returns the status, the `X-Pgrst-Guard` header and the body.
async fn post(url: &str, body: &'static str) -> Result<(u16, Option<String>, String), String> {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let request = Request::builder()
        .method(Method::POST)
        .uri(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .map_err(|e| e.to_string())?;
    let response = client.request(request).await.map_err(|e| format!("{url}: {e}"))?;
    let status = response.status().as_u16();
    let header = response.headers().get("x-pgrst-guard").and_then(|v| v.to_str().ok()).map(str::to_string);
    let body = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((status, header, String::from_utf8_lossy(&body).into_owned()))
}

async fn wait_ready(url: &str, timeout: Duration) -> bool {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let request = Request::get(url).body(Full::new(Bytes::new())).expect("valid request");
        if client.request(request).await.is_ok_and(|r| r.status().is_success()) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

async fn wait_until(timeout: Duration, check: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

async fn wait_for_signal() {
    let terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
    let interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt());
    if let (Ok(mut terminate), Ok(mut interrupt)) = (terminate, interrupt) {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
    }
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}
