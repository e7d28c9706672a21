//! The heal layer: a tower [`Layer`](tower::Layer) around the forwarder that makes stale schema
//! caches invisible to clients.
//!
//! For each request:
//! 1. the body streams to PostgREST through a [`ReplayBody`](replay_body::ReplayBody), which keeps
//!    a copy up to `PGRST_GUARD_REPLAY_BODY_LIMIT`;
//! 2. [`classify`] turns the answer into a [`Verdict`](classify::Verdict): pass through, stale
//!    (PGRST200/202/204/205, or `404 {}` before v13), or cache empty (PGRST002);
//! 3. for a stale verdict the [`CatalogCheck`](crate::reload::CatalogCheck) asks the database whether
//!    the object exists (if not, the error is the client's and passes through at once); then the
//!    [`ReloadCoordinator`](crate::reload::ReloadCoordinator) sends one NOTIFY for all requests that
//!    fail together (or joins a reload someone else asked for) and says when it has finished;
//! 4. the request is replayed; a healed answer carries `X-Pgrst-Guard: replayed`.
//!
//! These errors come from PostgREST's planning, before any SQL runs, so a replayed write is executed
//! at most once.
//!
//! ```no_run
//! # use std::sync::Arc;
//! # fn demo(config: &pgrst_guard::config::Config, coordinator: Arc<pgrst_guard::reload::ReloadCoordinator>, metrics: Arc<pgrst_guard::metrics::Metrics>, catalog: Arc<pgrst_guard::reload::CatalogCheck>) {
//! use pgrst_guard::heal::{HealLayer, HealPolicy};
//! use pgrst_guard::upstream::Forwarder;
//! use tower::Layer;
//!
//! let policy = HealPolicy {
//!     replay_body_limit: 1 << 20,
//!     replay_memory: pgrst_guard::heal::replay_body::ReplayMemory::new(256 << 20),
//!     deadline: std::time::Duration::from_secs(10),
//!     backoff: std::time::Duration::from_millis(25),
//!     default_schema: "public".to_string(),
//! };
//! let service = HealLayer::new(coordinator, policy, metrics, Some(catalog)).layer(Forwarder::new(&config.upstream, config, pgrst_guard::tls::https_config(None).unwrap()));
//! # let _: pgrst_guard::heal::HealService<Forwarder<pgrst_guard::heal::replay_body::ReplayBody<pgrst_guard::body::RequestBody>>> = service;
//! # }
//! ```

pub mod budget;
pub mod classify;
mod layer;
mod machine;
pub mod replay_body;
mod service;

pub use layer::HealLayer;
pub use machine::HealOutcome;
pub use service::{HealPolicy, HealService, REPLAYED_HEADER};
