//! llumen's runtime: the Wasm policy runtime, the llumlets, the global
//! scheduler (the manager), the QUIC and HTTP front ends, the Rust client
//! and the `llumen` binary.
//!
//! `llumen-host` owns everything that ties the engine and the store to the
//! outside world. It must never reach into an engine's internals (only its
//! public step/load API) nor let a policy touch anything but the values the
//! runtime hands it.

pub mod admin;
pub mod api;
pub mod client;
pub mod clock;
pub mod http;
pub mod instance;
pub mod llumlet;
pub mod manager;
pub mod metrics;
pub mod migration;
pub mod model;
pub mod policy;
pub mod protocol;
pub mod serve;
pub mod server;
pub mod shadow;
pub mod threads;
pub mod tls;
pub mod wire;
