//! What can be checked of the deployment files as files (tests/docker.rs starts them for real): the
//! compose file and the Supabase override parse,
//! its services, ports and environment agree with each other and with the guard's configuration
//! keys, the Dockerfile is multi-stage, non-root and health-checked, and the demo's SQL heals as the
//! README says.

mod support;

use std::collections::BTreeMap;

use http::StatusCode;
use pgrst_guard::config::{Config, RawConfig, KEYS};
use yaml_rust2::{Yaml, YamlLoader};

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

fn environment(service: &Yaml) -> BTreeMap<String, String> {
    service["environment"]
        .as_hash()
        .expect("environment as a map")
        .iter()
        .map(|(k, v)| {
            let value = match v {
                Yaml::String(s) => s.clone(),
                Yaml::Integer(i) => i.to_string(),
                other => panic!("unexpected value {other:?}"),
            };
            (k.as_str().unwrap().to_string(), value)
        })
        .collect()
}

#[test]
fn the_compose_file_wires_the_guard_to_postgrest_and_postgres() {
    let docs = YamlLoader::load_from_str(&read("docker-compose.yml")).expect("docker-compose.yml parses");
    let services = &docs[0]["services"];
    let (db, rest, guard) = (&services["db"], &services["rest"], &services["guard"]);
    assert!(db["image"].as_str().unwrap().starts_with("postgres:"));
    assert!(rest["image"].as_str().unwrap().starts_with("postgrest/postgrest:"));
    assert_eq!(guard["build"].as_str(), Some("."));

    let rest_env = environment(rest);
    let guard_env = environment(guard);
    for key in guard_env.keys() {
        assert!(KEYS.iter().any(|k| k.env == key), "{key} is not a pgrst-guard key");
    }
    let config = Config::from_raw(&guard_env.clone().into_iter().collect::<RawConfig>())
        .expect("the guard's environment is valid");
    assert_eq!(config.upstream.to_string(), format!("http://rest:{}", rest_env["PGRST_SERVER_PORT"]));
    assert_eq!(config.upstream_admin[0].to_string(), format!("http://rest:{}", rest_env["PGRST_ADMIN_SERVER_PORT"]));
    assert_eq!(config.db_channel, rest_env["PGRST_DB_CHANNEL"]);
    assert_eq!(config.db_schemas.join(","), rest_env["PGRST_DB_SCHEMAS"]);
    assert!(guard_env["PGRST_GUARD_DB_URI"].contains("@db:5432/postgres"));
    assert!(rest_env["PGRST_DB_URI"].contains("@db:5432/postgres"), "NOTIFY goes to the database PostgREST listens on");

    // Published on 127.0.0.1 unless the user says otherwise, mapped to the ports the guard listens on.
    let ports: Vec<&str> = guard["ports"].as_vec().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
    for port in [config.listen.port(), config.admin_listen.unwrap().port()] {
        assert!(
            ports.iter().any(|p| p.ends_with(&format!(":{port}}}:{port}")) && p.contains("127.0.0.1")),
            "{ports:?}"
        );
    }
    // Start-up order by health: PostgREST only once the database is healthy, the guard only once
    // PostgREST's cache is loaded.
    assert_eq!(rest["depends_on"]["db"]["condition"].as_str(), Some("service_healthy"));
    assert_eq!(guard["depends_on"]["rest"]["condition"].as_str(), Some("service_healthy"));
    let check: Vec<&str> = rest["healthcheck"]["test"].as_vec().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(check, ["CMD", "postgrest", "--ready"]);
    let mounts: Vec<&str> = db["volumes"].as_vec().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    for mount in mounts {
        let file = mount.split(':').next().unwrap().trim_start_matches("./");
        assert!(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(file).exists(), "{file} is missing");
    }
}

#[test]
fn the_dockerfile_is_multi_stage_non_root_and_health_checked() {
    let dockerfile = read("Dockerfile");
    assert!(dockerfile.lines().filter(|l| l.starts_with("FROM ")).count() >= 2, "multi-stage");
    let user = dockerfile.lines().rev().find(|l| l.starts_with("USER ")).expect("a USER line");
    assert!(!user.contains("root") && user.trim() != "USER 0", "{user}");
    let healthcheck = dockerfile.lines().skip_while(|l| !l.starts_with("HEALTHCHECK")).take(2).collect::<String>();
    assert!(healthcheck.contains("/healthz"), "{healthcheck}");
    assert!(dockerfile.contains("EXPOSE 8080 8081"));
    assert!(dockerfile.contains("PGRST_GUARD_ADMIN_LISTEN=0.0.0.0:8081"));
}

#[tokio::test]
async fn the_demo_migration_heals_as_the_readme_says() {
    let pg = support::pg::TestCluster::start().await;
    pg.sql(&read("docker/init.sql")).await;
    let postgrest = support::postgrest::RealPostgrest::start(
        support::postgrest::Family::V14,
        support::postgrest::PostgrestOptions::new(&pg),
    )
    .await;
    let guard = support::guard::start_guard(
        &postgrest.url(),
        &pg.uri("postgres"),
        &[("PGRST_GUARD_UPSTREAM_ADMIN", &postgrest.admin_url())],
    )
    .await;
    pg.sql(&read("docker/migration.sql")).await;
    let r = support::client::HttpClient::new()
        .post_json(&format!("{}/chat_messages", guard.url()), r#"{"content":"hi","artifact_ids":["a1"]}"#)
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    assert_eq!(r.header("x-pgrst-guard"), Some("replayed"));
}

/// The override that puts the guard in front of Supabase's self-hosted PostgREST: the guard takes
/// the name `rest` on port 3000 (Kong and Storage call rest:3000), the real PostgREST moves to
/// `postgrest` with its admin server, and the guard's keys are valid.
#[test]
fn the_supabase_override_puts_the_guard_where_kong_and_storage_look_for_postgrest() {
    let docs = YamlLoader::load_from_str(&read("docker-compose.supabase.yml")).expect("the override parses");
    let services = &docs[0]["services"];
    let (guard, postgrest) = (&services["rest"], &services["postgrest"]);
    assert!(guard["image"].as_str().unwrap().starts_with("pgrst-guard"));
    // Supabase's .env variables, as compose would substitute them.
    let substitute = |value: &str| {
        value
            .replace("${POSTGRES_PASSWORD}", "secret")
            .replace("${POSTGRES_HOST}", "db")
            .replace("${POSTGRES_PORT}", "5432")
            .replace("${POSTGRES_DB}", "postgres")
            .replace("${PGRST_DB_SCHEMAS}", "public,storage,graphql_public")
    };
    let guard_env: RawConfig = environment(guard).into_iter().map(|(k, v)| (k, substitute(&v))).collect();
    for key in guard_env.keys() {
        assert!(KEYS.iter().any(|k| k.env == key), "{key} is not a pgrst-guard key");
    }
    let config = Config::from_raw(&guard_env).expect("the guard's environment is valid");
    assert_eq!(config.listen.port(), 3000, "Kong routes /rest/v1/ to rest:3000");
    let flags: Vec<&str> = guard["command"].as_vec().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    assert_eq!(flags, ["--listen", "0.0.0.0:3000"], "Supabase's `postgrest` command is replaced by valid flags");
    let postgrest_env = environment(postgrest);
    assert_eq!(config.upstream.to_string(), format!("http://postgrest:{}", postgrest_env["PGRST_SERVER_PORT"]));
    assert_eq!(
        config.upstream_admin[0].to_string(),
        format!("http://postgrest:{}", postgrest_env["PGRST_ADMIN_SERVER_PORT"])
    );
    assert_eq!(guard["depends_on"]["postgrest"]["condition"].as_str(), Some("service_healthy"));
    let check: Vec<&str> =
        postgrest["healthcheck"]["test"].as_vec().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(check, ["CMD", "postgrest", "--ready"]);
    // The NOTIFY goes to the database PostgREST listens on, and the schemas are PostgREST's.
    let db_of = |uri: &str| uri.rsplit('@').next().unwrap().to_string();
    assert_eq!(db_of(&guard_env["PGRST_GUARD_DB_URI"]), db_of(&substitute(&postgrest_env["PGRST_DB_URI"])));
    assert_eq!(guard_env["PGRST_GUARD_DB_SCHEMAS"], substitute(&postgrest_env["PGRST_DB_SCHEMAS"]));
    // Everything Supabase's own `rest` service sets for PostgREST is still set for it.
    for key in [
        "PGRST_DB_URI",
        "PGRST_DB_SCHEMAS",
        "PGRST_DB_MAX_ROWS",
        "PGRST_DB_EXTRA_SEARCH_PATH",
        "PGRST_DB_ANON_ROLE",
        "PGRST_JWT_SECRET",
        "PGRST_DB_USE_LEGACY_GUCS",
        "PGRST_APP_SETTINGS_JWT_SECRET",
        "PGRST_APP_SETTINGS_JWT_EXP",
    ] {
        assert!(postgrest_env.contains_key(key), "{key} is not passed to PostgREST");
    }
}
