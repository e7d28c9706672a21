//! Supabase self-hosted as it is today, trimmed to what reaches PostgREST: PostgreSQL, the real
//! PostgREST 14.17 verifying Supabase's asymmetric keys (a JWKS, ES256 tokens: `PGRST_JWT_SECRET:
//! ${JWT_JWKS}`), the guard in front of it as `rest`, and a gateway routing `/rest/v1/` as Envoy's
//! `api-gw` does. A migration heals through the gateway for a user's ES256 token, and the anon key.

use http::{Method, StatusCode};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};

use pgrst_guard::sandbox::base64url;

use crate::support;
use crate::support::postgrest::{Family, PostgrestOptions};
use crate::support::RealBed;

/// An ES256 signing key as Supabase's asymmetric keys are, and its public JWKS.
struct SigningKey {
    pair: EcdsaKeyPair,
    rng: SystemRandom,
}

impl SigningKey {
    fn generate() -> SigningKey {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
        SigningKey { pair, rng }
    }

    fn jwks(&self) -> String {
        // The public key is the uncompressed point: 0x04, then x and y.
        let point = self.pair.public_key().as_ref();
        let (x, y) = (&point[1..33], &point[33..65]);
        serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": "test-key",
            "key_ops": ["verify"], "x": base64url(x), "y": base64url(y)}]})
        .to_string()
    }

    fn token(&self, claims: serde_json::Value) -> String {
        let header = base64url(br#"{"alg":"ES256","typ":"JWT","kid":"test-key"}"#);
        let payload = base64url(claims.to_string().as_bytes());
        let signing_input = format!("{header}.{payload}");
        let signature = self.pair.sign(&self.rng, signing_input.as_bytes()).unwrap();
        format!("{signing_input}.{}", base64url(signature.as_ref()))
    }
}

#[tokio::test]
async fn a_heal_through_the_gateway_with_an_es256_token() {
    let key = SigningKey::generate();
    let bed = RealBed::start_with(
        Family::V14,
        "CREATE TABLE todos (id bigserial PRIMARY KEY, title text NOT NULL, owner text);
         GRANT USAGE ON SCHEMA public TO anon, authenticated;",
        |o| PostgrestOptions { env: vec![("PGRST_JWT_SECRET".to_string(), key.jwks())], ..o },
    )
    .await;
    let guard = bed.guard(&bed.pg.uri("postgres"), &[("PGRST_GUARD_UPSTREAM_TIMEOUT_MS", "29000")]).await;
    let gateway = support::nginx::Gateway::start(guard.addr).await;
    let far_future = 4_102_444_800u64;
    let user = key.token(
        serde_json::json!({"role": "authenticated", "sub": "user-1", "exp": far_future, "aud": "authenticated"}),
    );
    let anon = key.token(serde_json::json!({"role": "anon", "iss": "supabase", "exp": far_future}));
    let url = format!("{}/rest/v1/todos", gateway.url());

    // The stack works before the migration, with the user's token verified by PostgREST.
    let headers = |token: &str| -> Vec<(String, String)> {
        vec![
            ("apikey".to_string(), anon.clone()),
            ("authorization".to_string(), format!("Bearer {token}")),
            ("content-type".to_string(), "application/json".to_string()),
        ]
    };
    let send = |token: String, body: &'static str| {
        let (http, url) = (bed.http.clone(), url.clone());
        let headers = headers(&token);
        async move {
            let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            http.send(Method::POST, &url, &headers, body).await
        }
    };
    let r = send(user.clone(), r#"{"title":"before"}"#).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let forged = SigningKey::generate().token(serde_json::json!({"role": "authenticated", "exp": far_future}));
    let r = send(forged, r#"{"title":"forged"}"#).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "a token signed with another key: {}", r.text());

    // A migration PostgREST has not seen: healed through the gateway for the user and for anon.
    bed.pg.sql("ALTER TABLE todos ADD COLUMN due date").await;
    let r = send(user.clone(), r#"{"title":"after","due":"2026-12-01"}"#).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    assert_eq!(r.header("x-pgrst-guard"), Some("replayed"));
    bed.pg.sql("ALTER TABLE todos ADD COLUMN done boolean DEFAULT false").await;
    let r = send(anon.clone(), r#"{"title":"anon","done":true}"#).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    assert_eq!(r.header("x-pgrst-guard"), Some("replayed"));
    assert_eq!(bed.scalar("SELECT count(*) FROM todos").await, 3);
}
