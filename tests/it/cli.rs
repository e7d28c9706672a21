//! The binary: configuration errors, help, sources and their precedence, secrets kept out of
//! logs, and a clean stop on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use pgrst_guard::config::{sources, Config, Setting, Settings, Source};

use crate::support;

fn guard() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_pgrst-guard"));
    command.env_clear().env("PATH", std::env::var("PATH").unwrap_or_default());
    command
}

fn fails_with(command: &mut Command) -> String {
    let out = command.output().unwrap();
    assert_eq!(out.status.code(), Some(2), "bad configuration exits 2");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "one clear line: {stderr}");
    stderr
}

#[test]
fn bad_configuration_names_the_key_in_one_line() {
    let e = fails_with(&mut guard());
    assert!(e.contains("PGRST_GUARD_DB_URI") && e.contains("required"), "{e}");
    let e = fails_with(guard().args(["--db-uri", "postgres://u@h/db", "--upstream", "ftp://x"]));
    assert!(e.contains("PGRST_GUARD_UPSTREAM"), "{e}");
    let e = fails_with(guard().env("PGRST_GUARD_DB_URI", "postgres://u@h/db").env("PGRST_GUARD_LISTEN", "nowhere"));
    assert!(e.contains("PGRST_GUARD_LISTEN"), "{e}");
    let e = fails_with(guard().env("PGRST_GUARD_DB_URI", "postgres://u:hunter2@h:port/db"));
    assert!(e.contains("PGRST_GUARD_DB_URI") && !e.contains("hunter2"), "{e}");
}

#[test]
fn help_lists_every_key() {
    let out = guard().arg("--help").output().unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    for key in pgrst_guard::config::KEYS {
        assert!(help.contains(key.env), "--help lacks {}", key.env);
    }
}

#[test]
fn the_documented_config_file_lists_every_key_and_parses() {
    let documented = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/pgrst-guard.toml")).unwrap();
    assert_eq!(
        documented,
        pgrst_guard::config::toml_template(),
        "config/pgrst-guard.toml is out of date: run `cargo run -- --print-config > config/pgrst-guard.toml`"
    );
    for key in pgrst_guard::config::KEYS {
        assert!(
            documented.contains(key.toml) && documented.contains(key.env),
            "config/pgrst-guard.toml lacks {}",
            key.env
        );
    }
    let path = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config/pgrst-guard.toml"));
    let settings = sources::from_toml(path).unwrap();
    assert!(!settings.is_empty());
    let db_uri = Setting { value: "postgres://u@h/db".into(), source: Some(Source::Environment) };
    Config::load(Some(path), Settings::from([("PGRST_GUARD_DB_URI".to_string(), db_uri)])).unwrap();
}

#[test]
fn flags_win_over_environment_which_wins_over_the_file() {
    let dir = std::env::temp_dir().join(format!("pgrst-guard-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("guard.toml");
    std::fs::write(
        &file,
        "upstream = \"http://file:3000\"\nlisten = \"nowhere-from-file\"\ndb_uri = \"postgres://file@h/db\"\n",
    )
    .unwrap();
    // The same bad key from each source: the error shows which one won, and where it was set.
    let with_file = || {
        let mut command = guard();
        command.arg("--config").arg(&file);
        command
    };
    let e =
        fails_with(with_file().env("PGRST_GUARD_LISTEN", "nowhere-from-env").args(["--listen", "nowhere-from-flag"]));
    assert!(e.contains("PGRST_GUARD_LISTEN (set by --listen)") && e.contains("nowhere-from-flag"), "{e}");
    let e = fails_with(with_file().env("PGRST_GUARD_LISTEN", "nowhere-from-env"));
    assert!(e.contains("PGRST_GUARD_LISTEN (set in the environment)") && e.contains("nowhere-from-env"), "{e}");
    let e = fails_with(&mut with_file());
    assert!(e.contains(&format!("PGRST_GUARD_LISTEN (set in {} line 2)", file.display())), "{e}");
    let e = fails_with(guard().env("PGRST_GUARD_CONFIG", &file));
    assert!(e.contains("line 2") && e.contains("nowhere-from-file"), "{e}");

    // Good values merge key by key: what the file sets stays unless overridden.
    std::fs::write(&file, "listen = \"127.0.0.1:7001\"\nupstream = \"http://file:3000\"\ndb_uri = \"postgres://file@h/db\"\ndb_channel = \"from_file\"\nheal_deadline_ms = 5000\n").unwrap();
    let set = |value: &str, source: Source| Setting { value: value.into(), source: Some(source) };
    let overrides = Settings::from([
        ("PGRST_GUARD_UPSTREAM".to_string(), set("http://env:3000/rest/v1", Source::Environment)),
        ("PGRST_GUARD_DB_CHANNEL".to_string(), set("from_flag", Source::Flag("--db-channel".into()))),
    ]);
    let config = Config::load(Some(&file), overrides).unwrap();
    assert_eq!(config.listen.to_string(), "127.0.0.1:7001");
    assert_eq!(config.upstream.to_string(), "http://env:3000/rest/v1");
    assert_eq!(config.db_channel, "from_flag");
    assert_eq!(config.heal_deadline, Duration::from_secs(5));

    std::fs::write(&file, "upstream = \"http://file:3000\"\nlistne = \"127.0.0.1:7001\"\n").unwrap();
    let e = fails_with(guard().arg("--config").arg(&file));
    assert!(e.contains("unknown key") && e.contains("listne") && e.contains("line 2"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn help_never_shows_an_environment_value() {
    let out = guard().arg("--help").env("PGRST_GUARD_DB_URI", "postgres://u:hunter2@h/db").output().unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    assert!(help.contains("PGRST_GUARD_DB_URI") && !help.contains("hunter2"), "{help}");
}

#[test]
fn runs_without_logging_secrets_and_stops_cleanly_on_sigterm() {
    // Every form a password can take in a PostgreSQL connection string.
    for (db_uri, shown) in [
        ("postgres://authenticator:s3cret-pw@127.0.0.1:1/postgres", "authenticator:***@"),
        ("postgres://authenticator@127.0.0.1:1/postgres?password=s3cret-pw", "password=***"),
        ("host=127.0.0.1 port=1 user=authenticator password='s3cret-pw' dbname=postgres", "password=***"),
    ] {
        let port = support::pg::free_port();
        let mut child = guard()
            .args(["--listen", &format!("127.0.0.1:{port}"), "--upstream", "http://127.0.0.1:9/rest/v1"])
            .env("PGRST_GUARD_DB_URI", db_uri)
            .env("PGRST_GUARD_LOG_FORMAT", "json")
            // Request spans print headers at this level; credentials must show as `Sensitive`.
            .env("PGRST_GUARD_LOG_LEVEL", "info,tower_http=debug")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut seen = Vec::new();
        for line in lines.by_ref() {
            let line = line.unwrap();
            seen.push(line.clone());
            if line.contains("pgrst-guard listening") {
                break;
            }
        }
        let request = "GET /todos HTTP/1.1\r\nHost: x\r\napikey: s3cret-key\r\nAuthorization: Bearer s3cret-jwt\r\nCookie: sb=s3cret-cookie\r\nConnection: close\r\n\r\n";
        let mut client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        std::io::Write::write_all(&mut client, request.as_bytes()).unwrap();
        let mut answer = String::new();
        std::io::Read::read_to_string(&mut client, &mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
        // Let the database connection attempt fail and be logged too.
        std::thread::sleep(std::time::Duration::from_millis(300));
        let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
        assert!(status.success());
        let exit = child.wait().unwrap();
        seen.extend(lines.map_while(Result::ok));
        assert_eq!(exit.code(), Some(0), "SIGTERM stops with 0; log: {seen:?}");
        let log = seen.join("\n");
        assert!(log.contains("pgrst-guard listening"), "{log}");
        assert!(log.contains(shown), "{log}");
        assert!(!log.contains("s3cret-pw"), "password leaked: {log}");
        assert!(log.contains("Sensitive") && !log.contains("s3cret-"), "a credential leaked: {log}");
        for line in &seen {
            serde_json::from_str::<serde_json::Value>(line).unwrap_or_else(|_| panic!("not JSON: {line}"));
        }
    }
}

#[test]
fn a_second_guard_on_the_same_address_fails_with_one_clear_line() {
    let port = support::pg::free_port();
    let listen = format!("127.0.0.1:{port}");
    let start = || {
        guard()
            .args(["--listen", &listen, "--db-uri", "postgres://u@127.0.0.1:1/db"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut first = start();
    let mut first_log = BufReader::new(first.stderr.take().unwrap()).lines();
    assert!(first_log.any(|l| l.is_ok_and(|l| l.contains("pgrst-guard listening"))), "the first guard listens");
    let second = start().wait_with_output().unwrap();
    let _ = first.kill();
    let _ = first.wait();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_ne!(second.status.code(), Some(0), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(lines[0].to_ascii_lowercase().contains("address already in use") && lines[0].contains(&listen), "{stderr}");
}
