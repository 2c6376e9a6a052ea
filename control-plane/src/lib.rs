//! Portico's control plane.
//!
//! - [`model`]: the documents operators write, and their decoding.
//! - [`validate`]: every rule a desired state must keep.
//! - [`store`]: durable, numbered revisions (SQLite by default).
//! - [`state`]: the one writer — apply, delete, rollback — and the
//!   immutable snapshots readers share.
//! - [`auth`]: admin tokens.
//! - [`admin`]: the REST admin API the `portico` CLI talks to.
//! - [`server`]: wiring it all up for the `portico-cp` binary.
//!
//! The CLI links this library for the model and validation, so `portico
//! validate` applies exactly the server's rules offline.

pub mod admin;
pub mod auth;
pub mod metrics;
pub mod model;
pub mod problem;
pub mod server;
pub mod state;
pub mod store;
pub mod validate;
pub mod xds;
