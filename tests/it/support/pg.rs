//! A throwaway PostgreSQL 15 cluster for one test: initdb in a temp dir, a free port on 127.0.0.1,
//! run as the `postgres` user when the tests run as root (the server refuses root), removed on drop.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};

pub struct TestCluster {
    pub(super) dir: PathBuf,
    pub(super) port: u16,
    pub(super) bindir: PathBuf,
    pub(super) as_postgres_user: bool,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

impl TestCluster {
    /// initdb + start. Blocking work runs off the async runtime.
    pub async fn start() -> TestCluster {
        tokio::task::spawn_blocking(Self::start_blocking).await.expect("cluster start task panicked")
    }

    pub fn start_blocking() -> TestCluster {
        let bindir = bindir();
        let as_postgres_user = running_as_root();
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("pgrst-guard-pg-{}-{}", std::process::id(), id));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create cluster dir");
        if as_postgres_user {
            run_checked(Command::new("chown").arg("postgres:postgres").arg(&dir));
        }
        let cluster = TestCluster { dir, port: free_port(), bindir, as_postgres_user };
        let data = cluster.data_dir();
        let out = cluster.command(
            "initdb",
            &["-D", data.to_str().unwrap(), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-locale", "--no-sync"],
        );
        assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        cluster.start_server_blocking();
        cluster
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// URI of a database in this cluster (trust auth, user postgres).
    pub fn uri(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{}", self.port, database)
    }

    pub async fn connect(&self, database: &str) -> Client {
        let (client, connection) =
            tokio_postgres::connect(&self.uri(database), NoTls).await.expect("connect to test cluster");
        tokio::spawn(connection);
        client
    }

    /// Runs SQL (several statements allowed) in the `postgres` database.
    pub async fn sql(&self, sql: &str) {
        self.sql_in("postgres", sql).await
    }

    pub async fn sql_in(&self, database: &str, sql: &str) {
        let client = self.connect(database).await;
        client.batch_execute(sql).await.unwrap_or_else(|e| panic!("SQL failed: {e}\n{sql}"));
    }

    pub async fn stop(&self) {
        let this = self.handle();
        tokio::task::spawn_blocking(move || this.stop_blocking()).await.expect("stop task");
    }

    pub async fn start_again(&self) {
        let this = self.handle();
        tokio::task::spawn_blocking(move || this.start_server_blocking()).await.expect("start task");
    }

    pub async fn restart(&self) {
        self.stop().await;
        self.start_again().await;
    }

    /// Turns on TLS with this certificate and key (PEM), by configuration reload.
    pub async fn enable_tls(&self, cert_pem: &str, key_pem: &str) {
        let data = self.data_dir();
        std::fs::write(data.join("server.crt"), cert_pem).expect("write server.crt");
        std::fs::write(data.join("server.key"), key_pem).expect("write server.key");
        let key = data.join("server.key");
        run_checked(Command::new("chmod").arg("600").arg(&key));
        if self.as_postgres_user {
            run_checked(Command::new("chown").arg("postgres:postgres").arg(data.join("server.crt")).arg(&key));
        }
        self.sql("ALTER SYSTEM SET ssl = on").await;
        self.sql("SELECT pg_reload_conf()").await;
    }

    fn handle(&self) -> ClusterHandle {
        ClusterHandle {
            dir: self.dir.clone(),
            port: self.port,
            bindir: self.bindir.clone(),
            as_postgres_user: self.as_postgres_user,
        }
    }

    pub(super) fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub(super) fn command(&self, tool: &str, args: &[&str]) -> Output {
        self.handle().command(tool, args)
    }

    pub(super) fn start_server_blocking(&self) {
        self.handle().start_server_blocking()
    }
}

/// The parts of a cluster that blocking start/stop work needs, cloneable into a blocking task.
struct ClusterHandle {
    dir: PathBuf,
    port: u16,
    bindir: PathBuf,
    as_postgres_user: bool,
}

impl ClusterHandle {
    fn command(&self, tool: &str, args: &[&str]) -> Output {
        let program = self.bindir.join(tool);
        let mut cmd = if self.as_postgres_user {
            let mut c = Command::new("runuser");
            c.arg("-u").arg("postgres").arg("--").arg(&program);
            c
        } else {
            Command::new(&program)
        };
        cmd.args(args).current_dir(&self.dir);
        cmd.output().unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()))
    }

    fn start_server_blocking(&self) {
        let data = self.dir.join("data");
        let log = self.dir.join("server.log");
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off \
             -c full_page_writes=off -c max_connections=300 -c shared_buffers=32MB",
            self.port,
            self.dir.display()
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = self.command(
                "pg_ctl",
                &["-D", data.to_str().unwrap(), "-l", log.to_str().unwrap(), "-o", &options, "-w", "-t", "60", "start"],
            );
            if out.status.success() {
                return;
            }
            // After a fast restart the old postmaster may still hold the port for a moment.
            if Instant::now() > deadline {
                let log_text = std::fs::read_to_string(&log).unwrap_or_default();
                panic!("pg_ctl start failed: {}\n{log_text}", String::from_utf8_lossy(&out.stderr));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn stop_blocking(&self) {
        let data = self.dir.join("data");
        let _ = self.command("pg_ctl", &["-D", data.to_str().unwrap(), "-m", "fast", "-w", "-t", "60", "stop"]);
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        let data = self.data_dir();
        let _ = self.command("pg_ctl", &["-D", data.to_str().unwrap(), "-m", "immediate", "-w", "stop"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn bindir() -> PathBuf {
    if let Ok(dir) = std::env::var("PG_BINDIR") {
        return PathBuf::from(dir);
    }
    let out = Command::new("pg_config").arg("--bindir").output().expect("pg_config not found: install postgresql-15");
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    // Debian's pg_config comes from libpq-dev and may point at /usr/bin, which lacks the server.
    if dir.join("initdb").exists() {
        dir
    } else {
        PathBuf::from("/usr/lib/postgresql/15/bin")
    }
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind free port").local_addr().unwrap().port()
}

pub(super) fn run_checked(cmd: &mut Command) {
    let out = cmd.output().expect("run command");
    assert!(out.status.success(), "{:?} failed: {}", cmd, String::from_utf8_lossy(&out.stderr));
}
