//! Byte formats of everything the store writes: snapshot keys and values,
//! policy metadata, the per-kind active/history record, request-journal keys
//! and events, and bench-result keys and values. Every format
//! starts with a version byte and is little-endian; keys are big-endian so
//! that byte order is time order. Decoders never panic: any malformed input
//! gives a [`DecodeError`]. Pure functions; never touches storage, the
//! network, Wasm or the engine.

use crate::error::DecodeError;
use llumen_policy_logic::InstanceLoad;

/// Version byte of [`encode_snapshot`]'s format.
pub const SNAPSHOT_V1: u8 = 1;
/// Length of an encoded snapshot: version, instance, timestamp, 14 u32
/// counters, draining flag.
pub const SNAPSHOT_LEN: usize = 1 + 4 + 8 + 14 * 4 + 1;
/// Length of a snapshot key: instance (BE u32) ++ timestamp_us (BE u64) ++
/// sequence (BE u64).
pub const SNAPSHOT_KEY_LEN: usize = 4 + 8 + 8;
/// Version byte of policy metadata and active records.
pub const META_V1: u8 = 1;
/// Version byte of [`encode_journal_event`]'s format.
pub const JOURNAL_V1: u8 = 1;
/// Length of a journal key: request (BE u64) ++ sequence (BE u64).
pub const JOURNAL_KEY_LEN: usize = 8 + 8;
/// Version byte of [`encode_bench_result`]'s format.
pub const BENCH_V1: u8 = 1;

pub type SnapshotKey = [u8; SNAPSHOT_KEY_LEN];
pub type JournalKey = [u8; JOURNAL_KEY_LEN];

pub fn snapshot_key(instance: u32, timestamp_us: u64, seq: u64) -> SnapshotKey {
    let mut k = [0u8; SNAPSHOT_KEY_LEN];
    k[..4].copy_from_slice(&instance.to_be_bytes());
    k[4..12].copy_from_slice(&timestamp_us.to_be_bytes());
    k[12..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// Splits a snapshot key into (instance, timestamp_us, seq).
pub fn parse_snapshot_key(key: &[u8]) -> Result<(u32, u64, u64), DecodeError> {
    let k: &SnapshotKey = key.try_into().map_err(|_| DecodeError::WrongLength {
        expected: SNAPSHOT_KEY_LEN,
        actual: key.len(),
    })?;
    let inst = u32::from_be_bytes([k[0], k[1], k[2], k[3]]);
    let ts = u64::from_be_bytes(k[4..12].try_into().expect("8 bytes"));
    let seq = u64::from_be_bytes(k[12..].try_into().expect("8 bytes"));
    Ok((inst, ts, seq))
}

fn snapshot_u32s(s: &InstanceLoad) -> [u32; 14] {
    [
        s.block_size,
        s.total_blocks,
        s.used_blocks,
        s.watermark_blocks,
        s.running,
        s.waiting,
        s.preempted,
        s.head_of_line_demand_blocks,
        s.waiting_demand_blocks,
        s.high_priority_requests,
        s.headroom_blocks,
        s.migrating_out,
        s.migrating_in,
        s.step_latency_us,
    ]
}

pub fn encode_snapshot(s: &InstanceLoad) -> [u8; SNAPSHOT_LEN] {
    let mut out = [0u8; SNAPSHOT_LEN];
    out[0] = SNAPSHOT_V1;
    out[1..5].copy_from_slice(&s.instance.to_le_bytes());
    out[5..13].copy_from_slice(&s.timestamp_us.to_le_bytes());
    for (i, v) in snapshot_u32s(s).iter().enumerate() {
        out[13 + 4 * i..17 + 4 * i].copy_from_slice(&v.to_le_bytes());
    }
    out[SNAPSHOT_LEN - 1] = u8::from(s.draining);
    out
}

pub fn decode_snapshot(b: &[u8]) -> Result<InstanceLoad, DecodeError> {
    let version = *b.first().ok_or(DecodeError::Empty)?;
    if version != SNAPSHOT_V1 {
        return Err(DecodeError::UnknownVersion(version));
    }
    if b.len() != SNAPSHOT_LEN {
        return Err(DecodeError::WrongLength {
            expected: SNAPSHOT_LEN,
            actual: b.len(),
        });
    }
    let u = |i: usize| u32::from_le_bytes(b[13 + 4 * i..17 + 4 * i].try_into().expect("4 bytes"));
    let draining = match b[SNAPSHOT_LEN - 1] {
        0 => false,
        1 => true,
        x => return Err(DecodeError::InvalidBool(x)),
    };
    Ok(InstanceLoad {
        instance: u32::from_le_bytes(b[1..5].try_into().expect("4 bytes")),
        timestamp_us: u64::from_le_bytes(b[5..13].try_into().expect("8 bytes")),
        block_size: u(0),
        total_blocks: u(1),
        used_blocks: u(2),
        watermark_blocks: u(3),
        running: u(4),
        waiting: u(5),
        preempted: u(6),
        head_of_line_demand_blocks: u(7),
        waiting_demand_blocks: u(8),
        high_priority_requests: u(9),
        headroom_blocks: u(10),
        migrating_out: u(11),
        migrating_in: u(12),
        step_latency_us: u(13),
        draining,
    })
}

/// Metadata recorded with every registered policy component.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PolicyMeta {
    pub name: String,
    pub version: String,
    /// Policy kinds the component implements ("dispatch", "migration", …).
    pub kinds: Vec<String>,
    pub installed_at_us: u64,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let len = u32::try_from(s.len()).expect("string longer than 4 GiB");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Bounds-checked reader over a byte slice.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Truncated { what });
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(
            self.take(4, what)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(
            self.take(8, what)?.try_into().expect("8 bytes"),
        ))
    }
    fn string(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let len = self.u32(what)? as usize;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::InvalidUtf8 { what })
    }
    fn version(&mut self, expected: u8) -> Result<(), DecodeError> {
        match self.0.first() {
            None => Err(DecodeError::Empty),
            Some(&v) if v == expected => {
                self.0 = &self.0[1..];
                Ok(())
            }
            Some(&v) => Err(DecodeError::UnknownVersion(v)),
        }
    }
    fn finish(self) -> Result<(), DecodeError> {
        match self.0.len() {
            0 => Ok(()),
            n => Err(DecodeError::TrailingBytes(n)),
        }
    }
}

/// version u8 ++ installed_at_us u64 ++ name ++ version ++ kind count u32 ++
/// kinds; strings are u32 length ++ UTF-8 bytes.
pub fn encode_meta(m: &PolicyMeta) -> Vec<u8> {
    let mut out = vec![META_V1];
    out.extend_from_slice(&m.installed_at_us.to_le_bytes());
    put_str(&mut out, &m.name);
    put_str(&mut out, &m.version);
    out.extend_from_slice(&(m.kinds.len() as u32).to_le_bytes());
    m.kinds.iter().for_each(|k| put_str(&mut out, k));
    out
}

pub fn decode_meta(b: &[u8]) -> Result<PolicyMeta, DecodeError> {
    let mut r = Reader(b);
    r.version(META_V1)?;
    let installed_at_us = r.u64("installed_at_us")?;
    let name = r.string("name")?;
    let version = r.string("version")?;
    let n = r.u32("kind count")? as usize;
    // Each kind needs at least its 4-byte length: bound the allocation.
    if n > r.0.len() / 4 {
        return Err(DecodeError::Truncated { what: "kinds" });
    }
    let kinds = (0..n)
        .map(|_| r.string("kind"))
        .collect::<Result<Vec<_>, _>>()?;
    r.finish()?;
    Ok(PolicyMeta {
        name,
        version,
        kinds,
        installed_at_us,
    })
}

/// The active version of one policy kind and the versions it replaced.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ActiveRecord {
    pub active: String,
    /// Previously active versions, oldest first.
    pub history: Vec<String>,
}

/// version u8 ++ active ++ history count u32 ++ history (strings as in
/// [`encode_meta`]).
pub fn encode_active(a: &ActiveRecord) -> Vec<u8> {
    let mut out = vec![META_V1];
    put_str(&mut out, &a.active);
    out.extend_from_slice(&(a.history.len() as u32).to_le_bytes());
    a.history.iter().for_each(|s| put_str(&mut out, s));
    out
}

pub fn decode_active(b: &[u8]) -> Result<ActiveRecord, DecodeError> {
    let mut r = Reader(b);
    r.version(META_V1)?;
    let active = r.string("active")?;
    let n = r.u32("history count")? as usize;
    if n > r.0.len() / 4 {
        return Err(DecodeError::Truncated { what: "history" });
    }
    let history = (0..n)
        .map(|_| r.string("history entry"))
        .collect::<Result<Vec<_>, _>>()?;
    r.finish()?;
    Ok(ActiveRecord { active, history })
}

/// How a journaled request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JournalOutcome {
    /// Hit `max_tokens`.
    Length,
    /// Produced a stop token or sequence.
    Stop,
    /// Cancelled by the client or the manager.
    Cancelled,
    /// Failed (instance lost, engine error, …).
    Failed,
}

impl JournalOutcome {
    pub const ALL: [JournalOutcome; 4] = [
        JournalOutcome::Length,
        JournalOutcome::Stop,
        JournalOutcome::Cancelled,
        JournalOutcome::Failed,
    ];

    fn tag(self) -> u8 {
        match self {
            JournalOutcome::Length => 0,
            JournalOutcome::Stop => 1,
            JournalOutcome::Cancelled => 2,
            JournalOutcome::Failed => 3,
        }
    }

    fn from_tag(tag: u8) -> Result<Self, DecodeError> {
        Self::ALL
            .into_iter()
            .find(|o| o.tag() == tag)
            .ok_or(DecodeError::UnknownTag {
                what: "journal outcome",
                tag,
            })
    }
}

/// One event in a request's life, as the manager journals it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JournalEvent {
    /// The manager accepted the request.
    Accepted {
        at_us: u64,
        prompt_tokens: u32,
        max_tokens: u32,
        priority: u8,
    },
    /// The request was sent to `instance`; `decided_by` labels the policy
    /// that chose it.
    Dispatched {
        at_us: u64,
        instance: u32,
        decided_by: String,
    },
    /// The request ended.
    Finished {
        at_us: u64,
        completion_tokens: u32,
        outcome: JournalOutcome,
    },
}

impl JournalEvent {
    /// When the event happened (microseconds, caller's clock).
    pub fn at_us(&self) -> u64 {
        match *self {
            JournalEvent::Accepted { at_us, .. }
            | JournalEvent::Dispatched { at_us, .. }
            | JournalEvent::Finished { at_us, .. } => at_us,
        }
    }

    fn tag(&self) -> u8 {
        match self {
            JournalEvent::Accepted { .. } => 0,
            JournalEvent::Dispatched { .. } => 1,
            JournalEvent::Finished { .. } => 2,
        }
    }
}

pub fn journal_key(request: u64, seq: u64) -> JournalKey {
    let mut k = [0u8; JOURNAL_KEY_LEN];
    k[..8].copy_from_slice(&request.to_be_bytes());
    k[8..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// Splits a journal key into (request, seq).
pub fn parse_journal_key(key: &[u8]) -> Result<(u64, u64), DecodeError> {
    let k: &JournalKey = key.try_into().map_err(|_| DecodeError::WrongLength {
        expected: JOURNAL_KEY_LEN,
        actual: key.len(),
    })?;
    let request = u64::from_be_bytes(k[..8].try_into().expect("8 bytes"));
    let seq = u64::from_be_bytes(k[8..].try_into().expect("8 bytes"));
    Ok((request, seq))
}

/// version u8 ++ tag u8 ++ at_us u64 ++ then by tag:
/// 0 Accepted: prompt_tokens u32 ++ max_tokens u32 ++ priority u8;
/// 1 Dispatched: instance u32 ++ decided_by (string as in [`encode_meta`]);
/// 2 Finished: completion_tokens u32 ++ outcome u8
/// (0 Length, 1 Stop, 2 Cancelled, 3 Failed).
pub fn encode_journal_event(e: &JournalEvent) -> Vec<u8> {
    let mut out = vec![JOURNAL_V1, e.tag()];
    out.extend_from_slice(&e.at_us().to_le_bytes());
    match e {
        JournalEvent::Accepted {
            prompt_tokens,
            max_tokens,
            priority,
            ..
        } => {
            out.extend_from_slice(&prompt_tokens.to_le_bytes());
            out.extend_from_slice(&max_tokens.to_le_bytes());
            out.push(*priority);
        }
        JournalEvent::Dispatched {
            instance,
            decided_by,
            ..
        } => {
            out.extend_from_slice(&instance.to_le_bytes());
            put_str(&mut out, decided_by);
        }
        JournalEvent::Finished {
            completion_tokens,
            outcome,
            ..
        } => {
            out.extend_from_slice(&completion_tokens.to_le_bytes());
            out.push(outcome.tag());
        }
    }
    out
}

pub fn decode_journal_event(b: &[u8]) -> Result<JournalEvent, DecodeError> {
    let mut r = Reader(b);
    r.version(JOURNAL_V1)?;
    let tag = r.u8("journal event tag")?;
    let at_us = r.u64("at_us")?;
    let event = match tag {
        0 => JournalEvent::Accepted {
            at_us,
            prompt_tokens: r.u32("prompt_tokens")?,
            max_tokens: r.u32("max_tokens")?,
            priority: r.u8("priority")?,
        },
        1 => JournalEvent::Dispatched {
            at_us,
            instance: r.u32("instance")?,
            decided_by: r.string("decided_by")?,
        },
        2 => JournalEvent::Finished {
            at_us,
            completion_tokens: r.u32("completion_tokens")?,
            outcome: JournalOutcome::from_tag(r.u8("outcome")?)?,
        },
        tag => {
            return Err(DecodeError::UnknownTag {
                what: "journal event",
                tag,
            })
        }
    };
    r.finish()?;
    Ok(event)
}

/// Length of a bench key past the name: separator 0x00 ++ at_us (BE u64).
const BENCH_KEY_SUFFIX: usize = 1 + 8;

/// name ++ 0x00 ++ at_us (BE u64). Names never contain 0x00 (the store
/// checks), so one name's keys are contiguous and ordered by time.
pub fn bench_key(name: &str, at_us: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(name.len() + BENCH_KEY_SUFFIX);
    k.extend_from_slice(name.as_bytes());
    k.push(0);
    k.extend_from_slice(&at_us.to_be_bytes());
    k
}

/// Splits a bench key into (name, at_us).
pub fn parse_bench_key(key: &[u8]) -> Result<(&str, u64), DecodeError> {
    let Some(name_len) = key.len().checked_sub(BENCH_KEY_SUFFIX) else {
        return Err(DecodeError::Truncated { what: "bench key" });
    };
    let (name, rest) = key.split_at(name_len);
    if name.is_empty() {
        return Err(DecodeError::Invalid("empty bench name"));
    }
    if rest[0] != 0 || name.contains(&0) {
        return Err(DecodeError::Invalid("bench key separator misplaced"));
    }
    let name =
        std::str::from_utf8(name).map_err(|_| DecodeError::InvalidUtf8 { what: "bench name" })?;
    let at_us = u64::from_be_bytes(rest[1..].try_into().expect("8 bytes"));
    Ok((name, at_us))
}

/// version u8 ++ the JSON text's UTF-8 bytes (to the end of the value). The
/// text is opaque here: the store checks only that it is UTF-8.
pub fn encode_bench_result(json: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + json.len());
    out.push(BENCH_V1);
    out.extend_from_slice(json.as_bytes());
    out
}

pub fn decode_bench_result(b: &[u8]) -> Result<String, DecodeError> {
    let mut r = Reader(b);
    r.version(BENCH_V1)?;
    String::from_utf8(r.0.to_vec()).map_err(|_| DecodeError::InvalidUtf8 {
        what: "bench result",
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn load_from(v: [u32; 14], instance: u32, ts: u64, draining: bool) -> InstanceLoad {
        InstanceLoad {
            instance,
            timestamp_us: ts,
            block_size: v[0],
            total_blocks: v[1],
            used_blocks: v[2],
            watermark_blocks: v[3],
            running: v[4],
            waiting: v[5],
            preempted: v[6],
            head_of_line_demand_blocks: v[7],
            waiting_demand_blocks: v[8],
            high_priority_requests: v[9],
            headroom_blocks: v[10],
            migrating_out: v[11],
            migrating_in: v[12],
            step_latency_us: v[13],
            draining,
        }
    }

    #[test]
    fn every_field_lands_in_its_own_slot() {
        // One distinct value per field catches swapped or dropped fields.
        let v: [u32; 14] = std::array::from_fn(|i| 0x0101_0101 * (i as u32 + 1));
        for draining in [false, true] {
            let s = load_from(v, 0xdead_beef, 0x0102_0304_0506_0708, draining);
            assert_eq!(snapshot_u32s(&s), v);
            let b = encode_snapshot(&s);
            assert_eq!(decode_snapshot(&b).unwrap(), s);
            for edge in [0, 1, u32::MAX] {
                let e = load_from([edge; 14], edge, u64::from(edge) << 20, draining);
                assert_eq!(decode_snapshot(&encode_snapshot(&e)).unwrap(), e);
            }
        }
    }

    #[test]
    fn corrupt_snapshots_are_errors() {
        let good = encode_snapshot(&InstanceLoad::default());
        assert_eq!(decode_snapshot(&[]), Err(DecodeError::Empty));
        assert_eq!(
            decode_snapshot(&good[..SNAPSHOT_LEN - 1]),
            Err(DecodeError::WrongLength {
                expected: SNAPSHOT_LEN,
                actual: SNAPSHOT_LEN - 1
            })
        );
        let mut long = good.to_vec();
        long.push(0);
        assert!(matches!(
            decode_snapshot(&long),
            Err(DecodeError::WrongLength { .. })
        ));
        let mut v2 = good;
        v2[0] = 2;
        assert_eq!(decode_snapshot(&v2), Err(DecodeError::UnknownVersion(2)));
        let mut bad_bool = good;
        bad_bool[SNAPSHOT_LEN - 1] = 7;
        assert_eq!(decode_snapshot(&bad_bool), Err(DecodeError::InvalidBool(7)));
        assert!(parse_snapshot_key(&[1, 2, 3]).is_err());
    }

    #[test]
    fn keys_sort_by_instance_then_time_then_seq() {
        let ks = [
            snapshot_key(0, u64::MAX, 0),
            snapshot_key(1, 0, 5),
            snapshot_key(1, 1, 0),
            snapshot_key(1, 1, 1),
            snapshot_key(256, 0, 0),
        ];
        assert!(ks.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(parse_snapshot_key(&ks[3]).unwrap(), (1, 1, 1));
    }

    #[test]
    fn corrupt_meta_and_active_are_errors() {
        let m = PolicyMeta {
            name: "llumnix".into(),
            version: "1.0.0".into(),
            kinds: vec!["dispatch".into(), "migration".into()],
            installed_at_us: 42,
        };
        let b = encode_meta(&m);
        assert_eq!(decode_meta(&b).unwrap(), m);
        for cut in 0..b.len() {
            assert!(
                decode_meta(&b[..cut]).is_err(),
                "prefix of {cut} bytes decoded"
            );
        }
        let mut extra = b.clone();
        extra.push(0);
        assert_eq!(decode_meta(&extra), Err(DecodeError::TrailingBytes(1)));
        let mut v9 = b.clone();
        v9[0] = 9;
        assert_eq!(decode_meta(&v9), Err(DecodeError::UnknownVersion(9)));
        let mut bad_utf8 = b;
        bad_utf8[13] = 0xff; // first byte of the name
        assert_eq!(
            decode_meta(&bad_utf8),
            Err(DecodeError::InvalidUtf8 { what: "name" })
        );
        // A huge kind count must not allocate or panic.
        let mut huge = vec![META_V1];
        huge.extend_from_slice(&0u64.to_le_bytes());
        huge.extend_from_slice(&[0; 8]);
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_meta(&huge).is_err());

        let a = ActiveRecord {
            active: "a".into(),
            history: vec!["b".into(), "c".into()],
        };
        let b = encode_active(&a);
        assert_eq!(decode_active(&b).unwrap(), a);
        for cut in 0..b.len() {
            assert!(decode_active(&b[..cut]).is_err());
        }
    }

    fn sample_events() -> Vec<JournalEvent> {
        let mut v = vec![
            JournalEvent::Accepted {
                at_us: 0x0102_0304_0506_0708,
                prompt_tokens: 0x1111_1111,
                max_tokens: 0x2222_2222,
                priority: 0x33,
            },
            JournalEvent::Dispatched {
                at_us: u64::MAX,
                instance: u32::MAX,
                decided_by: "llumnix@1.2.0 ✓".into(),
            },
            JournalEvent::Dispatched {
                at_us: 0,
                instance: 0,
                decided_by: String::new(),
            },
        ];
        v.extend(JournalOutcome::ALL.map(|outcome| JournalEvent::Finished {
            at_us: 7,
            completion_tokens: 0x4444_4444,
            outcome,
        }));
        v
    }

    #[test]
    fn journal_events_round_trip_and_prefixes_are_errors() {
        for e in sample_events() {
            let b = encode_journal_event(&e);
            assert_eq!(decode_journal_event(&b).unwrap(), e);
            for cut in 0..b.len() {
                assert!(
                    decode_journal_event(&b[..cut]).is_err(),
                    "prefix of {cut} bytes of {e:?} decoded"
                );
            }
            let mut extra = b.clone();
            extra.push(0);
            assert_eq!(
                decode_journal_event(&extra),
                Err(DecodeError::TrailingBytes(1))
            );
        }
        // Fixed layout of an Accepted event (little-endian fields).
        let b = encode_journal_event(&sample_events()[0]);
        assert_eq!(
            b,
            [
                &[JOURNAL_V1, 0][..],
                &[8, 7, 6, 5, 4, 3, 2, 1],
                &[0x11; 4],
                &[0x22; 4],
                &[0x33],
            ]
            .concat()
        );
    }

    #[test]
    fn corrupt_journal_events_are_errors() {
        assert_eq!(decode_journal_event(&[]), Err(DecodeError::Empty));
        let finished = encode_journal_event(&sample_events()[3]);
        let mut v2 = finished.clone();
        v2[0] = 2;
        assert_eq!(
            decode_journal_event(&v2),
            Err(DecodeError::UnknownVersion(2))
        );
        let mut bad_tag = finished.clone();
        bad_tag[1] = 3;
        assert_eq!(
            decode_journal_event(&bad_tag),
            Err(DecodeError::UnknownTag {
                what: "journal event",
                tag: 3
            })
        );
        let mut bad_outcome = finished;
        *bad_outcome.last_mut().unwrap() = 4;
        assert_eq!(
            decode_journal_event(&bad_outcome),
            Err(DecodeError::UnknownTag {
                what: "journal outcome",
                tag: 4
            })
        );
        let mut bad_utf8 = encode_journal_event(&sample_events()[1]);
        bad_utf8[1 + 1 + 8 + 4 + 4] = 0xff; // first byte of decided_by
        assert_eq!(
            decode_journal_event(&bad_utf8),
            Err(DecodeError::InvalidUtf8 { what: "decided_by" })
        );
        // A huge decided_by length must not allocate or panic.
        let mut huge = vec![JOURNAL_V1, 1];
        huge.extend_from_slice(&[0; 8 + 4]);
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            decode_journal_event(&huge),
            Err(DecodeError::Truncated { what: "decided_by" })
        );
    }

    #[test]
    fn journal_keys_sort_by_request_then_seq() {
        let ks = [
            journal_key(0, u64::MAX),
            journal_key(1, 0),
            journal_key(1, 1),
            journal_key(1, 256),
            journal_key(256, 0),
            journal_key(u64::MAX, 0),
        ];
        assert!(ks.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(parse_journal_key(&ks[3]).unwrap(), (1, 256));
        assert_eq!(
            parse_journal_key(&[0; 15]),
            Err(DecodeError::WrongLength {
                expected: JOURNAL_KEY_LEN,
                actual: 15
            })
        );
    }

    #[test]
    fn bench_keys_group_by_name_then_time() {
        // "a" < "a b" < "ab" as names; every key of "a" sorts before "a b".
        let ks = [
            bench_key("a", 0),
            bench_key("a", 1),
            bench_key("a", u64::MAX),
            bench_key("a b", 0),
            bench_key("ab", 0),
            bench_key("b", 0),
        ];
        assert!(ks.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(parse_bench_key(&ks[3]).unwrap(), ("a b", 0));
        assert_eq!(parse_bench_key(&ks[2]).unwrap(), ("a", u64::MAX));
        assert!(matches!(
            parse_bench_key(&[0; 8]),
            Err(DecodeError::Truncated { .. })
        ));
        assert!(parse_bench_key(&[0; 9]).is_err(), "empty name");
        let mut no_sep = bench_key("ab", 5);
        no_sep[2] = b'x';
        assert!(parse_bench_key(&no_sep).is_err());
        let nul_in_name = [&b"a\0b"[..], &bench_key("", 0)].concat();
        assert!(parse_bench_key(&nul_in_name).is_err());
        let bad_utf8 = [&[0xffu8][..], &bench_key("", 0)].concat();
        assert_eq!(
            parse_bench_key(&bad_utf8),
            Err(DecodeError::InvalidUtf8 { what: "bench name" })
        );

        let json = r#"{"p99_ms": 12.5, "name": "ü"}"#;
        let b = encode_bench_result(json);
        assert_eq!(decode_bench_result(&b).unwrap(), json);
        assert_eq!(decode_bench_result(&[BENCH_V1]).unwrap(), "");
        assert_eq!(decode_bench_result(&[]), Err(DecodeError::Empty));
        assert_eq!(
            decode_bench_result(&[9, b'{']),
            Err(DecodeError::UnknownVersion(9))
        );
        assert!(decode_bench_result(&[BENCH_V1, 0xc3]).is_err());
    }

    fn journal_event() -> impl Strategy<Value = JournalEvent> {
        prop_oneof![
            (any::<u64>(), any::<u32>(), any::<u32>(), any::<u8>()).prop_map(
                |(at_us, prompt_tokens, max_tokens, priority)| JournalEvent::Accepted {
                    at_us,
                    prompt_tokens,
                    max_tokens,
                    priority,
                }
            ),
            (any::<u64>(), any::<u32>(), ".{0,24}").prop_map(|(at_us, instance, decided_by)| {
                JournalEvent::Dispatched {
                    at_us,
                    instance,
                    decided_by,
                }
            }),
            (any::<u64>(), any::<u32>(), 0..JournalOutcome::ALL.len()).prop_map(
                |(at_us, completion_tokens, o)| JournalEvent::Finished {
                    at_us,
                    completion_tokens,
                    outcome: JournalOutcome::ALL[o],
                }
            ),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, rng_seed: proptest::test_runner::RngSeed::Fixed(0x11_0e_u64), ..ProptestConfig::default() })]

        #[test]
        fn snapshot_round_trip(v in proptest::array::uniform14(any::<u32>()), inst: u32, ts: u64, d: bool) {
            let s = load_from(v, inst, ts, d);
            prop_assert_eq!(decode_snapshot(&encode_snapshot(&s)).unwrap(), s);
        }

        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..96)) {
            let _ = decode_snapshot(&b);
            let _ = decode_meta(&b);
            let _ = decode_active(&b);
            let _ = decode_journal_event(&b);
            let _ = parse_journal_key(&b);
            let _ = parse_bench_key(&b);
            let _ = decode_bench_result(&b);
        }

        #[test]
        fn journal_like_bytes_never_panic(tag in 0u8..4, tail in proptest::collection::vec(any::<u8>(), 0..48)) {
            // Valid version and a (mostly) valid tag reach the field decoders.
            let b = [&[JOURNAL_V1, tag][..], &tail].concat();
            if let Ok(e) = decode_journal_event(&b) {
                prop_assert_eq!(encode_journal_event(&e), b);
            }
        }

        #[test]
        fn journal_event_round_trip(e in journal_event()) {
            prop_assert_eq!(decode_journal_event(&encode_journal_event(&e)).unwrap(), e);
        }

        #[test]
        fn journal_key_round_trip_and_order(a: (u64, u64), b: (u64, u64)) {
            let (ka, kb) = (journal_key(a.0, a.1), journal_key(b.0, b.1));
            prop_assert_eq!(parse_journal_key(&ka).unwrap(), a);
            prop_assert_eq!(ka.cmp(&kb), a.cmp(&b));
        }

        #[test]
        fn bench_round_trip(name in "[^\\x00]{1,12}", at: u64, json in ".{0,40}") {
            let k = bench_key(&name, at);
            prop_assert_eq!(parse_bench_key(&k).unwrap(), (name.as_str(), at));
            prop_assert_eq!(decode_bench_result(&encode_bench_result(&json)).unwrap(), json);
        }

        #[test]
        fn meta_round_trip(name in ".{0,20}", version in ".{0,8}", kinds in proptest::collection::vec("[a-z]{1,10}", 0..5), at: u64) {
            let m = PolicyMeta { name, version, kinds, installed_at_us: at };
            prop_assert_eq!(decode_meta(&encode_meta(&m)).unwrap(), m);
        }
    }
}
