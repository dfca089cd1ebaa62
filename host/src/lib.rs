//! llumen's runtime: the Wasm policy runtime today; the llumlets, the global
//! scheduler, the QUIC endpoints and the `llumen` binary build on it.
//!
//! `llumen-host` owns everything that ties the engine and the store to the
//! outside world. It must never reach into an engine's internals (only its
//! public step/load API) nor let a policy touch anything but the values the
//! runtime hands it.

pub mod policy;
