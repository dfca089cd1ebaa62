//! Bytes on the wire: the `llumen/1` frame codec, the async shell that
//! moves frames over quinn streams, the QUIC transport of live migration
//! and the TLS identity, admin token and endpoint configs.
//!
//! - [`protocol`]: the pure frame codec (no I/O, no clock).
//! - [`wire`]: reading and writing frames on quinn streams.
//! - [`migration`]: one QUIC stream per live migration, the chunking of
//!   large messages.
//! - [`tls`]: certificate, key and token files, pinned-certificate trust,
//!   QUIC endpoint configs.
//!
//! Owns byte formats, streams and endpoint configuration only. Must never
//! interpret what it carries: migration messages are moved, never read (the
//! migration protocol is the engine's state machine, run by the llumlets in
//! [`crate::control`]), and it never makes a decision (placement, migration,
//! scaling, admin authorisation: [`tls::token_matches`] is only the
//! comparison). Must never touch an engine, policies or sled, nor keep any
//! request's state. What the frames mean belongs to the front ends
//! ([`crate::front`]) and to the instance side of the join protocol
//! ([`crate::process::instance`]); the codec's payloads are the plain data
//! of [`crate::front::api`] and the shared load types.

pub mod migration;
pub mod protocol;
pub mod tls;
pub mod wire;
