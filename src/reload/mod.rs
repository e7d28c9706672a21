//! Making PostgREST reload and knowing when it has: the NOTIFY connection ([`notifier`]), the load
//! counter on PostgREST's admin server ([`load_counter`]) and single-flight coordination of both
//! ([`coordinator`]).

pub mod coordinator;
pub mod load_counter;
pub mod notifier;

pub use coordinator::{ReloadCoordinator, Ticket, WaitSettings};
pub use load_counter::LoadCounter;
pub use notifier::Notifier;
