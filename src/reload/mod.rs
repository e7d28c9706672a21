//! Making PostgREST reload and knowing when it has: the guard's database connection
//! ([`notifier`]: NOTIFY, LISTEN, queries), the [`catalog`] check that tells a stale cache from a
//! client's mistake, the load counter on PostgREST's admin server ([`load_counter`]) and
//! single-flight coordination of it all ([`coordinator`]).

pub mod catalog;
pub mod coordinator;
pub mod load_counter;
pub mod notifier;

pub use catalog::{CatalogAnswer, CatalogCheck};
pub use coordinator::{ReloadCoordinator, Ticket, WaitSettings};
pub use load_counter::LoadCounter;
pub use notifier::Notifier;
