//! `pgrst-guard sandbox`: a throwaway PostgreSQL, a real PostgREST and the guard in front, in one
//! command, until Ctrl-C. With `--show` it plays the story the guard exists for once: a migration
//! adds a column, PostgREST alone answers PGRST204, the guard heals the same insert. With
//! `--migrations DIR` it applies a developer's own `*.sql` files instead of the demo schema and
//! stays up as the local API they develop against.

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
}

/// The demo schema, PostgREST's usual roles included.
const DEMO_SCHEMA: &str = "
    CREATE ROLE anon NOLOGIN;
    CREATE ROLE authenticator LOGIN NOINHERIT;
    GRANT anon TO authenticator;
    GRANT USAGE ON SCHEMA public TO anon;
    ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON TABLES TO anon;
    ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON SEQUENCES TO anon;
    ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT EXECUTE ON FUNCTIONS TO anon;
    CREATE TABLE chat_messages (id bigserial PRIMARY KEY, content text NOT NULL, created_at timestamptz DEFAULT now());";

const ROLES_ONLY: &str = "
    DO $$ BEGIN
      IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'anon') THEN CREATE ROLE anon NOLOGIN; END IF;
      IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'authenticator') THEN
        CREATE ROLE authenticator LOGIN NOINHERIT; END IF;
    END $$;
    GRANT anon TO authenticator;
    GRANT USAGE ON SCHEMA public TO anon;
    GRANT ALL ON ALL TABLES IN SCHEMA public TO anon;
    GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO anon;
    ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON TABLES TO anon;
    ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON SEQUENCES TO anon;";

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
        wait_for_signal().await;
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
        let schema = match &options.migrations {
            None => DEMO_SCHEMA.to_string(),
            Some(migrations) => format!("{}\n{ROLES_ONLY}", read_migrations(migrations)?),
        };
        execute(&db_uri, &schema).await?;

        let (port, admin_port) = (free_port()?, free_port()?);
        let config = format!(
            "db-uri = \"postgresql://authenticator@127.0.0.1:{}/postgres\"\ndb-schemas = \"public\"\n\
             db-anon-role = \"anon\"\ndb-channel = \"pgrst\"\nserver-host = \"127.0.0.1\"\nserver-port = {port}\n\
             admin-server-port = {admin_port}\nlog-level = \"error\"\n",
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
        Ok(Sandbox { guard, postgrest, pg, dir, db_uri, postgrest_url, admin_url })
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

/// The `*.sql` files of `dir`, in name order, as one script.
fn read_migrations(dir: &Path) -> Result<String, String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("--migrations {}: {e}", dir.display()))?
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|e| e == "sql"))
        .collect();
    files.sort();
    let mut script = String::new();
    for file in files {
        script.push_str(&std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?);
        script.push_str(";\n");
    }
    Ok(script)
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
