//! llumen-fleet: the fleet core. The instance's turn and the manager's
//! rounds as pure state machines, run alike by the server (llumlets and
//! manager), the simulator and the benchmarks.
//!
//! - [`instance`]: [`InstanceCore`], one instance's turn around its
//!   [`Engine`](llumen_engine::Engine) and its live migrations.
//! - [`controller`]: [`Controller`], the manager's decisions (placement,
//!   migration round, scaling round) against a [`Decide`] trait.
//! - [`synthetic`]: seeded plausible loads, requests and migration
//!   candidates for benchmarks and tests of decisions (not used by the two
//!   state machines).
//!
//! Style: quinn-proto's. Every state machine owns its state, takes time as
//! an argument and hands back what to do (messages to send, events) to be
//! polled; nothing here blocks, sleeps, spawns or reads a clock.
//!
//! **Never touches**: tokio, quinn, wasmtime, sled, threads, sockets,
//! files or the wall clock. It depends only on `llumen-engine` and
//! `llumen-policy-logic`.

pub mod controller;
pub mod instance;
pub mod synthetic;

pub use controller::*;
pub use instance::*;
