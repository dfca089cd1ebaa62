//! Behaviour of `Store` on sled (temporary and on-disk) and on `MemBackend`.

use llumen_store::backend::Op;
use llumen_store::{
    DispatchRecord, InstanceLoad, JournalEvent, JournalOutcome, KvBackend, MemBackend, PolicyMeta,
    Store, StoreError, Tree,
};
use proptest::prelude::*;
use std::collections::BTreeMap;
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
    // A configured version of a registered component is a version of its own.
    let configured = format!("{}?select=sjf", sha(2));
    assert_eq!(
        st.set_active("dispatch", &configured).unwrap(),
        Some(sha(2))
    );
    assert_eq!(st.active("dispatch").unwrap(), Some(configured));
    assert_eq!(st.rollback("dispatch").unwrap(), Some(sha(2)));
    assert!(matches!(
        st.set_active("dispatch", &format!("{}?a=1", sha(9))),
        Err(StoreError::UnknownPolicy(_))
    ));
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

fn accepted(at_us: u64) -> JournalEvent {
    JournalEvent::Accepted {
        at_us,
        prompt_tokens: 100,
        max_tokens: 50,
        priority: 1,
    }
}

fn dispatched(at_us: u64, instance: u32, by: &str) -> JournalEvent {
    JournalEvent::Dispatched {
        at_us,
        instance,
        decided_by: by.into(),
    }
}

fn finished(at_us: u64, outcome: JournalOutcome) -> JournalEvent {
    JournalEvent::Finished {
        at_us,
        completion_tokens: 7,
        outcome,
    }
}

fn journal_rows<B: KvBackend>(st: &Store<B>) -> usize {
    let mut n = 0;
    st.backend()
        .scan(Tree::Journal, &[], None, false, &mut |_, _| {
            n += 1;
            Ok(true)
        })
        .unwrap();
    n
}

fn journal_body<B: KvBackend>(st: &Store<B>) {
    // Requests interleaved, a huge id, some events flushed, some buffered.
    st.journal(7, &accepted(100)).unwrap();
    st.journal(3, &accepted(90)).unwrap();
    st.journal(u64::MAX, &accepted(95)).unwrap();
    st.journal(7, &dispatched(110, 2, "llumnix@1")).unwrap();
    st.flush().unwrap();
    st.journal(3, &dispatched(110, 1, "rr")).unwrap();
    st.journal(u64::MAX, &dispatched(96, 0, "rr")).unwrap();
    st.journal(3, &finished(150, JournalOutcome::Stop)).unwrap();
    st.journal(9, &dispatched(120, 4, "orphan")).unwrap(); // no Accepted
    if st.batch_size() > 8 {
        assert_eq!(st.pending_len(), 4, "the last four are still buffered");
    }
    assert_eq!(
        st.journal_events(7).unwrap(),
        vec![accepted(100), dispatched(110, 2, "llumnix@1")]
    );
    assert_eq!(
        st.journal_events(3).unwrap(),
        vec![
            accepted(90),
            dispatched(110, 1, "rr"),
            finished(150, JournalOutcome::Stop)
        ],
        "journal order, buffered events included"
    );
    assert_eq!(st.journal_events(u64::MAX).unwrap().len(), 2);
    assert!(st.journal_events(4).unwrap().is_empty());
    assert_eq!(st.in_flight().unwrap(), vec![7, u64::MAX]);
    let rec = |request, at_us, instance, by: &str| DispatchRecord {
        request,
        at_us,
        instance,
        decided_by: by.into(),
    };
    let all = st.dispatches_between(0, u64::MAX).unwrap();
    assert_eq!(
        all,
        vec![
            rec(u64::MAX, 96, 0, "rr"),
            rec(3, 110, 1, "rr"),
            rec(7, 110, 2, "llumnix@1"),
            rec(9, 120, 4, "orphan"),
        ],
        "by time, then request"
    );
    assert_eq!(st.dispatches_between(96, 120).unwrap(), all[..3].to_vec());
    assert!(st.dispatches_between(97, 110).unwrap().is_empty());
    assert!(st.dispatches_between(120, 120).unwrap().is_empty());
    assert!(st.dispatches_between(200, 100).unwrap().is_empty());

    // The same answers once everything is flushed.
    st.flush().unwrap();
    assert_eq!(st.pending_len(), 0);
    assert_eq!(journal_rows(st), 8);
    assert_eq!(st.in_flight().unwrap(), vec![7, u64::MAX]);
    assert_eq!(st.dispatches_between(0, u64::MAX).unwrap(), all);

    // Retention: only finished requests, by their Finished time.
    st.journal(7, &finished(300, JournalOutcome::Cancelled))
        .unwrap();
    assert_eq!(st.retain_journal_since(150).unwrap(), 0, "150 is not < 150");
    assert_eq!(st.retain_journal_since(151).unwrap(), 1);
    assert!(st.journal_events(3).unwrap().is_empty());
    assert_eq!(st.in_flight().unwrap(), vec![u64::MAX]);
    assert_eq!(st.retain_journal_since(u64::MAX).unwrap(), 1);
    assert!(st.journal_events(7).unwrap().is_empty());
    assert_eq!(st.retain_journal_since(u64::MAX).unwrap(), 0);
    assert_eq!(journal_rows(st), 3, "unfinished requests are kept");
    assert_eq!(st.in_flight().unwrap(), vec![u64::MAX]);
    assert_eq!(st.dispatches_between(0, u64::MAX).unwrap().len(), 2);
}

#[test]
fn journal_events_in_flight_dispatches_and_retention() {
    on_each_backend!(1000, journal_body);
    on_each_backend!(2, journal_body);
    on_each_backend!(1, journal_body);
}

fn shared_batch_body<B: KvBackend>(st: &Store<B>) {
    st.journal(1, &accepted(1)).unwrap();
    st.append(&load(1, 1, 1)).unwrap();
    assert_eq!(st.pending_len(), 2);
    assert_eq!(journal_rows(st), 0, "journaling does not write");
    assert_eq!(st.in_flight().unwrap(), vec![1], "buffered events are read");
    st.journal(1, &dispatched(2, 1, "p")).unwrap(); // third entry: written out
    assert_eq!(st.pending_len(), 0);
    assert_eq!(journal_rows(st), 2);
    assert_eq!(st.latest(1).unwrap().unwrap().used_blocks, 1);
    st.journal(1, &finished(3, JournalOutcome::Length)).unwrap();
    assert!(st.in_flight().unwrap().is_empty());
    // Retention flushes the buffer first.
    assert_eq!(st.retain_journal_since(4).unwrap(), 1);
    assert_eq!((st.pending_len(), journal_rows(st)), (0, 0));
}

#[test]
fn journal_shares_the_snapshot_batch() {
    on_each_backend!(3, shared_batch_body);
}

#[test]
fn concurrent_journal_writes_are_all_kept() {
    let st = Arc::new(Store::temporary().unwrap().with_batch_size(5));
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let st = Arc::clone(&st);
            std::thread::spawn(move || {
                for i in 0..100u64 {
                    let request = t * 1000 + i;
                    st.journal(request, &accepted(i)).unwrap();
                    st.append(&load(t as u32, i, 0)).unwrap();
                    st.journal(request, &dispatched(i, t as u32, "p")).unwrap();
                    if i % 2 == 0 {
                        st.journal(request, &finished(i, JournalOutcome::Stop))
                            .unwrap();
                    }
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|h| h.join().unwrap());
    assert_eq!(st.in_flight().unwrap().len(), 200);
    assert_eq!(st.dispatches_between(0, u64::MAX).unwrap().len(), 400);
    assert_eq!(st.journal_events(2001).unwrap().len(), 2);
    assert_eq!(st.range_all(0, u64::MAX).unwrap().len(), 400);
}

#[test]
fn corrupt_journal_entries_are_reported_with_tree_and_key() {
    let st = Store::with_backend(MemBackend::default());
    st.journal(1, &accepted(5)).unwrap();
    st.flush().unwrap();
    let key = llumen_store::codec::journal_key(1, 99).to_vec();
    st.backend()
        .apply(Tree::Journal, vec![Op::Insert(key.clone(), vec![1, 9])])
        .unwrap();
    match st.journal_events(1) {
        Err(
            e @ StoreError::Corrupt {
                tree: "journal", ..
            },
        ) => {
            assert!(e.to_string().contains("0x0000000000000001"), "{e}");
        }
        other => panic!("expected a corrupt error, got {other:?}"),
    }
    assert!(st.in_flight().is_err());
    assert!(st.dispatches_between(0, 10).is_err());
    assert!(st.retain_journal_since(10).is_err());
    assert_eq!(journal_rows(&st), 2, "a failed retention removes nothing");
    // A key of the wrong length is corrupt too.
    st.backend()
        .apply(
            Tree::Journal,
            vec![
                Op::Remove(key),
                Op::Insert(
                    vec![0; 3],
                    llumen_store::codec::encode_journal_event(&accepted(1)),
                ),
            ],
        )
        .unwrap();
    assert!(matches!(
        st.in_flight(),
        Err(StoreError::Corrupt {
            tree: "journal",
            ..
        })
    ));
}

fn bench_body<B: KvBackend>(st: &Store<B>) {
    assert!(st.bench_names().unwrap().is_empty());
    assert!(st.bench_results("dispatch").unwrap().is_empty());
    st.put_bench_result("dispatch", 30, r#"{"p99":3}"#).unwrap();
    st.put_bench_result("dispatch", 10, r#"{"p99":1}"#).unwrap();
    st.put_bench_result("dispatch", u64::MAX, "{}").unwrap();
    st.put_bench_result("dispatch x", 5, "[]").unwrap();
    st.put_bench_result("dispatchx", 5, "").unwrap();
    st.put_bench_result("a/ü", 0, r#""ü""#).unwrap();
    assert_eq!(
        st.bench_results("dispatch").unwrap(),
        vec![
            (10, r#"{"p99":1}"#.to_owned()),
            (30, r#"{"p99":3}"#.to_owned()),
            (u64::MAX, "{}".to_owned())
        ],
        "oldest first, names that extend it excluded"
    );
    st.put_bench_result("dispatch", 30, r#"{"p99":4}"#).unwrap();
    assert_eq!(
        st.bench_results("dispatch").unwrap()[1],
        (30, r#"{"p99":4}"#.to_owned()),
        "same name and time replaces"
    );
    assert_eq!(st.bench_results("dispatch").unwrap().len(), 3);
    assert_eq!(
        st.bench_results("dispatch x").unwrap(),
        vec![(5, "[]".into())]
    );
    assert_eq!(
        st.bench_names().unwrap(),
        vec!["a/ü", "dispatch", "dispatch x", "dispatchx"]
    );
    assert!(st.bench_results("dispatc").unwrap().is_empty());
    for bad in ["", "nul\0name", "new\nline", &"x".repeat(257)] {
        assert!(
            matches!(
                st.put_bench_result(bad, 1, "{}"),
                Err(StoreError::InvalidBenchName(_))
            ),
            "{bad:?}"
        );
        assert!(st.bench_results(bad).is_err());
    }
    st.put_bench_result(&"x".repeat(256), 1, "{}").unwrap();
    assert_eq!(st.bench_names().unwrap().len(), 5);
}

#[test]
fn bench_results_by_name_and_time() {
    on_each_backend!(1, bench_body);
}

#[test]
fn corrupt_bench_result_is_an_error() {
    let st = Store::with_backend(MemBackend::default());
    st.put_bench_result("b", 1, "{}").unwrap();
    st.backend()
        .apply(
            Tree::BenchResults,
            vec![Op::Insert(
                llumen_store::codec::bench_key("b", 2),
                vec![1, 0xff],
            )],
        )
        .unwrap();
    assert!(matches!(
        st.bench_results("b"),
        Err(StoreError::Corrupt {
            tree: "bench_results",
            ..
        })
    ));
    st.backend()
        .apply(
            Tree::BenchResults,
            vec![Op::Insert(b"junk".to_vec(), vec![1])],
        )
        .unwrap();
    assert!(st.bench_names().is_err());
}

#[test]
fn reopen_keeps_journal_and_bench_results() {
    let dir = tempfile::tempdir().unwrap();
    {
        let st = Store::open(dir.path()).unwrap();
        st.journal(1, &accepted(10)).unwrap();
        st.journal(2, &accepted(11)).unwrap();
        st.flush().unwrap();
        st.journal(1, &dispatched(12, 3, "llumnix")).unwrap();
        st.journal(2, &finished(13, JournalOutcome::Failed))
            .unwrap(); // written by the drop
        st.put_bench_result("load", 5, r#"{"rps":10}"#).unwrap();
    }
    let st = Store::open(dir.path()).unwrap();
    assert_eq!(st.in_flight().unwrap(), vec![1]);
    // Events journaled after a reopen still come after the old ones.
    st.journal(1, &finished(20, JournalOutcome::Length))
        .unwrap();
    assert_eq!(
        st.journal_events(1).unwrap(),
        vec![
            accepted(10),
            dispatched(12, 3, "llumnix"),
            finished(20, JournalOutcome::Length)
        ]
    );
    assert!(st.in_flight().unwrap().is_empty());
    assert_eq!(st.bench_names().unwrap(), vec!["load"]);
    assert_eq!(
        st.bench_results("load").unwrap(),
        vec![(5, r#"{"rps":10}"#.to_owned())]
    );
    assert_eq!(st.retain_journal_since(15).unwrap(), 1);
    drop(st);
    let st = Store::open(dir.path()).unwrap();
    assert!(st.journal_events(2).unwrap().is_empty());
    assert_eq!(st.journal_events(1).unwrap().len(), 3);
}

/// One step of the journal model test.
#[derive(Debug, Clone)]
enum Step {
    Event(u64, JournalEvent),
    Flush,
    Retain(u64),
}

fn step() -> impl Strategy<Value = Step> {
    let request = 0u64..6;
    let at = 0u64..100;
    prop_oneof![
        6 => (request.clone(), at.clone()).prop_map(|(r, t)| Step::Event(r, accepted(t))),
        6 => (request.clone(), at.clone(), 0u32..3)
            .prop_map(|(r, t, i)| Step::Event(r, dispatched(t, i, "p"))),
        4 => (request, at, 0usize..4).prop_map(|(r, t, o)| {
            Step::Event(r, finished(t, JournalOutcome::ALL[o]))
        }),
        1 => Just(Step::Flush),
        1 => (0u64..120).prop_map(Step::Retain),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, rng_seed: proptest::test_runner::RngSeed::Fixed(0x10_u64), ..ProptestConfig::default() })]

    /// The journal behaves like a map of per-request event lists, whatever
    /// the batch size and wherever flushes and retentions fall.
    #[test]
    fn journal_matches_a_model(steps in proptest::collection::vec(step(), 0..40), batch in 1usize..6) {
        let st = Store::with_backend(MemBackend::default()).with_batch_size(batch);
        let mut model: BTreeMap<u64, Vec<JournalEvent>> = BTreeMap::new();
        for s in steps {
            match s {
                Step::Event(r, e) => {
                    st.journal(r, &e).unwrap();
                    model.entry(r).or_default().push(e);
                }
                Step::Flush => st.flush().unwrap(),
                Step::Retain(cutoff) => {
                    let before = model.len();
                    model.retain(|_, evs| {
                        let last = evs.iter().filter_map(|e| match e {
                            JournalEvent::Finished { at_us, .. } => Some(*at_us),
                            _ => None,
                        }).max();
                        last.is_none_or(|f| f >= cutoff)
                    });
                    prop_assert_eq!(st.retain_journal_since(cutoff).unwrap(), before - model.len());
                }
            }
        }
        for r in 0..6 {
            prop_assert_eq!(st.journal_events(r).unwrap(), model.get(&r).cloned().unwrap_or_default());
        }
        let in_flight: Vec<u64> = model.iter().filter(|(_, evs)| {
            evs.iter().any(|e| matches!(e, JournalEvent::Accepted { .. }))
                && !evs.iter().any(|e| matches!(e, JournalEvent::Finished { .. }))
        }).map(|(r, _)| *r).collect();
        prop_assert_eq!(st.in_flight().unwrap(), in_flight);
        let mut dispatches: Vec<(u64, u64, u32)> = Vec::new();
        for (r, evs) in &model {
            for e in evs {
                if let JournalEvent::Dispatched { at_us, instance, .. } = e {
                    if (20..70).contains(at_us) {
                        dispatches.push((*at_us, *r, *instance));
                    }
                }
            }
        }
        dispatches.sort_by_key(|d| (d.0, d.1)); // stable: journal order within a request
        let got: Vec<(u64, u64, u32)> = st.dispatches_between(20, 70).unwrap()
            .into_iter().map(|d| (d.at_us, d.request, d.instance)).collect();
        prop_assert_eq!(got, dispatches);
    }
}
