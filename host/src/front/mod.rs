//! Front ends and the serving API they speak: the `llumen/1` QUIC endpoint,
//! the OpenAI-compatible HTTP front end (and `/metrics`), the admin API and
//! the Rust client.
//!
//! - [`api`]: the serving API, plain data and the [`api::Serving`] trait
//!   (what a generate request is, what comes back, the typed errors).
//! - [`server`]: the manager's QUIC endpoint (client request streams, admin
//!   streams, joining instances), [`server::RemoteLink`] (the manager's side
//!   of a joined instance) and [`server::serve_manager_stream`] (the
//!   instance side of the streams the manager opens).
//! - [`http`]: OpenAI HTTP, `/metrics`, `/health`.
//! - [`admin`]: the admin commands (policy registry operations, status).
//! - [`client`]: the Rust client of the QUIC API.
//!
//! Owns the translation between the outside world's requests and the
//! serving API. Must never decide anything the manager or a policy decides,
//! never tokenize or touch an engine, and never encode or decode frames
//! itself (the codec in [`crate::transport::protocol`] does).
//!
//! How each front end reaches the manager: the HTTP front end only through
//! an `Arc<dyn Serving>` (`/metrics` included, through
//! [`api::Serving::metrics_text`]); the client only through frames on its
//! connection. The others use [`Manager`] directly: the QUIC endpoint's
//! [`server::ServerContext`] holds a `Manager` (generate streams go through
//! its [`api::Serving`] methods, but joining instances, `Resume` and
//! `Migrate` streams call `Manager` methods of its own: registering and
//! removing instances, the load sink, the route book, local mailboxes),
//! [`server::RemoteLink`] implements [`InstanceLink`] and speaks the
//! llumlet's event types; the admin API ([`admin::Admin`]) holds a
//! `Manager` for the policy runtime, the store, shadows, status, on-demand
//! migrations and flushing.
//!
//! [`Manager`]: crate::control::manager::Manager
//! [`InstanceLink`]: crate::control::manager::InstanceLink

pub mod admin;
pub mod api;
pub mod client;
pub mod http;
pub mod server;
