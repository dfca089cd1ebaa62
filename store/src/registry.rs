//! The policy registry: every uploaded component by sha256 with its
//! metadata, the active version of each policy kind, and the versions it
//! replaced (for rollback). Layout: tree `policies` holds `m/<sha>` (encoded
//! [`PolicyMeta`]) and `w/<sha>` (component bytes), written in one batch;
//! tree `active` holds one [`ActiveRecord`] per kind, so active and history
//! change in one atomic write. Every write is flushed to disk before it
//! returns. Components are opaque bytes here: this module never compiles or
//! runs Wasm, and never touches the network or the engine. The caller
//! computes the sha256; the store checks only its shape.

use crate::backend::{KvBackend, Op, Tree};
use crate::codec::{self, ActiveRecord, PolicyMeta};
use crate::error::{DecodeError, KeyDisplay, Result, StoreError};
use crate::Store;

/// Previously active versions kept per kind; older ones are forgotten.
pub const MAX_HISTORY: usize = 64;

/// A registered component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPolicy {
    pub sha256: String,
    pub meta: PolicyMeta,
    pub wasm: Vec<u8>,
}

fn check_sha(sha: &str) -> Result<()> {
    let ok = sha.len() == 64
        && sha
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if ok {
        Ok(())
    } else {
        Err(StoreError::InvalidSha(sha.to_owned()))
    }
}

fn check_kind(kind: &str) -> Result<()> {
    let ok = (1..=64).contains(&kind.len()) && kind.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(())
    } else {
        Err(StoreError::InvalidKind(kind.to_owned()))
    }
}

fn key(prefix: &[u8; 2], sha: &str) -> Vec<u8> {
    [&prefix[..], sha.as_bytes()].concat()
}

fn corrupt(tree: Tree, key: &[u8], source: DecodeError) -> StoreError {
    StoreError::Corrupt {
        tree: tree.name(),
        key: KeyDisplay(key.to_vec()),
        source,
    }
}

impl<B: KvBackend> Store<B> {
    /// Registers (or re-registers) a component under its sha256; durable on
    /// return.
    pub fn put_policy(&self, sha256: &str, wasm: &[u8], meta: &PolicyMeta) -> Result<()> {
        check_sha(sha256)?;
        meta.kinds.iter().try_for_each(|k| check_kind(k))?;
        let ops = vec![
            Op::Insert(key(b"w/", sha256), wasm.to_vec()),
            Op::Insert(key(b"m/", sha256), codec::encode_meta(meta)),
        ];
        self.backend.apply(Tree::Policies, ops)?;
        self.backend.flush()
    }

    /// Metadata of a registered component, without its bytes.
    pub fn policy_meta(&self, sha256: &str) -> Result<Option<PolicyMeta>> {
        check_sha(sha256)?;
        let k = key(b"m/", sha256);
        let Some(b) = self.backend.get(Tree::Policies, &k)? else {
            return Ok(None);
        };
        codec::decode_meta(&b)
            .map(Some)
            .map_err(|e| corrupt(Tree::Policies, &k, e))
    }

    pub fn get_policy(&self, sha256: &str) -> Result<Option<StoredPolicy>> {
        let Some(meta) = self.policy_meta(sha256)? else {
            return Ok(None);
        };
        let k = key(b"w/", sha256);
        let wasm = self.backend.get(Tree::Policies, &k)?;
        let wasm = wasm.ok_or_else(|| {
            corrupt(
                Tree::Policies,
                &k,
                DecodeError::Invalid("metadata without component bytes"),
            )
        })?;
        Ok(Some(StoredPolicy {
            sha256: sha256.to_owned(),
            meta,
            wasm,
        }))
    }

    /// Every registered component's sha256 and metadata, oldest install
    /// first (ties by sha).
    pub fn list_policies(&self) -> Result<Vec<(String, PolicyMeta)>> {
        let mut out = Vec::new();
        // "m0" is the first key past every "m/…" key ('0' follows '/').
        self.backend
            .scan(Tree::Policies, b"m/", Some(b"m0"), false, &mut |k, v| {
                let meta = codec::decode_meta(v).map_err(|e| corrupt(Tree::Policies, k, e))?;
                let sha = std::str::from_utf8(&k[2..]).map_err(|_| {
                    corrupt(
                        Tree::Policies,
                        k,
                        DecodeError::InvalidUtf8 { what: "sha256 key" },
                    )
                })?;
                out.push((sha.to_owned(), meta));
                Ok(true)
            })?;
        out.sort_by(|a, b| (a.1.installed_at_us, &a.0).cmp(&(b.1.installed_at_us, &b.0)));
        Ok(out)
    }

    fn active_record(&self, kind: &str) -> Result<Option<ActiveRecord>> {
        check_kind(kind)?;
        let Some(b) = self.backend.get(Tree::Active, kind.as_bytes())? else {
            return Ok(None);
        };
        codec::decode_active(&b)
            .map(Some)
            .map_err(|e| corrupt(Tree::Active, kind.as_bytes(), e))
    }

    fn write_active(&self, kind: &str, record: &ActiveRecord) -> Result<()> {
        let op = Op::Insert(kind.as_bytes().to_vec(), codec::encode_active(record));
        self.backend.apply(Tree::Active, vec![op])?;
        self.backend.flush()
    }

    /// Makes the version `sha256` of a registered component the active
    /// `kind` policy and pushes the previous one onto the kind's history (at
    /// most [`MAX_HISTORY`] kept). Returns the previous one. Setting the
    /// version already active changes nothing. Durable on return.
    ///
    /// A version is the component's sha256, optionally followed by `?` and
    /// the parameters it is configured with (opaque here: the admin layer
    /// writes and reads them); the component itself must be registered.
    pub fn set_active(&self, kind: &str, sha256: &str) -> Result<Option<String>> {
        check_kind(kind)?;
        let component = sha256.split_once('?').map_or(sha256, |(sha, _)| sha);
        if self.policy_meta(component)?.is_none() {
            return Err(StoreError::UnknownPolicy(component.to_owned()));
        }
        let _guard = self.registry_lock.lock().unwrap_or_else(|e| e.into_inner());
        let record = match self.active_record(kind)? {
            Some(r) if r.active == sha256 => return Ok(Some(r.active)),
            Some(ActiveRecord {
                active,
                mut history,
            }) => {
                history.push(active.clone());
                let excess = history.len().saturating_sub(MAX_HISTORY);
                history.drain(..excess);
                self.write_active(
                    kind,
                    &ActiveRecord {
                        active: sha256.to_owned(),
                        history,
                    },
                )?;
                return Ok(Some(active));
            }
            None => ActiveRecord {
                active: sha256.to_owned(),
                history: Vec::new(),
            },
        };
        self.write_active(kind, &record)?;
        Ok(None)
    }

    /// The active `kind` policy's sha256.
    pub fn active(&self, kind: &str) -> Result<Option<String>> {
        Ok(self.active_record(kind)?.map(|r| r.active))
    }

    /// Versions `kind` had before the active one, newest last.
    pub fn history(&self, kind: &str) -> Result<Vec<String>> {
        Ok(self
            .active_record(kind)?
            .map(|r| r.history)
            .unwrap_or_default())
    }

    /// Every kind with an active policy and its sha256, by kind.
    pub fn actives(&self) -> Result<Vec<(String, String)>> {
        let mut out = Vec::new();
        self.backend
            .scan(Tree::Active, b"", None, false, &mut |k, v| {
                let r = codec::decode_active(v).map_err(|e| corrupt(Tree::Active, k, e))?;
                out.push((String::from_utf8_lossy(k).into_owned(), r.active));
                Ok(true)
            })?;
        Ok(out)
    }

    /// Pops the newest history entry and makes it active; the version it
    /// replaces is dropped (not pushed), so repeated rollbacks walk back.
    /// Returns the new active sha256, or `None` (nothing changed) when the
    /// history is empty. Durable on return.
    pub fn rollback(&self, kind: &str) -> Result<Option<String>> {
        let _guard = self.registry_lock.lock().unwrap_or_else(|e| e.into_inner());
        let Some(mut record) = self.active_record(kind)? else {
            return Ok(None);
        };
        let Some(previous) = record.history.pop() else {
            return Ok(None);
        };
        record.active = previous.clone();
        self.write_active(kind, &record)?;
        Ok(Some(previous))
    }
}
