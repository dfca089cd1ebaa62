//! The request journal: the manager's record of every request's life
//! (accepted, dispatched, finished), read back after a crash to find the
//! requests that were still in flight, and offline to replay dispatch
//! decisions. Keys are request ++ seq (big-endian; seq from
//! [`KvBackend::next_id`], unique and increasing across reopens), so one
//! request's events are contiguous and in journal order. Events join the
//! snapshot buffer (see [`Store::flush`]): they are visible to reads at once
//! and durable after the next flush. Reads merge the buffer with the
//! backend. Time ranges are half-open `[from_us, to_us)`. Never touches the
//! network, Wasm or the engine.

use crate::backend::{KvBackend, Op, Tree};
use crate::codec::{self, journal_key, JournalEvent, JournalKey};
use crate::error::{DecodeError, KeyDisplay, Result, StoreError};
use crate::Store;
use std::collections::BTreeMap;
use std::ops::Bound;

/// [`Store::retain_journal_since`] applies its removals in batches of about
/// this many ops (one request's events always go in the same batch).
const RETAIN_BATCH_OPS: usize = 1024;

/// One dispatch decision, as [`Store::dispatches_between`] returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatchRecord {
    pub request: u64,
    pub at_us: u64,
    pub instance: u32,
    /// Label of the policy that decided.
    pub decided_by: String,
}

fn corrupt(key: &[u8], source: DecodeError) -> StoreError {
    StoreError::Corrupt {
        tree: Tree::Journal.name(),
        key: KeyDisplay(key.to_vec()),
        source,
    }
}

/// Decodes one stored entry into (key, request, event).
fn decode_entry(key: &[u8], value: &[u8]) -> Result<(JournalKey, u64, JournalEvent)> {
    let (request, _) = codec::parse_journal_key(key).map_err(|e| corrupt(key, e))?;
    let event = codec::decode_journal_event(value).map_err(|e| corrupt(key, e))?;
    Ok((key.try_into().expect("length checked"), request, event))
}

fn request_of(key: &JournalKey) -> u64 {
    u64::from_be_bytes(key[..8].try_into().expect("8 bytes"))
}

/// First key past every key of `request` (None: end of the key space).
fn request_end(request: u64) -> Option<JournalKey> {
    request.checked_add(1).map(|next| journal_key(next, 0))
}

impl<B: KvBackend> Store<B> {
    /// Buffers one event of `request`; writes the buffer (shared with
    /// snapshots) when it reaches [`Store::batch_size`]. Visible to reads at
    /// once; durable after the next [`Store::flush`].
    pub fn journal(&self, request: u64, event: &JournalEvent) -> Result<()> {
        let seq = self.backend.next_id()?;
        let full = {
            let mut pending = self.pending();
            pending
                .journal
                .insert(journal_key(request, seq), event.clone());
            pending.len() >= self.batch_size
        };
        if full {
            self.flush()?;
        }
        Ok(())
    }

    /// Visits every event with a key in `[from, to)` (`None`: from the
    /// start, to the end, so that any malformed key is reported), buffered
    /// ones included, as (key, request, event). An event flushed during the
    /// call may be visited twice (never not at all): merged by key where
    /// that matters.
    fn visit_journal(
        &self,
        from: Option<JournalKey>,
        to: Option<JournalKey>,
        mut visit: impl FnMut(&JournalKey, u64, &JournalEvent),
    ) -> Result<()> {
        if let (Some(from), Some(to)) = (from, to) {
            if to <= from {
                return Ok(());
            }
        }
        // Buffer first, then backend (see `snapshots::collect`).
        {
            let pending = self.pending();
            let range = pending.journal.range((
                from.map_or(Bound::Unbounded, Bound::Included),
                to.map_or(Bound::Unbounded, Bound::Excluded),
            ));
            range.for_each(|(k, e)| visit(k, request_of(k), e));
        }
        self.backend.scan(
            Tree::Journal,
            from.as_ref().map_or(&[][..], |f| &f[..]),
            to.as_ref().map(|t| &t[..]),
            false,
            &mut |k, v| {
                let (key, request, event) = decode_entry(k, v)?;
                visit(&key, request, &event);
                Ok(true)
            },
        )
    }

    /// Every event of `request`, in journal order (empty if none).
    pub fn journal_events(&self, request: u64) -> Result<Vec<JournalEvent>> {
        let mut merged = BTreeMap::new();
        self.visit_journal(
            Some(journal_key(request, 0)),
            request_end(request),
            |k, _, e| {
                merged.insert(*k, e.clone());
            },
        )?;
        Ok(merged.into_values().collect())
    }

    /// Requests with an `Accepted` event and no `Finished` one, ascending:
    /// what recovery re-examines after a crash. Scans the whole journal.
    pub fn in_flight(&self) -> Result<Vec<u64>> {
        // request -> (accepted, finished); seeing an event twice is harmless.
        let mut state: BTreeMap<u64, (bool, bool)> = BTreeMap::new();
        self.visit_journal(None, None, |_, request, e| {
            let s = state.entry(request).or_default();
            match e {
                JournalEvent::Accepted { .. } => s.0 = true,
                JournalEvent::Finished { .. } => s.1 = true,
                JournalEvent::Dispatched { .. } => {}
            }
        })?;
        Ok(state
            .into_iter()
            .filter(|&(_, (accepted, finished))| accepted && !finished)
            .map(|(request, _)| request)
            .collect())
    }

    /// Every `Dispatched` event with `from_us <= at_us < to_us`, ordered by
    /// time, then request, then journal order. Scans the whole journal.
    pub fn dispatches_between(&self, from_us: u64, to_us: u64) -> Result<Vec<DispatchRecord>> {
        if from_us >= to_us {
            return Ok(Vec::new());
        }
        let mut found: BTreeMap<JournalKey, DispatchRecord> = BTreeMap::new();
        self.visit_journal(None, None, |k, request, e| {
            if let JournalEvent::Dispatched {
                at_us,
                instance,
                decided_by,
            } = e
            {
                if (from_us..to_us).contains(at_us) {
                    found.insert(
                        *k,
                        DispatchRecord {
                            request,
                            at_us: *at_us,
                            instance: *instance,
                            decided_by: decided_by.clone(),
                        },
                    );
                }
            }
        })?;
        let mut out: Vec<(JournalKey, DispatchRecord)> = found.into_iter().collect();
        out.sort_by_key(|(k, d)| (d.at_us, *k));
        Ok(out.into_iter().map(|(_, d)| d).collect())
    }

    /// Removes every event of each request whose (latest) `Finished` event
    /// has `at_us < cutoff_us`; requests without one are kept. Returns how
    /// many requests were removed. Flushes the buffer first; a request's
    /// events are removed in one atomic batch.
    pub fn retain_journal_since(&self, cutoff_us: u64) -> Result<usize> {
        self.flush()?;
        // Keys of the request being scanned and its latest Finished time.
        let mut current: Option<(u64, Vec<Vec<u8>>, Option<u64>)> = None;
        let mut doomed: Vec<Vec<Vec<u8>>> = Vec::new();
        let mut close = |cur: Option<(u64, Vec<Vec<u8>>, Option<u64>)>| {
            if let Some((_, keys, Some(finished))) = cur {
                if finished < cutoff_us {
                    doomed.push(keys);
                }
            }
        };
        self.backend
            .scan(Tree::Journal, &[], None, false, &mut |k, v| {
                let (_, request, event) = decode_entry(k, v)?;
                if current.as_ref().is_none_or(|c| c.0 != request) {
                    close(current.take());
                    current = Some((request, Vec::new(), None));
                }
                let cur = current.as_mut().expect("set above");
                cur.1.push(k.to_vec());
                if let JournalEvent::Finished { at_us, .. } = event {
                    cur.2 = Some(cur.2.map_or(at_us, |f| f.max(at_us)));
                }
                Ok(true)
            })?;
        close(current);
        let removed = doomed.len();
        let mut ops = Vec::new();
        for keys in doomed {
            ops.extend(keys.into_iter().map(Op::Remove));
            if ops.len() >= RETAIN_BATCH_OPS {
                self.backend
                    .apply(Tree::Journal, std::mem::take(&mut ops))?;
            }
        }
        if !ops.is_empty() {
            self.backend.apply(Tree::Journal, ops)?;
        }
        self.backend.flush()?;
        Ok(removed)
    }
}
