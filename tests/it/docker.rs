//! docker-compose.yml and the Dockerfile, started for real: the image is built from the Dockerfile,
//! the three services come up in order of health, the demo migration is applied, and the heal is
//! seen through the guard's published port; `docker stop` drains and exits 0. Base images come from
//! tests/docker/testbed.sh (no registry is reachable here). Everything the test starts is removed.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use http::StatusCode;

use crate::support;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn run(program: &str, args: &[&str], envs: &[(&str, String)]) -> Output {
    let mut command = Command::new(program);
    command.args(args).current_dir(root()).stdin(Stdio::null());
    for (key, value) in envs {
        command.env(key, value);
    }
    command.output().unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

fn check(output: Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{what} failed:\n{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    stdout
}

/// `docker-compose -p PROJECT ...` with the published ports on 127.0.0.1.
struct Compose {
    project: String,
    envs: Vec<(&'static str, String)>,
}

impl Compose {
    fn run(&self, args: &[&str]) -> Output {
        let mut all = vec!["-p", &self.project, "-f", "docker-compose.yml"];
        all.extend_from_slice(args);
        run("docker-compose", &all, &self.envs)
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        let _ = self.run(&["down", "--volumes", "--rmi", "local", "--timeout", "5"]);
    }
}

#[tokio::test]
async fn docker_compose_runs_the_guard_in_front_of_postgrest_and_heals() {
    let started = Instant::now();
    check(run("bash", &["tests/docker/testbed.sh"], &[]), "the docker test bed");
    let (guard_port, admin_port, rest_port) =
        (support::pg::free_port(), support::pg::free_port(), support::pg::free_port());
    let compose = Compose {
        project: format!("pgrstguardtest{}", std::process::id()),
        envs: vec![
            ("PGRST_GUARD_PUBLISH", format!("127.0.0.1:{guard_port}")),
            ("PGRST_GUARD_ADMIN_PUBLISH", format!("127.0.0.1:{admin_port}")),
            ("PGRST_PUBLISH", format!("127.0.0.1:{rest_port}")),
        ],
    };
    let built = Instant::now();
    check(compose.run(&["build", "guard"]), "docker-compose build");
    let build_time = built.elapsed();
    check(compose.run(&["up", "-d"]), "docker-compose up");

    let http = support::client::HttpClient::new();
    let guard = format!("http://127.0.0.1:{guard_port}");
    let ready = support::client::eventually(Duration::from_secs(90), || async {
        http.try_send(http::Method::GET, &format!("http://127.0.0.1:{admin_port}/readyz"), &[], "")
            .await
            .is_ok_and(|r| r.status == StatusCode::OK)
    })
    .await;
    let logs = || String::from_utf8_lossy(&compose.run(&["logs", "--no-color"]).stdout).into_owned();
    assert!(ready, "the guard is ready (database connected):\n{}", logs());
    let r = http.get(&format!("{guard}/chat_messages")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());

    // The demo migration, as README says to apply it.
    let migration = std::fs::read(root().join("docker/migration.sql")).unwrap();
    let mut psql = Command::new("docker-compose")
        .args(["-p", &compose.project, "-f", "docker-compose.yml", "exec", "-T", "db", "psql", "-U", "postgres"])
        .current_dir(root())
        .envs(compose.envs.iter().map(|(k, v)| (*k, v.clone())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    psql.stdin.take().unwrap().write_all(&migration).unwrap();
    check(psql.wait_with_output().unwrap(), "the demo migration");

    let body = r#"{"content":"hi","artifact_ids":["a1"]}"#;
    let direct = http.post_json(&format!("http://127.0.0.1:{rest_port}/chat_messages"), body).await;
    assert_eq!((direct.status, direct.code().as_deref()), (StatusCode::BAD_REQUEST, Some("PGRST204")));
    let healed = http.post_json(&format!("{guard}/chat_messages"), body).await;
    assert_eq!(healed.status, StatusCode::CREATED, "{}\n{}", healed.text(), logs());
    assert_eq!(healed.header("x-pgrst-guard"), Some("replayed"));

    let image = format!("{}_guard", compose.project);
    let size = check(run("docker", &["image", "inspect", &image, "--format", "{{.Size}}"], &[]), "image inspect");
    let size_mib = size.trim().parse::<f64>().unwrap_or(0.0) / (1024.0 * 1024.0);

    // `docker stop` sends SIGTERM to the guard (PID 1): it drains and exits 0.
    let container = check(compose.run(&["ps", "-q", "guard"]), "docker-compose ps").trim().to_string();
    check(compose.run(&["stop", "guard"]), "docker-compose stop guard");
    let exit = check(run("docker", &["inspect", &container, "--format", "{{.State.ExitCode}}"], &[]), "inspect");
    assert_eq!(exit.trim(), "0", "the guard exits 0 on SIGTERM:\n{}", logs());
    println!("docker: image {size_mib:.1} MiB, its build {build_time:?}, the whole test {:?}", started.elapsed());
}
