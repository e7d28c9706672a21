//! The alert rules shipped in config/prometheus, evaluated by a real Prometheus (Debian's package)
//! scraping a running guard: with the guard's database stopped, the database alert goes pending,
//! then firing; with the database back, it clears. (`.ci/check-deployment-files` runs promtool's
//! own checks and unit tests of the same rules.)

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::support;
use crate::support::client::{eventually, HttpClient};

struct Prometheus {
    port: u16,
    dir: std::path::PathBuf,
    child: Child,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Prometheus {
    /// Scrapes `target` every second as job `pgrst-guard`, evaluating `rules` every second with each
    /// alert's `for` shortened to `for_` (the rule expressions are the shipped ones).
    fn start(target: std::net::SocketAddr, for_: &str) -> Prometheus {
        let port = support::pg::free_port();
        let dir = std::env::temp_dir().join(format!("pgrst-guard-prometheus-{}-{port}", std::process::id()));
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let rules =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/prometheus/pgrst-guard.rules.yml"))
                .unwrap();
        let rules: String = rules
            .lines()
            .map(|line| match line.trim_start().strip_prefix("for:") {
                Some(_) => format!("{}for: {for_}", &line[..line.len() - line.trim_start().len()]),
                None => line.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(dir.join("rules.yml"), rules).unwrap();
        std::fs::write(
            dir.join("prometheus.yml"),
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: [rules.yml]\n\
                 scrape_configs:\n  - job_name: pgrst-guard\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let binary = ["/usr/bin/prometheus", "/usr/local/bin/prometheus"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("prometheus is not installed (Debian: apt-get install prometheus; .ci/run does)");
        let child = Command::new(binary)
            .current_dir(&dir)
            .arg("--config.file=prometheus.yml")
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus");
        Prometheus { port, dir, child }
    }

    /// The state Prometheus gives `alert` now: inactive, pending or firing.
    async fn alert_state(&self, http: &HttpClient, alert: &str) -> String {
        let Ok(r) = http
            .try_send(
                http::Method::GET,
                &format!("http://127.0.0.1:{}/api/v1/alerts", self.port),
                &[],
                bytes::Bytes::new(),
            )
            .await
        else {
            return "unreachable".to_string();
        };
        let Ok(alerts) = serde_json::from_slice::<serde_json::Value>(&r.body) else {
            return "starting".to_string();
        };
        alerts["data"]["alerts"]
            .as_array()
            .and_then(|alerts| alerts.iter().find(|a| a["labels"]["alertname"] == alert))
            .and_then(|a| a["state"].as_str())
            .unwrap_or("inactive")
            .to_string()
    }
}

#[tokio::test]
async fn a_stuck_database_connection_fires_its_alert_in_a_real_prometheus() {
    let bed = support::RealBed::start(support::postgrest::Family::V14, "").await;
    let guard = bed.guard(&bed.pg.uri("postgres"), &[("PGRST_GUARD_ADMIN_LISTEN", "127.0.0.1:0")]).await;
    let prometheus = Prometheus::start(guard.admin_addr.unwrap(), "5s");
    let http = HttpClient::new();
    const ALERT: &str = "PgrstGuardDatabaseConnectionLost";
    // Scraped and evaluated, and quiet while the database is there.
    let scraping = eventually(Duration::from_secs(30), || async {
        let r = http
            .try_send(
                http::Method::GET,
                &format!("http://127.0.0.1:{}/api/v1/query?query=pgrst_guard_database_connected", prometheus.port),
                &[],
                bytes::Bytes::new(),
            )
            .await;
        r.ok()
            .and_then(|r| serde_json::from_slice::<serde_json::Value>(&r.body).ok())
            .is_some_and(|v| v["data"]["result"][0]["value"][1] == "1")
    })
    .await;
    assert!(scraping, "Prometheus does not scrape the guard");
    assert_eq!(prometheus.alert_state(&http, ALERT).await, "inactive");

    bed.pg.stop().await;
    let firing =
        eventually(Duration::from_secs(40), || async { prometheus.alert_state(&http, ALERT).await == "firing" }).await;
    assert!(firing, "{ALERT} is {}", prometheus.alert_state(&http, ALERT).await);

    bed.pg.start_again().await;
    let cleared =
        eventually(Duration::from_secs(40), || async { prometheus.alert_state(&http, ALERT).await == "inactive" })
            .await;
    assert!(cleared, "{ALERT} is still {}", prometheus.alert_state(&http, ALERT).await);
}
