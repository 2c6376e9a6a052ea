//! The xDS side: the ADS client, what it accepted, the on-disk cache and
//! the config dump.

pub mod cache;
pub mod client;
pub mod dump;
pub mod state;
