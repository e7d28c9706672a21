//! A throwaway PgBouncer in transaction mode (as Supabase's port 6543) in front of a test cluster,
//! from Debian's `pgbouncer` package, run as the `postgres` user when the tests run as root (it
//! refuses root), on a free port; stopped and removed on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::pg::{free_port, TestCluster};

pub struct PgBouncer {
    pub port: u16,
    dir: PathBuf,
    child: Child,
}

impl PgBouncer {
    /// Starts PgBouncer with `pool_mode` (`transaction` or `session`) in front of `pg`'s `postgres`
    /// database, and waits until it accepts connections.
    pub async fn start(pg: &TestCluster, pool_mode: &str) -> PgBouncer {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("pgrst-guard-pgbouncer-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("pgbouncer dir");
        let config = format!(
            "[databases]\npostgres = host=127.0.0.1 port={} dbname=postgres user=postgres\n\
             [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nauth_type = any\npool_mode = {pool_mode}\n\
             default_pool_size = 4\nserver_round_robin = 1\nunix_socket_dir =\nlogfile = {}\nignore_startup_parameters = extra_float_digits,application_name\n",
            pg.port(),
            dir.join("pgbouncer.log").display()
        );
        let config_path = dir.join("pgbouncer.ini");
        std::fs::write(&config_path, config).expect("write pgbouncer.ini");
        let as_root = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0")))
            .unwrap_or(false);
        if as_root {
            let _ = Command::new("chown").arg("-R").arg("postgres:postgres").arg(&dir).status();
        }
        let binary = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("pgbouncer is not installed (Debian: apt-get install pgbouncer; .ci/run does)");
        let mut command = if as_root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", binary]);
            c
        } else {
            Command::new(binary)
        };
        let child = command
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start pgbouncer");
        let bouncer = PgBouncer { port, dir, child };
        let up = super::client::eventually(Duration::from_secs(10), || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
        })
        .await;
        assert!(up, "pgbouncer did not start: {}", bouncer.log());
        bouncer
    }

    /// A URI for the `postgres` database through PgBouncer.
    pub fn uri(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        // runuser passes the signal on to pgbouncer.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("pkill").arg("-f").arg(self.dir.join("pgbouncer.ini")).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
