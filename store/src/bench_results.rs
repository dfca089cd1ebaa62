//! Benchmark results: JSON documents filed under a bench name and the time
//! the run finished. Keys are name ++ 0x00 ++ at_us (big-endian), so one
//! name's results are contiguous and time-ordered; a second result with the
//! same name and time replaces the first (retrying a put is harmless). The
//! JSON is opaque text here (only UTF-8 is checked). Every write is flushed
//! to disk before it returns. Never touches the network, Wasm or the engine.

use crate::backend::{KvBackend, Op, Tree};
use crate::codec;
use crate::error::{DecodeError, KeyDisplay, Result, StoreError};
use crate::Store;

/// Longest bench name, in bytes.
pub const MAX_BENCH_NAME_LEN: usize = 256;

/// Names are 1..=[`MAX_BENCH_NAME_LEN`] bytes without control characters
/// (so never 0x00, the key separator).
fn check_name(name: &str) -> Result<()> {
    let ok = (1..=MAX_BENCH_NAME_LEN).contains(&name.len()) && !name.chars().any(char::is_control);
    if ok {
        Ok(())
    } else {
        Err(StoreError::InvalidBenchName(name.to_owned()))
    }
}

fn corrupt(key: &[u8], source: DecodeError) -> StoreError {
    StoreError::Corrupt {
        tree: Tree::BenchResults.name(),
        key: KeyDisplay(key.to_vec()),
        source,
    }
}

/// `[name ++ 0x00, name ++ 0x01)`: exactly the keys of `name`.
fn name_range(name: &str) -> (Vec<u8>, Vec<u8>) {
    let from = [name.as_bytes(), &[0]].concat();
    let to = [name.as_bytes(), &[1]].concat();
    (from, to)
}

impl<B: KvBackend> Store<B> {
    /// Files `json` under `name` at `at_us`, replacing any result with the
    /// same name and time. Durable on return.
    pub fn put_bench_result(&self, name: &str, at_us: u64, json: &str) -> Result<()> {
        check_name(name)?;
        let op = Op::Insert(
            codec::bench_key(name, at_us),
            codec::encode_bench_result(json),
        );
        self.backend.apply(Tree::BenchResults, vec![op])?;
        self.backend.flush()
    }

    /// Every result filed under `name` as (at_us, json), oldest first.
    pub fn bench_results(&self, name: &str) -> Result<Vec<(u64, String)>> {
        check_name(name)?;
        let (from, to) = name_range(name);
        let mut out = Vec::new();
        self.backend
            .scan(Tree::BenchResults, &from, Some(&to), false, &mut |k, v| {
                let (stored, at_us) = codec::parse_bench_key(k).map_err(|e| corrupt(k, e))?;
                if stored != name {
                    return Err(corrupt(
                        k,
                        DecodeError::Invalid("key outside its name's range"),
                    ));
                }
                let json = codec::decode_bench_result(v).map_err(|e| corrupt(k, e))?;
                out.push((at_us, json));
                Ok(true)
            })?;
        Ok(out)
    }

    /// Every name with at least one result, in byte order.
    pub fn bench_names(&self) -> Result<Vec<String>> {
        let mut names: Vec<String> = Vec::new();
        // Seek from name to name: one short scan per name.
        let mut next = Some(Vec::new());
        while let Some(from) = next.take() {
            self.backend
                .scan(Tree::BenchResults, &from, None, false, &mut |k, _| {
                    let (name, _) = codec::parse_bench_key(k).map_err(|e| corrupt(k, e))?;
                    next = Some(name_range(name).1);
                    names.push(name.to_owned());
                    Ok(false)
                })?;
        }
        Ok(names)
    }
}
