//! Errors of the policy runtime.

use std::path::PathBuf;

use super::PolicyKind;

/// Why a policy could not be loaded, validated, swapped or rolled back.
///
/// (A policy misbehaving during a call is not an error: the call is answered
/// by a fallback and the failure is counted, see [`super::CallFailure`].)
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("reading policy file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("not a WebAssembly module or component (bad magic number)")]
    NotWasm,
    #[error("turning the core module into a component (is it built with wit-bindgen against llumen:policy?): {0:#}")]
    Componentize(anyhow::Error),
    #[error("compiling the component: {0:#}")]
    Compile(wasmtime::Error),
    #[error("the component imports {}: policies cannot read files, the network or the clock (the only import a policy may have is llumen:policy/history@0.1.x)", imports.join(", "))]
    Sandbox { imports: Vec<String> },
    #[error("the component does not fit the host (it may import something other than llumen:policy/history, such as WASI): {0:#}")]
    Link(wasmtime::Error),
    #[error("not a llumen:policy component: it does not export llumen:policy/fleet@0.1.x: {0:#}")]
    NotAPolicy(wasmtime::Error),
    #[error("the component exports none of the dispatch, migration, priority or scaling interfaces of llumen:policy@0.1.x")]
    NoKinds,
    #[error("the component does not implement the {kind} world of llumen:policy: {source:#}")]
    WrongWorld {
        kind: PolicyKind,
        source: wasmtime::Error,
    },
    #[error("instantiating the component: {0:#}")]
    Instantiate(wasmtime::Error),
    #[error("trial {kind} call failed: {failure}")]
    Trial {
        kind: PolicyKind,
        failure: super::CallFailure,
    },
    #[error("policy {policy} refused its parameters: {message}")]
    Params { policy: String, message: String },
    #[error("no earlier {0} policy to roll back to")]
    NothingToRollBack(PolicyKind),
    #[error("{0}")]
    Unavailable(String),
}
