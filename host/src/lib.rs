//! llumen's runtime: the Wasm policy runtime, the llumlets, the global
//! scheduler (the manager), the QUIC and HTTP front ends, the Rust client
//! and the `llumen` binary.
//!
//! `llumen-host` owns everything that ties the engine and the store to the
//! outside world. It must never reach into an engine's internals (only its
//! public step/load API) nor let a policy touch anything but the values the
//! runtime hands it.
//!
//! Grouped by layer: [`control`] (the manager, the llumlets, shadows,
//! metrics), [`transport`] (bytes on the wire), [`front`] (the front ends
//! and the serving API they speak), [`process`] (assembling and running a
//! process) and [`policy`] (the policy runtime).

pub mod control;
pub mod front;
pub mod policy;
pub mod process;
pub mod transport;
