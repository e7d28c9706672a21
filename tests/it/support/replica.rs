//! A hot standby of a test cluster, made as a real replica is (`pg_basebackup -R`), streaming from
//! it, and its promotion: the server a guard must not take for a primary, and the one it must find
//! after a failover.

use std::process::Command;

use super::pg::{free_port, run_checked, TestCluster};

impl TestCluster {
    /// A streaming hot standby of `primary` on a port of its own. Nothing to set on the primary:
    /// `wal_level = replica` and `max_wal_senders = 10` are PostgreSQL's defaults, and initdb's
    /// pg_hba.conf lets 127.0.0.1 replicate (trust).
    pub async fn start_standby_of(primary: &TestCluster) -> TestCluster {
        let (primary_port, bindir, as_postgres_user) = (primary.port, primary.bindir.clone(), primary.as_postgres_user);
        tokio::task::spawn_blocking(move || {
            let port = free_port();
            let dir = std::env::temp_dir().join(format!("pgrst-guard-standby-{}-{port}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("create standby dir");
            if as_postgres_user {
                run_checked(Command::new("chown").arg("postgres:postgres").arg(&dir));
            }
            let standby = TestCluster { dir, port, bindir, as_postgres_user };
            let data = standby.data_dir();
            let primary_port = primary_port.to_string();
            let args = ["-h", "127.0.0.1", "-p", &primary_port, "-U", "postgres", "-D", data.to_str().unwrap()];
            // -R writes standby.signal and primary_conninfo: the copy starts as a streaming replica.
            let out = standby.command("pg_basebackup", &[&args[..], &["-R", "-X", "stream", "--no-sync"]].concat());
            assert!(out.status.success(), "pg_basebackup failed: {}", String::from_utf8_lossy(&out.stderr));
            standby.start_server_blocking();
            standby
        })
        .await
        .expect("standby start task panicked")
    }

    /// Is the server in recovery (a standby)?
    pub async fn in_recovery(&self) -> bool {
        let client = self.connect("postgres").await;
        client.query_one("SELECT pg_is_in_recovery()", &[]).await.expect("pg_is_in_recovery").get(0)
    }

    /// Ends recovery: the standby becomes a primary. Returns once it takes writes.
    pub async fn promote(&self) {
        // pg_promote waits (up to 60 s) for the promotion to finish.
        self.sql("SELECT pg_promote()").await;
        assert!(!self.in_recovery().await, "promoted");
    }
}
