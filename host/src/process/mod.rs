//! Assembling and running a process: `llumen serve`, `llumen instance
//! --join`, the served model, the host's thread hints and its clock.
//!
//! - [`serve`]: `llumen serve`, a manager with N in-process instances, the
//!   sled store, the policy runtime, the QUIC and HTTP endpoints.
//! - [`instance`]: `llumen instance --join`, one instance in its own
//!   process (the instance side of the join protocol).
//! - [`model`]: model selection and loading, the per-instance backend and
//!   limits, starting a llumlet over the right backend, the text codec.
//! - [`threads`]: scheduling hints for the host's own threads.
//! - [`clock`]: the host's one clock.
//!
//! Owns start-up and shutdown order, the serve configuration, loading the
//! model once per process, and the instance side of the join protocol.
//! Process is the only layer that assembles the others: it creates the
//! manager, the admin API, the migration transport and the serving
//! endpoints and starts the front ends; llumlets are spawned only by
//! [`model`] (for `llumen serve` through the manager's
//! [`LocalFactory`](crate::control::manager::LocalFactory), which [`serve`]
//! builds). Must never hold serving logic of its own, never decide where a
//! request goes (the manager does) nor what a policy decides, and never
//! drive an engine (the llumlet does). [`clock`], [`threads`] and the text
//! codec of [`model`] are leaf utilities the other layers use.

pub mod clock;
pub mod instance;
pub mod model;
pub mod serve;
pub mod threads;
