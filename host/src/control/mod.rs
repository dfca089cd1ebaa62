//! The control plane: the global scheduler and the instances' agents, the
//! shells that run the fleet core's pure state machines with threads,
//! channels and the wall clock.
//!
//! - [`manager`]: the global scheduler and the request relays. It carries
//!   out the fleet core's `Controller` decisions (placement, the migration
//!   and scaling rounds, which instances exist and in what phase); it never
//!   makes them itself.
//! - [`llumlet`]: one instance's agent, a thread + channels shell over the
//!   fleet core's `InstanceCore`.
//! - [`shadow`]: shadow policies beside the active ones; a candidate never
//!   decides anything.
//! - [`metrics`]: the Prometheus registry the control plane writes. The
//!   manager renders it as its [`Serving::metrics_text`], which the HTTP
//!   front end serves on `GET /metrics`.
//!
//! Owns request ids, the relays, the instance table and the links to the
//! fleet ([`manager::InstanceLink`]), the route book a migrated request's
//! stream follows, the round timers, and feeding snapshots to sled and
//! metrics.
//!
//! Must never touch sockets or parse or encode bytes from the network:
//! wire formats and streams are [`crate::transport`]'s (the manager only
//! holds the migration transport and hands it to the links; the llumlet's
//! migration messages leave as encoded bytes through its links). Must never
//! reach an engine except through its public step/load API (inside the
//! fleet core), policies except through the `Controller` asking
//! [`RuntimeDecide`], nor sled except through `llumen-store`. Of
//! [`crate::process`] it uses only the leaf utilities (the clock, the
//! thread hints, the model's text codec); it never assembles anything:
//! in-process instances are started through the [`manager::LocalFactory`]
//! that `llumen serve` hands the manager.
//!
//! [`Serving::metrics_text`]: crate::front::api::Serving::metrics_text
//! [`RuntimeDecide`]: crate::policy::RuntimeDecide

pub mod llumlet;
pub mod manager;
pub mod metrics;
pub mod shadow;
