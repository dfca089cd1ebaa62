//! Behaviour of `Store` on sled (temporary and on-disk) and on `MemBackend`.

use llumen_store::backend::Op;
use llumen_store::{InstanceLoad, KvBackend, MemBackend, PolicyMeta, Store, StoreError, Tree};
use std::sync::Arc;

fn load(instance: u32, timestamp_us: u64, used: u32) -> InstanceLoad {
    InstanceLoad {
        instance,
        timestamp_us,
        used_blocks: used,
        total_blocks: 1000,
        ..Default::default()
    }
}

fn used(v: &[InstanceLoad]) -> Vec<u32> {
    v.iter().map(|s| s.used_blocks).collect()
}

fn sha(n: u8) -> String {
    format!("{n:02x}").repeat(32)
}

fn meta(name: &str, at: u64) -> PolicyMeta {
    PolicyMeta {
        name: name.into(),
        version: "0.1.0".into(),
        kinds: vec!["dispatch".into()],
        installed_at_us: at,
    }
}

/// Runs a generic test body on a temporary sled store and a memory store.
macro_rules! on_each_backend {
    ($batch:expr, $body:ident) => {
        $body(&Store::temporary().unwrap().with_batch_size($batch));
        $body(&Store::with_backend(MemBackend::default()).with_batch_size($batch));
    };
}

fn ordering_body<B: KvBackend>(st: &Store<B>) {
    // Out-of-order timestamps, equal timestamps, three instances, some
    // flushed and some still buffered.
    for (i, (inst, ts)) in [
        (2, 50),
        (1, 30),
        (1, 10),
        (u32::MAX, 5),
        (1, 20),
        (2, 10),
        (1, 20),
        (1, 40),
    ]
    .into_iter()
    .enumerate()
    {
        st.append(&load(inst, ts, i as u32)).unwrap();
        if i == 3 {
            st.flush().unwrap();
        }
    }
    if st.batch_size() > 8 {
        assert_eq!(st.pending_len(), 4, "the last four are still buffered");
    }
    assert_eq!(st.instances().unwrap(), vec![1, 2, u32::MAX]);
    assert_eq!(st.latest(1).unwrap().unwrap().timestamp_us, 40);
    assert_eq!(st.latest(u32::MAX).unwrap().unwrap().used_blocks, 3);
    assert_eq!(st.latest(7).unwrap(), None);
    // Equal timestamps keep append order (used 4 before 6).
    assert_eq!(used(&st.recent(1, 10).unwrap()), vec![2, 4, 6, 1, 7]);
    assert_eq!(used(&st.recent(1, 3).unwrap()), vec![6, 1, 7]);
    assert!(st.recent(1, 0).unwrap().is_empty());
    assert_eq!(used(&st.range(1, 20, 40).unwrap()), vec![4, 6, 1]);
    assert!(st.range(1, 40, 40).unwrap().is_empty());
    assert!(st.range(1, 50, 10).unwrap().is_empty());
    let all = st.range_all(0, u64::MAX).unwrap();
    let order: Vec<(u64, u32)> = all.iter().map(|s| (s.timestamp_us, s.instance)).collect();
    assert_eq!(
        order,
        vec![
            (5, u32::MAX),
            (10, 1),
            (10, 2),
            (20, 1),
            (20, 1),
            (30, 1),
            (40, 1),
            (50, 2)
        ]
    );
    assert_eq!(st.range_all(10, 21).unwrap().len(), 4);
    // The same answers once everything is flushed.
    st.flush().unwrap();
    assert_eq!(st.pending_len(), 0);
    assert_eq!(used(&st.recent(1, 10).unwrap()), vec![2, 4, 6, 1, 7]);
    assert_eq!(st.range_all(0, u64::MAX).unwrap(), all);
}

#[test]
fn append_latest_recent_range_ordering() {
    on_each_backend!(1000, ordering_body);
    on_each_backend!(2, ordering_body);
}

fn buffering_body<B: KvBackend>(st: &Store<B>) {
    st.append(&load(1, 1, 1)).unwrap();
    st.append(&load(1, 2, 2)).unwrap();
    assert_eq!(st.pending_len(), 2);
    assert_eq!(
        st.latest(1).unwrap().unwrap().used_blocks,
        2,
        "buffered snapshots are readable"
    );
    st.append(&load(1, 3, 3)).unwrap(); // reaches batch size 3: written out
    assert_eq!(st.pending_len(), 0);
    assert_eq!(used(&st.recent(1, 9).unwrap()), vec![1, 2, 3]);
    st.append(&load(1, 4, 4)).unwrap();
    st.flush().unwrap();
    assert_eq!(st.pending_len(), 0);
    assert_eq!(used(&st.range(1, 0, 10).unwrap()), vec![1, 2, 3, 4]);
}

#[test]
fn buffered_then_flushed_visibility() {
    on_each_backend!(3, buffering_body);
}

fn retention_body<B: KvBackend>(st: &Store<B>) {
    for ts in 0..10 {
        st.append(&load(1, ts * 10, ts as u32)).unwrap();
        if ts < 4 {
            st.append(&load(2, ts * 10 + 5, ts as u32)).unwrap();
        }
    }
    assert_eq!(st.retain_newest(usize::MAX).unwrap(), 0);
    assert_eq!(st.retain_newest(3).unwrap(), 7 + 1);
    assert_eq!(used(&st.recent(1, 99).unwrap()), vec![7, 8, 9]);
    assert_eq!(used(&st.recent(2, 99).unwrap()), vec![1, 2, 3]);
    // Instance 2 is at 15, 25, 35; instance 1 at 70, 80, 90.
    assert_eq!(st.retain_since(30).unwrap(), 2);
    assert_eq!(st.retain_since(30).unwrap(), 0);
    assert_eq!(st.retain_since(85).unwrap(), 3);
    assert_eq!(st.instances().unwrap(), vec![1]);
    assert_eq!(used(&st.recent(1, 99).unwrap()), vec![9]);
    assert_eq!(st.retain_newest(0).unwrap(), 1);
    assert!(st.instances().unwrap().is_empty());
}

#[test]
fn retention_counts() {
    on_each_backend!(4, retention_body);
}

#[test]
fn concurrent_appends_are_all_kept() {
    let st = Arc::new(Store::temporary().unwrap().with_batch_size(7));
    let threads: Vec<_> = (0..4u32)
        .map(|t| {
            let st = Arc::clone(&st);
            std::thread::spawn(move || {
                (0..250).for_each(|i| st.append(&load(t, i, i as u32)).unwrap())
            })
        })
        .collect();
    threads.into_iter().for_each(|h| h.join().unwrap());
    assert_eq!(st.range_all(0, u64::MAX).unwrap().len(), 1000);
    assert_eq!(st.recent(3, 1000).unwrap().len(), 250);
}

#[test]
fn corrupt_stored_snapshot_is_reported_with_tree_and_key() {
    let st = Store::with_backend(MemBackend::default());
    st.append(&load(1, 5, 0)).unwrap();
    st.flush().unwrap();
    let key = llumen_store::codec::snapshot_key(1, 9, 0).to_vec();
    st.backend()
        .apply(Tree::Snapshots, vec![Op::Insert(key, vec![1, 2, 3])])
        .unwrap();
    match st.recent(1, 10) {
        Err(
            e @ StoreError::Corrupt {
                tree: "snapshots", ..
            },
        ) => {
            assert!(e.to_string().contains("0x00000001"), "{e}");
        }
        other => panic!("expected a corrupt error, got {other:?}"),
    }
    // Value of another instance/timestamp under this key: also corrupt.
    let key = llumen_store::codec::snapshot_key(1, 9, 0).to_vec();
    let wrong = llumen_store::codec::encode_snapshot(&load(2, 9, 0)).to_vec();
    st.backend()
        .apply(Tree::Snapshots, vec![Op::Insert(key, wrong)])
        .unwrap();
    assert!(matches!(st.latest(1), Err(StoreError::Corrupt { .. })));
}

fn rollback_body<B: KvBackend>(st: &Store<B>) {
    for n in 1..=3 {
        st.put_policy(&sha(n), &[n; 8], &meta(&format!("p{n}"), u64::from(n)))
            .unwrap();
    }
    assert_eq!(
        st.rollback("dispatch").unwrap(),
        None,
        "no active, no history"
    );
    assert_eq!(st.set_active("dispatch", &sha(1)).unwrap(), None);
    assert_eq!(st.rollback("dispatch").unwrap(), None, "empty history");
    assert_eq!(
        st.active("dispatch").unwrap(),
        Some(sha(1)),
        "rollback with empty history keeps active"
    );
    assert_eq!(st.set_active("dispatch", &sha(2)).unwrap(), Some(sha(1)));
    assert_eq!(
        st.set_active("dispatch", &sha(2)).unwrap(),
        Some(sha(2)),
        "re-activating is a no-op"
    );
    assert_eq!(st.set_active("dispatch", &sha(3)).unwrap(), Some(sha(2)));
    assert_eq!(st.history("dispatch").unwrap(), vec![sha(1), sha(2)]);
    assert_eq!(st.set_active("migration", &sha(1)).unwrap(), None);
    assert_eq!(
        st.actives().unwrap(),
        vec![("dispatch".into(), sha(3)), ("migration".into(), sha(1))]
    );
    assert_eq!(st.rollback("dispatch").unwrap(), Some(sha(2)));
    assert_eq!(st.active("dispatch").unwrap(), Some(sha(2)));
    assert_eq!(st.history("dispatch").unwrap(), vec![sha(1)]);
    assert_eq!(st.rollback("dispatch").unwrap(), Some(sha(1)));
    assert_eq!(st.rollback("dispatch").unwrap(), None);
    assert_eq!(st.active("dispatch").unwrap(), Some(sha(1)));
    assert!(st.history("dispatch").unwrap().is_empty());
    assert_eq!(
        st.active("migration").unwrap(),
        Some(sha(1)),
        "kinds are independent"
    );
}

#[test]
fn rollback_semantics() {
    on_each_backend!(1, rollback_body);
}

#[test]
fn history_is_capped() {
    let st = Store::with_backend(MemBackend::default());
    let n = llumen_store::registry::MAX_HISTORY as u8 + 5;
    for i in 0..n {
        st.put_policy(&sha(i), b"", &meta("p", 0)).unwrap();
        st.set_active("dispatch", &sha(i)).unwrap();
    }
    let h = st.history("dispatch").unwrap();
    assert_eq!(h.len(), llumen_store::registry::MAX_HISTORY);
    assert_eq!(
        (h.first().unwrap(), h.last().unwrap()),
        (&sha(4), &sha(n - 2))
    );
}

#[test]
fn registry_validates_inputs() {
    let st = Store::temporary().unwrap();
    let put = |s: &str| st.put_policy(s, b"x", &meta("p", 0));
    assert!(matches!(put("abc"), Err(StoreError::InvalidSha(_))));
    assert!(matches!(
        put(&sha(1).to_uppercase().replace('0', "A")),
        Err(StoreError::InvalidSha(_))
    ));
    let bad_kind = PolicyMeta {
        kinds: vec!["has space".into()],
        ..meta("p", 0)
    };
    assert!(matches!(
        st.put_policy(&sha(1), b"x", &bad_kind),
        Err(StoreError::InvalidKind(_))
    ));
    assert!(matches!(
        st.set_active("dispatch", &sha(9)),
        Err(StoreError::UnknownPolicy(_))
    ));
    assert!(matches!(
        st.set_active("", &sha(9)),
        Err(StoreError::InvalidKind(_))
    ));
    assert_eq!(st.get_policy(&sha(9)).unwrap(), None);
    assert_eq!(st.active("dispatch").unwrap(), None);
    assert!(st.history("dispatch").unwrap().is_empty());
}

#[test]
fn corrupt_policy_metadata_is_an_error() {
    let st = Store::with_backend(MemBackend::default());
    st.put_policy(&sha(1), b"wasm", &meta("p", 0)).unwrap();
    let key = [b"m/", sha(1).as_bytes()].concat();
    st.backend()
        .apply(Tree::Policies, vec![Op::Insert(key, vec![1, 0, 0])])
        .unwrap();
    assert!(matches!(
        st.get_policy(&sha(1)),
        Err(StoreError::Corrupt {
            tree: "policies",
            ..
        })
    ));
    assert!(st.list_policies().is_err());
    st.backend()
        .apply(
            Tree::Active,
            vec![Op::Insert(b"dispatch".to_vec(), vec![7])],
        )
        .unwrap();
    let err = st.active("dispatch").unwrap_err();
    assert!(
        err.to_string().contains("`active` at key dispatch"),
        "{err}"
    );
}

#[test]
fn reopen_keeps_policies_active_versions_and_flushed_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    {
        let st = Store::open(dir.path()).unwrap();
        st.put_policy(&sha(1), &big, &meta("llumnix", 20)).unwrap();
        st.put_policy(
            &sha(2),
            b"\0asm",
            &PolicyMeta {
                kinds: vec!["dispatch".into(), "migration".into()],
                ..meta("rr", 10)
            },
        )
        .unwrap();
        st.set_active("dispatch", &sha(1)).unwrap();
        st.set_active("dispatch", &sha(2)).unwrap();
        st.append(&load(1, 100, 1)).unwrap();
        st.flush().unwrap();
        st.append(&load(1, 100, 2)).unwrap(); // written by the drop
    }
    let st = Store::open(dir.path()).unwrap();
    let p = st.get_policy(&sha(1)).unwrap().unwrap();
    assert_eq!(
        (p.wasm.len(), p.wasm == big, p.meta.name.as_str()),
        (big.len(), true, "llumnix")
    );
    let listed: Vec<String> = st
        .list_policies()
        .unwrap()
        .into_iter()
        .map(|(s, m)| format!("{}:{}", &s[..2], m.name))
        .collect();
    assert_eq!(
        listed,
        vec!["02:rr", "01:llumnix"],
        "ordered by install time"
    );
    assert_eq!(st.active("dispatch").unwrap(), Some(sha(2)));
    assert_eq!(st.history("dispatch").unwrap(), vec![sha(1)]);
    // Same instance and timestamp after reopen: a new key, nothing overwritten.
    st.append(&load(1, 100, 3)).unwrap();
    st.flush().unwrap();
    assert_eq!(used(&st.recent(1, 10).unwrap()), vec![1, 2, 3]);
    assert_eq!(st.rollback("dispatch").unwrap(), Some(sha(1)));
    drop(st);
    let st = Store::open(dir.path()).unwrap();
    assert_eq!(st.active("dispatch").unwrap(), Some(sha(1)));
    assert_eq!(st.range(1, 0, 1000).unwrap().len(), 3);
}
