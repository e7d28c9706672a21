//! The heal layer: a tower [`Layer`](tower::Layer) around the forwarder that makes stale schema
//! caches invisible to clients.
//!
//! For each request [`service`] streams the body to PostgREST through a
//! [`ReplayBody`](replay_body::ReplayBody) (which keeps a copy, under a per-body and an overall
//! cap), and [`classify`] turns the answer into a [`Verdict`](classify::Verdict): pass through,
//! stale (PGRST200/202/204/205, `404 {}` before v13), cache empty (PGRST002), or a database error
//! a reload in progress explains (42P01/42703/42883). Anything but pass-through starts a heal, the
//! state machine of [`machine`]:
//!
//! ```text
//!            ┌──────────────────────────── Judge ◄─────────────────────────────┐
//!            │ stale (new object)     │ stale (same object)   │ empty cache    │
//!            ▼                        ▼                       ▼                │
//!          Check ── exists ──►     Reload ──► Wait ─ ready ─► Replay ──────────┘
//!            │ missing / uncurable    ▲  no more  │  ▲             ▲
//!            ▼                        └── (a 2nd) ┘  └─ Settle ────┘
//!          Done                                   (covering reload done:
//!                                                  back-off, no NOTIFY)
//! ```
//!
//! Who owns what: the heal owns its [`Budget`](budget::Budget) (upstream requests, reloads, the
//! deadline) and its request; everything shared with other requests — the catalog's answers, the
//! flights, the database connection — belongs to [`crate::reload`] and runs in tasks of its own.
//! A healed answer carries `X-Pgrst-Guard: replayed`. The healed errors come from PostgREST's
//! planning, or from a transaction that was rolled back, so a replayed write runs at most once.
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
