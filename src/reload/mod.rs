//! Making PostgREST reload and knowing when it has.
//!
//! ```text
//!  heal ──► catalog::CatalogCheck ── batched queries ──┐
//!   │        (would PostgREST cache it? what did a      │
//!   │         reload already fail to cure?)             ▼
//!   │                                            database::Database ◄── keeper task: connect,
//!   └──► coordinator::ReloadCoordinator               │   ▲              prove round trip + LISTEN
//!          (join or start a flight; the budget)       │   │ NOTIFYs others send
//!               │                                     │   │
//!               └──► flight::Flight ── NOTIFY ────────┘   │
//!                     (its own task: baselines,            │
//!                      NOTIFY, load counters) ◄── observed ┘
//!                          │
//!                          └──► load_counter::LoadCounter (PostgREST's admin /metrics)
//! ```
//!
//! Who owns what: the [`database`] owns the connection and its health; the [`catalog`] owns the
//! answers and what it learned from reloads that did not cure; the [`coordinator`] owns the flight
//! log and the reload budget; each [`flight`] owns its own progress, published to its waiters. No
//! request owns any of it: shared work runs in tasks of its own on the guard's control runtime, so a
//! client that leaves changes nothing for the others.

pub mod barrier;
pub mod catalog;
pub mod coordinator;
pub mod database;
pub mod flight;
pub mod load_counter;

pub use barrier::{Clearance, TargetKind, WriteBarrier, WriteTarget};
pub use catalog::{CatalogAnswer, CatalogCheck, CatalogReply};
pub use coordinator::{ReloadCoordinator, Ticket, WaitSettings};
pub use database::{Database, DatabaseSettings};
pub use flight::Flight;
pub use load_counter::LoadCounter;
