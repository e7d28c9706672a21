//! The integration tests, one crate so that the test support compiles once: one module per
//! capability, named for what it proves. A test's name is `<module>::<test>`, e.g.
//! `heal::new_column_heals_with_the_admin_url::v16` (filter: `cargo nextest run -E 'test(/^heal::/)'`).

#[macro_use]
mod support;

mod cli;
mod database;
mod decoys;
mod deployment;
mod docker;
mod doctor;
mod double;
mod faults;
mod forced_reloads;
mod forwarding;
mod gateway;
mod heal;
mod limits;
mod migration_window;
mod monitoring;
mod resources;
mod safety;
mod sandbox;
mod sharing;
mod silent_writes;
mod standby;
mod supabase_stack;
mod tls;
mod type_changes;
