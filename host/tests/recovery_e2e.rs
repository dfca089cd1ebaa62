//! Recovery after a manager crash: `llumen serve` is killed with SIGKILL
//! while requests run, then started again on the same data dir. The active
//! policy of every kind and their rollback history come back as they were,
//! the load snapshots flushed before the crash are in sled, and the request
//! journal names exactly the requests that were in flight (those whose
//! clients saw the connection die), none of the finished ones.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Server;
use llumen_host::front::admin::AdminCommand;
use llumen_host::front::api::GenerateRequest;
use llumen_host::front::client::{Client, ClientError, Completion};
use llumen_store::JournalEvent;

/// Requests running at the crash get these distinct `max_tokens` (base +
/// index): the journal's `Accepted` record says which client request each
/// interrupted id was.
const CRASH_MAX_TOKENS_BASE: u32 = 3_000;
const CRASH_REQUESTS: u32 = 6;
const FINISHED_REQUESTS: usize = 8;
/// The server's flush period is 1 s: everything buffered before a point is
/// durable this long after it.
const FLUSHED_AFTER: Duration = Duration::from_millis(1_600);
/// What was observed this long before the kill has been flushed (one flush
/// period plus the time a flush may take).
const DURABLE_AFTER: Duration = Duration::from_millis(1_400);

fn sha_of(name: &str) -> String {
    let out = std::process::Command::new(common::llumen())
        .args(["policy", "inspect", "--json"])
        .arg(common::policy_dir().join(format!("{name}.wasm")))
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v[0]["sha256"].as_str().unwrap().to_string()
}

async fn swap(client: &Client, token: &str, kind: &str, policy: &str) -> serde_json::Value {
    swap_with(client, token, kind, policy, &[]).await
}

async fn swap_with(
    client: &Client,
    token: &str,
    kind: &str,
    policy: &str,
    params: &[&str],
) -> serde_json::Value {
    let bytes = common::component_bytes(policy);
    client
        .admin(
            token,
            &AdminCommand::PolicySwap {
                kind: kind.into(),
                sha256: None,
                params: params.iter().map(|p| p.to_string()).collect(),
            },
            &bytes,
        )
        .await
        .unwrap_or_else(|e| panic!("swapping {kind} to {policy}: {e}"))
}

/// One field of the runtime's active version per kind, from `llumen status
/// --json`.
fn runtime_active_field(
    status: &serde_json::Value,
    field: &str,
) -> BTreeMap<String, serde_json::Value> {
    status["policies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["kind"].as_str().unwrap().to_string(),
                p["active"][field].clone(),
            )
        })
        .collect()
}

/// The runtime's active version's parameters per kind.
fn runtime_params(status: &serde_json::Value) -> BTreeMap<String, serde_json::Value> {
    runtime_active_field(status, "params")
}

/// The runtime's active sha256 per kind.
fn runtime_actives(status: &serde_json::Value) -> BTreeMap<String, String> {
    runtime_active_field(status, "sha256")
        .into_iter()
        .map(|(k, v)| (k, v.as_str().unwrap_or("").to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_manager_restarts_with_its_policies_snapshots_and_journal() {
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    let args = ["--instances", "2", "--no-migrate"];
    let mut server = Server::start(&data_dir, &args);
    let token = server.token();
    let admin = server.client().await;

    // Policies: dispatch -> round-robin; migration -> queue-length -> infaas,
    // then rolled back to queue-length; infaas installed without activation
    // for priority's sake too; scaling stays on llumnix.
    swap(&admin, &token, "dispatch", "round-robin").await;
    swap(&admin, &token, "migration", "queue-length").await;
    swap(&admin, &token, "migration", "infaas").await;
    admin
        .admin(
            &token,
            &AdminCommand::PolicyRollback {
                kind: "migration".into(),
            },
            &[],
        )
        .await
        .unwrap();
    swap(&admin, &token, "priority", "infaas").await;
    // Scaling: llumnix configured with parameters, a version of its own.
    let params = ["scale-up-below=5", "scale-down-above=80"];
    swap_with(&admin, &token, "scaling", "llumnix", &params).await;
    let list_before = server.cli_json(&["policy", "list", "--json"]);
    let status_before = server.cli_json(&["status", "--json"]);
    let actives_before = runtime_actives(&status_before);
    assert_eq!(actives_before["dispatch"], sha_of("round-robin"));
    assert_eq!(actives_before["migration"], sha_of("queue-length"));
    assert_eq!(actives_before["priority"], sha_of("infaas"));
    assert_eq!(actives_before["scaling"], sha_of("llumnix"));
    let params_before = runtime_params(&status_before);
    assert_eq!(params_before["scaling"], serde_json::json!(params));
    assert_eq!(params_before["dispatch"], serde_json::json!([]));
    let mut registry = actives_before.clone();
    registry.insert(
        "scaling".into(),
        format!("{}?scale-up-below=5&scale-down-above=80", sha_of("llumnix")),
    );
    assert_eq!(
        list_before["active"],
        serde_json::to_value(&registry).unwrap()
    );

    // Requests that finish long before the crash.
    let client = Arc::new(server.client().await);
    let mut finished: Vec<Completion> = Vec::new();
    {
        let tasks: Vec<_> = (0..FINISHED_REQUESTS)
            .map(|i| {
                let client = client.clone();
                tokio::spawn(async move {
                    client
                        .generate(&GenerateRequest::text(format!("finished {i}: "), 32))
                        .await?
                        .collect()
                        .await
                })
            })
            .collect();
        for t in tasks {
            finished.push(t.await.unwrap().expect("a request before the crash"));
        }
    }
    let finished_ids: BTreeSet<u64> = finished.iter().map(|c| c.finish.request_id).collect();
    assert_eq!(finished_ids.len(), FINISHED_REQUESTS);
    let accepted_before = common::status(&admin, &token).await["requests_total"]
        .as_u64()
        .unwrap();

    // Long requests that will still run at the crash.
    let crash_tasks: Vec<_> = (0..CRASH_REQUESTS)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let r = tokio::time::timeout(Duration::from_secs(40), async {
                    client
                        .generate(&GenerateRequest::text(
                            format!("crash {i}: "),
                            CRASH_MAX_TOKENS_BASE + i,
                        ))
                        .await?
                        .collect()
                        .await
                })
                .await;
                (i, r, Instant::now())
            })
        })
        .collect();
    // All accepted (journaled, buffered)...
    let deadline = Instant::now() + Duration::from_secs(20);
    let observed = loop {
        let s = common::status(&admin, &token).await;
        if s["requests_total"].as_u64().unwrap() >= accepted_before + u64::from(CRASH_REQUESTS) {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the crash requests were not accepted: {s}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // ... and the snapshots observed so far: all of them (and the journal's
    // Accepted events) are durable after the next flush.
    let snapshots_observed: u64 = observed["stored_snapshots"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    // Count the snapshots observed every 100 ms until the kill: each count
    // taken at least DURABLE_AFTER before the kill must be in sled.
    let sum = |s: &serde_json::Value| -> u64 {
        s["stored_snapshots"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum()
    };
    let mut samples = vec![(Instant::now(), snapshots_observed)];
    let observed_at = Instant::now();
    while observed_at.elapsed() < FLUSHED_AFTER {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let s = common::status(&admin, &token).await;
        samples.push((Instant::now(), sum(&s)));
    }
    let before_kill = common::status(&admin, &token).await;
    assert_eq!(
        before_kill["requests_in_flight"].as_u64(),
        Some(u64::from(CRASH_REQUESTS)),
        "a crash request ended before the kill: {before_kill}"
    );
    let snapshots_at_kill: u64 = before_kill["stored_snapshots"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    let kill_at = Instant::now();
    server.kill9();

    // Every crash request's client gets an error (no hang, no completion).
    let mut crash_errors = BTreeMap::new();
    for t in crash_tasks {
        let (i, r, at) = t.await.unwrap();
        match r {
            Err(_) => panic!("crash request {i} hung (no error 40 s after the kill)"),
            Ok(Ok(c)) => panic!(
                "crash request {i} completed across the crash ({} tokens)",
                c.tokens.len()
            ),
            Ok(Err(e)) => {
                assert!(
                    matches!(e, ClientError::Connection(_) | ClientError::Wire(_)),
                    "crash request {i}: not a connection error: {e:?}"
                );
                crash_errors.insert(i, (e.to_string(), at.duration_since(kill_at)));
            }
        }
    }
    let slowest_error = crash_errors.values().map(|(_, d)| *d).max().unwrap();

    // What sled holds, read while no server runs.
    let store_path = data_dir.join("store");
    let (snapshots_in_sled, journal_in_flight, interrupted_max_tokens) = {
        let store = llumen_store::Store::open(&store_path).unwrap();
        let snaps = store.range_all(0, u64::MAX).unwrap().len() as u64;
        let in_flight = store.in_flight().unwrap();
        let mut max_tokens = BTreeMap::new();
        for &id in &in_flight {
            let accepted = common::accepted_max_tokens(&store, id);
            max_tokens.insert(id, accepted.expect("in flight means accepted"));
        }
        // Finished requests: one Finished event each, durable.
        for id in &finished_ids {
            let events = store.journal_events(*id).unwrap();
            let ends = events
                .iter()
                .filter(|e| matches!(e, JournalEvent::Finished { .. }))
                .count();
            assert_eq!(ends, 1, "request {id}: {events:?}");
        }
        (snaps, in_flight, max_tokens)
    };
    let flushed_bound = samples
        .iter()
        .filter(|(at, _)| *at + DURABLE_AFTER <= kill_at)
        .map(|(_, n)| *n)
        .max()
        .unwrap();
    assert!(flushed_bound >= snapshots_observed);
    assert!(
        snapshots_in_sled >= flushed_bound,
        "sled holds {snapshots_in_sled} snapshots; {flushed_bound} had been observed {} ms or more before the kill",
        DURABLE_AFTER.as_millis()
    );
    let interrupted_requests: BTreeSet<u32> = interrupted_max_tokens
        .values()
        .map(|m| m - CRASH_MAX_TOKENS_BASE)
        .collect();
    let failed: BTreeSet<u32> = crash_errors.keys().copied().collect();
    assert_eq!(
        interrupted_requests, failed,
        "the journal's in-flight requests (by max_tokens) are not the ones whose clients failed: {interrupted_max_tokens:?}"
    );
    assert!(journal_in_flight
        .iter()
        .all(|id| !finished_ids.contains(id)));

    // Restart on the same data dir.
    let first_log = server.stderr();
    drop(server);
    let restart_at = Instant::now();
    let server = Server::start(&data_dir, &args);
    let restart_s = restart_at.elapsed().as_secs_f64();
    let status = server.cli_json(&["status", "--json"]);
    let interrupted: Vec<u64> =
        serde_json::from_value(status["interrupted_requests"].clone()).unwrap();
    assert_eq!(
        interrupted, journal_in_flight,
        "status after the restart\n{first_log}"
    );
    let list_after = server.cli_json(&["policy", "list", "--json"]);
    assert_eq!(list_after["active"], list_before["active"]);
    assert_eq!(list_after["history"], list_before["history"]);
    assert_eq!(list_after["policies"], list_before["policies"]);
    assert_eq!(runtime_actives(&status), actives_before, "{status}");
    assert_eq!(runtime_params(&status), params_before, "{status}");
    for kind in ["dispatch", "migration", "priority", "scaling"] {
        let p = status["policies"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["kind"] == kind)
            .unwrap();
        assert!(
            !p["active"]["name"].is_null(),
            "{kind} runs a component after the restart: {p}"
        );
    }
    // It serves, and the dispatch policy is round-robin again: two requests
    // land on both instances.
    let fresh = server.client().await;
    let mut served = BTreeSet::new();
    for i in 0..2 {
        let c = fresh
            .generate(&GenerateRequest::text(format!("after {i}"), 8))
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        assert_eq!(c.tokens.len(), 8);
        served.insert(c.finish.instance);
    }
    assert_eq!(served.len(), 2, "round-robin after the restart");
    // The rollback history survived: rolling dispatch back gives llumnix.
    let back = fresh
        .admin(
            &token,
            &AdminCommand::PolicyRollback {
                kind: "dispatch".into(),
            },
            &[],
        )
        .await
        .unwrap();
    assert_eq!(back["active"], sha_of("llumnix").as_str());
    fresh.close().await;

    let history: BTreeMap<String, usize> = list_before["history"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_array().unwrap().len()))
        .collect();
    eprintln!(
        "recovery: policies restored {:?} (history lengths {history:?}); snapshots observed >= {} ms before the kill {flushed_bound}, in sled after the kill {snapshots_in_sled}, observed at the kill {snapshots_at_kill}; \
         {} finished requests, {} in flight at the kill -> journal interrupted {:?} (= the {} failed clients); clients' errors within {:.1} s of the kill ({}); restart {restart_s:.1} s; total {:.1} s",
        runtime_actives(&status)
            .iter()
            .map(|(k, v)| format!("{k}={}", &v[..12]))
            .collect::<Vec<_>>(),
        DURABLE_AFTER.as_millis(),
        finished_ids.len(),
        CRASH_REQUESTS,
        interrupted,
        failed.len(),
        slowest_error.as_secs_f64(),
        crash_errors.values().next().unwrap().0,
        started.elapsed().as_secs_f64(),
    );
    assert!(server.stop().success());
    // The restart closed them in the journal (failed): a further start
    // does not list them again.
    {
        let store = llumen_store::Store::open(&store_path).unwrap();
        assert!(store.in_flight().unwrap().is_empty());
        for id in &journal_in_flight {
            let events = store.journal_events(*id).unwrap();
            assert!(
                matches!(
                    events.last(),
                    Some(JournalEvent::Finished {
                        outcome: llumen_store::JournalOutcome::Failed,
                        ..
                    })
                ),
                "interrupted request {id}: {events:?}"
            );
        }
    }
    let server = Server::start(&data_dir, &args);
    let again = server.cli_json(&["status", "--json"]);
    assert_eq!(
        again["interrupted_requests"],
        serde_json::json!([]),
        "requests interrupted by the earlier crash are listed again"
    );
    assert!(server.stop().success());
    drop((client, admin));
}
