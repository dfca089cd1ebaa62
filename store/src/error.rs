//! Errors of the store: one [`StoreError`] for every operation, carrying the
//! tree and key involved, and [`DecodeError`] for bytes that do not parse.
//! Owns no state; never touches the network, Wasm or the engine.

use std::fmt;

/// Why a stored value (or key) could not be decoded. Decoders return this
/// instead of panicking, whatever the bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty value (no version byte)")]
    Empty,
    #[error("unknown encoding version {0}")]
    UnknownVersion(u8),
    #[error("wrong length: expected {expected} bytes, got {actual}")]
    WrongLength { expected: usize, actual: usize },
    #[error("truncated while reading {what}")]
    Truncated { what: &'static str },
    #[error("{0} trailing bytes after the last field")]
    TrailingBytes(usize),
    #[error("invalid boolean byte {0}")]
    InvalidBool(u8),
    #[error("{what} is not valid UTF-8")]
    InvalidUtf8 { what: &'static str },
    #[error("unknown {what} tag {tag}")]
    UnknownTag { what: &'static str, tag: u8 },
    #[error("{0}")]
    Invalid(&'static str),
}

/// Key bytes shown as hex (printable ASCII keys are shown as text).
#[derive(Clone, PartialEq, Eq)]
pub struct KeyDisplay(pub Vec<u8>);

impl fmt::Display for KeyDisplay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.0.is_empty() && self.0.iter().all(|b| b.is_ascii_graphic()) {
            return write!(f, "{}", String::from_utf8_lossy(&self.0));
        }
        f.write_str("0x")?;
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for KeyDisplay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Boxed error of a storage backend (sled today), kept opaque so that
/// changing the backend does not change this type.
pub type BackendError = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("opening store at {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: BackendError,
    },
    #[error("backend failed to {op} on tree `{tree}`: {source}")]
    Backend {
        tree: &'static str,
        op: &'static str,
        #[source]
        source: BackendError,
    },
    #[error("corrupt value in tree `{tree}` at key {key}: {source}")]
    Corrupt {
        tree: &'static str,
        key: KeyDisplay,
        #[source]
        source: DecodeError,
    },
    #[error("invalid policy sha256 {0:?}: expected 64 lowercase hex digits")]
    InvalidSha(String),
    #[error("invalid policy kind {0:?}: expected 1..=64 printable ASCII characters")]
    InvalidKind(String),
    #[error("policy {0} is not registered")]
    UnknownPolicy(String),
    #[error("invalid bench name {0:?}: expected 1..=256 bytes without control characters")]
    InvalidBenchName(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;
