//! Hostile policies installed live: one real `llumen serve` (the tiny test
//! model, two in-process instances, a 50 ms policy deadline, migration and
//! scaling rounds every 50 ms) serves a steady stream of concurrent requests
//! while every component of the adversary library
//! (`policies/testing/adversaries`) is swapped in through the admin API for
//! each kind it misbehaves in.
//!
//! What must hold: every request completes with its full, greedy output (the
//! same tokens as before any hostile policy); each misbehaviour is contained
//! and counted; repeated failures demote the version (status shows the
//! demotion, the fallback now active and the pending retry) and a retry on
//! probation that fails doubles the back-off; slow answers within the
//! deadline are accepted; a component failing its trial is refused with a
//! clear error; a component importing WASI is refused at install; and the
//! dispatch decision latency P99 over each hostile phase, as the runtime
//! measures it (`llumen status --json`: `policies[].decision_latency`), stays
//! within the deadline plus the fallback's time.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Server;
use llumen_host::front::admin::AdminCommand;
use llumen_host::front::api::GenerateRequest;
use llumen_host::front::client::{Client, ClientError};
use llumen_host::policy::LatencySummary;
use serde_json::Value;

/// The production default: tighter deadlines make honest calls (trial calls
/// included) time out on a loaded 2-core host.
const DEADLINE_MS: u64 = 50;
/// Scheduling slack in the latency bound: on a 2-core host shared with
/// builds (run queue 4–7 measured) a runnable thread, the epoch ticker
/// included, can wait tens of milliseconds for a core. Observed: a timed-out
/// dispatch decision took up to ~17 ms more than the deadline there.
const SCHEDULING_SLACK_MS: u64 = 30;
const MAX_TOKENS: u32 = 12;
const PROMPTS: usize = 6;
const WORKERS: usize = 4;

fn prompt(i: usize) -> String {
    format!("hostile policies, request {i}: keep serving")
}

fn request(i: usize) -> GenerateRequest {
    GenerateRequest {
        ignore_eos: true,
        ..GenerateRequest::text(prompt(i), MAX_TOKENS)
    }
}

fn slot<'a>(status: &'a Value, kind: &str) -> &'a Value {
    status["policies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} slot in {status}"))
}

fn demotions(status: &Value, kind: &str) -> u64 {
    slot(status, kind)["demotions"].as_u64().unwrap()
}

fn latency(status: &Value, kind: &str) -> LatencySummary {
    serde_json::from_value(slot(status, kind)["decision_latency"].clone()).unwrap()
}

fn active_sha(status: &Value, kind: &str) -> String {
    slot(status, kind)["active"]["sha256"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

/// The counters of the version labelled `<name>@…` in `kind`'s slot.
fn version_stats<'a>(status: &'a Value, kind: &str, name: &str) -> &'a Value {
    let stats = slot(status, kind)["stats"].as_object().unwrap();
    stats
        .iter()
        .find(|(label, _)| label.starts_with(&format!("{name}@")))
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("no stats of {name} in {kind}: {stats:?}"))
}

fn failures_of(stats: &Value) -> u64 {
    [
        "timeouts",
        "memory_limits",
        "traps",
        "invalid_answers",
        "unavailable",
    ]
    .iter()
    .map(|k| stats[k].as_u64().unwrap())
    .sum()
}

struct Live {
    server: Server,
    client: Arc<Client>,
    token: String,
}

impl Live {
    async fn status(&self) -> Value {
        self.client
            .admin(&self.token, &AdminCommand::Status, &[])
            .await
            .expect("status")
    }

    async fn swap(&self, kind: &str, component: &[u8]) -> Result<Value, ClientError> {
        self.client
            .admin(
                &self.token,
                &AdminCommand::PolicySwap {
                    kind: kind.into(),
                    sha256: None,
                    params: Vec::new(),
                },
                component,
            )
            .await
    }

    /// A swap that must be accepted. Its trial call (an honest answer) gets
    /// the deadline like any call; on an overloaded host it can time out,
    /// so a trial timeout is retried twice.
    async fn swap_ok(&self, kind: &str, component: &[u8]) -> Value {
        for attempt in 0.. {
            match self.swap(kind, component).await {
                Ok(reply) => return reply,
                Err(ClientError::Server(e))
                    if attempt < 2 && e.message.contains("call failed: deadline exceeded") =>
                {
                    eprintln!("swap into {kind}: {e} (loaded host); trying again");
                }
                Err(e) => panic!("swap into {kind}: {e}"),
            }
        }
        unreachable!()
    }

    /// Polls the status until `done` holds (at most `within`).
    async fn wait_for(&self, what: &str, within: Duration, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let status = self.status().await;
            if done(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "waited {within:?} for {what}; status: {}\nserver stderr (tail):\n{}",
                serde_json::to_string_pretty(&status["policies"]).unwrap(),
                tail(&self.server.stderr(), 40)
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// What a hostile component does live, per kind.
enum Expect {
    /// Repeated failures demote it.
    Demoted,
    /// Accepted: no failure at all.
    Accepted,
    /// Fails now and then (memory-limit), never demoted.
    FailsOccasionally,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_policies_installed_live_are_contained_and_serving_continues() {
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let deadline = DEADLINE_MS.to_string();
    let server = Server::start(
        &tmp.path().join("data"),
        &[
            "--instances",
            "2",
            "--policy-deadline-ms",
            &deadline,
            // Rounds on the period, not the step cadence.
            "--migration-every-steps",
            "0",
            "--migration-period-ms",
            "50",
            "--scaling-period-ms",
            "50",
            // Scaling from the start (the default waits 100 s, as the artifact).
            "--scaling-first-check-s",
            "0",
            // Policies are asked and their answers validated every round;
            // executing migrations is not what this test is about.
            "--no-migrate",
        ],
    );
    let client = Arc::new(server.client().await);
    let token = server.token();
    let live = Live {
        server,
        client: client.clone(),
        token,
    };
    let llumnix = common::component_bytes("llumnix");
    let llumnix_sha = live.status().await;
    let llumnix_sha = active_sha(&llumnix_sha, "dispatch");

    // Reference outputs (greedy: independent of instance and policy).
    let mut reference = Vec::new();
    for i in 0..PROMPTS {
        let c = client
            .generate(&request(i))
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        assert_eq!(c.tokens.len(), MAX_TOKENS as usize);
        reference.push(c.tokens);
    }
    let reference = Arc::new(reference);

    // The stream of concurrent requests, checked as they complete.
    let stop = Arc::new(AtomicBool::new(false));
    let completed = Arc::new(AtomicU64::new(0));
    let ttft_us = Arc::new(Mutex::new(Vec::new()));
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let (client, stop, completed, reference, ttft_us) = (
            client.clone(),
            stop.clone(),
            completed.clone(),
            reference.clone(),
            ttft_us.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut k = w;
            while !stop.load(Ordering::Relaxed) {
                let i = k % PROMPTS;
                k += WORKERS + 1;
                let c = client
                    .generate(&request(i))
                    .await
                    .map_err(|e| format!("request {i}: {e}"))?
                    .collect()
                    .await
                    .map_err(|e| format!("request {i}: {e}"))?;
                if c.tokens != reference[i] || c.finish.completion_tokens != MAX_TOKENS {
                    return Err(format!(
                        "request {i}: {} tokens {:?}, expected {:?}",
                        c.finish.completion_tokens, c.tokens, reference[i]
                    ));
                }
                ttft_us.lock().unwrap().push(c.finish.ttft_us);
                completed.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<(), String>(())
        }));
    }

    // Baseline: llumnix (Wasm) everywhere.
    let before = live.status().await;
    let dispatches = |s: &Value| latency(s, "dispatch").count;
    let base_count = dispatches(&before);
    let baseline_status = live
        .wait_for("baseline traffic", Duration::from_secs(20), |s| {
            dispatches(s) >= base_count + 40
        })
        .await;
    let baseline = latency(&baseline_status, "dispatch").since(&latency(&before, "dispatch"));

    // Each hostile component, for the kinds it misbehaves in.
    let all = ["dispatch", "migration", "priority", "scaling"];
    let plan: Vec<(&str, Vec<&str>, Expect)> = vec![
        ("hostile-spin", all.to_vec(), Expect::Demoted),
        ("hostile-memory", all.to_vec(), Expect::Demoted),
        ("hostile-recursion", all.to_vec(), Expect::Demoted),
        ("hostile-panic", all.to_vec(), Expect::Demoted),
        (
            "hostile-wrong-ids",
            vec!["dispatch", "migration", "scaling"],
            Expect::Demoted,
        ),
        ("hostile-duplicates", vec!["migration"], Expect::Demoted),
        ("hostile-oversize", vec!["migration"], Expect::Demoted),
        ("hostile-self-migration", vec!["migration"], Expect::Demoted),
        (
            "hostile-nonsense",
            vec!["priority", "scaling"],
            Expect::Demoted,
        ),
        ("hostile-slow", all.to_vec(), Expect::Accepted),
        ("hostile-leak", vec!["dispatch"], Expect::FailsOccasionally),
    ];
    let mut report = Vec::new();
    let mut phases = Vec::new();
    for (name, kinds, expect) in plan {
        let bytes = common::component_bytes(name);
        let phase_start = live.status().await;
        for kind in &kinds {
            let reply = live.swap_ok(kind, &bytes).await;
            assert_eq!(reply["name"], name);
        }
        let status = match expect {
            Expect::Demoted => {
                let status = live
                    .wait_for(
                        &format!("{name} demoted in {kinds:?}"),
                        Duration::from_secs(20),
                        |s| {
                            kinds
                                .iter()
                                .all(|k| demotions(s, k) > demotions(&phase_start, k))
                        },
                    )
                    .await;
                for kind in &kinds {
                    let s = slot(&status, kind);
                    // The fallback (llumnix, the last good version) is
                    // active again and the demoted version waits for its
                    // retry, or (a kind demoted early in the phase) is
                    // already back on probation.
                    let waiting = active_sha(&status, kind) == llumnix_sha
                        && s["pending_retry"]["version"]["name"] == name;
                    let on_probation = s["probation"]["version"]["name"] == name;
                    assert!(waiting || on_probation, "{name} {kind}: {s}");
                    let stats = version_stats(&status, kind, name);
                    assert!(stats["demotions"].as_u64().unwrap() >= 1, "{stats}");
                    assert!(failures_of(stats) >= 3, "{name} {kind}: {stats}");
                    let fallback = version_stats(&status, kind, "llumnix");
                    assert!(
                        fallback["answered_as_fallback"].as_u64().unwrap() >= 1,
                        "{name} {kind}: {fallback}"
                    );
                }
                status
            }
            Expect::Accepted => {
                let status = live
                    .wait_for(&format!("{name} serving"), Duration::from_secs(20), |s| {
                        kinds
                            .iter()
                            .all(|k| version_stats(s, k, name)["calls"].as_u64().unwrap_or(0) >= 8)
                    })
                    .await;
                for kind in &kinds {
                    // Its answers are accepted. (On a host whose cores are
                    // taken by other work, a ~5 ms call can now and then be
                    // held past the 50 ms wall-clock deadline: a rare
                    // timeout is tolerated, nothing else.)
                    let stats = version_stats(&status, kind, name);
                    let calls = stats["calls"].as_u64().unwrap();
                    let timeouts = stats["timeouts"].as_u64().unwrap();
                    assert_eq!(failures_of(stats), timeouts, "{name} {kind}: {stats}");
                    assert!(timeouts * 10 <= calls, "{name} {kind}: {stats}");
                    if timeouts > 0 {
                        eprintln!(
                            "{name} {kind}: {timeouts} of {calls} calls timed out (loaded host)"
                        );
                    } else {
                        assert_eq!(demotions(&status, kind), demotions(&phase_start, kind));
                        assert_eq!(slot(&status, kind)["active"]["name"], name);
                    }
                }
                status
            }
            Expect::FailsOccasionally => {
                let status = live
                    .wait_for(
                        &format!("{name} hitting the memory cap"),
                        Duration::from_secs(20),
                        |s| {
                            kinds.iter().all(|k| {
                                version_stats(s, k, name)["memory_limits"].as_u64().unwrap() >= 1
                            })
                        },
                    )
                    .await;
                for kind in &kinds {
                    assert_eq!(slot(&status, kind)["active"]["name"], name, "not demoted");
                }
                status
            }
        };
        let phase = latency(&status, "dispatch").since(&latency(&phase_start, "dispatch"));
        if kinds.contains(&"dispatch") {
            phases.push((name, phase.clone()));
        }
        report.push(format!(
            "{name:<24} {:<38} dispatch decisions {:>4}: p50 {:>8.3} ms, p99 {:>8.3} ms, max {:>8.3} ms",
            kinds.join(","),
            phase.count,
            phase.p50_ns as f64 / 1e6,
            phase.p99_ns as f64 / 1e6,
            phase.max_ns as f64 / 1e6,
        ));
        // Back to llumnix by an admin swap (which also cancels the pending
        // retries: the next phase starts clean).
        for kind in &kinds {
            live.swap_ok(kind, &llumnix).await;
        }
    }

    // Back-off live: a wrong-ids dispatch policy is demoted, retried on
    // probation after 1 s, fails again and waits twice as long.
    let bytes = common::component_bytes("hostile-wrong-ids");
    let before = live.status().await;
    live.swap_ok("dispatch", &bytes).await;
    let status = live
        .wait_for(
            "a retry on probation and a second demotion",
            Duration::from_secs(20),
            |s| demotions(s, "dispatch") >= demotions(&before, "dispatch") + 2,
        )
        .await;
    let s = slot(&status, "dispatch");
    assert!(
        s["retries"].as_u64().unwrap() > before_retries(&before),
        "{s}"
    );
    assert_eq!(s["pending_retry"]["version"]["name"], "hostile-wrong-ids");
    assert_eq!(s["pending_retry"]["backoff_ms"], 2000, "{s}");
    // (Its counters also hold its earlier phase.)
    let count = |s: &Value, what: &str| {
        version_stats(s, "dispatch", "hostile-wrong-ids")[what]
            .as_u64()
            .unwrap()
    };
    assert_eq!(
        (
            count(&status, "demotions") - count(&before, "demotions"),
            count(&status, "retries") - count(&before, "retries"),
        ),
        (2, 1)
    );
    live.swap_ok("dispatch", &llumnix).await;
    let s = live.status().await;
    assert!(
        slot(&s, "dispatch")["pending_retry"].is_null(),
        "an admin swap cancels it"
    );

    // A component that fails its trial is refused, clearly; nothing changes.
    let blatant = common::component_bytes("hostile-blatant");
    for kind in all {
        let err = live.swap(kind, &blatant).await.unwrap_err();
        assert!(
            matches!(&err, ClientError::Server(e) if e.message.contains(&format!("trial {kind} call failed"))),
            "{kind}: {err}"
        );
    }
    let s = live.status().await;
    for kind in all {
        assert_eq!(active_sha(&s, kind), llumnix_sha, "{kind}");
    }

    // A component importing WASI is refused at install, through the CLI.
    let wasi = common::policy_dir().join("wasi-reader.wasm");
    let out = live
        .server
        .cli(&["policy", "install", wasi.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "installed a WASI component: {stderr}"
    );
    for part in [
        "wasi:clocks/wall-clock@0.2.0",
        "wasi:filesystem/preopens@0.2.0",
        "wasi:sockets/instance-network@0.2.0",
        "policies cannot read files, the network or the clock",
    ] {
        assert!(stderr.contains(part), "{part:?} not in {stderr}");
    }

    // Every request of the stream completed with its full output.
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap().unwrap_or_else(|e| panic!("{e}"));
    }
    let completed = completed.load(Ordering::Relaxed);
    assert!(completed >= 100, "only {completed} requests completed");
    let status = live.status().await;
    assert_eq!(status["requests_in_flight"], 0);

    // P99 of the dispatch decisions over the hostile phases: within the
    // deadline plus the fallback's time (the baseline P99 of a decision, at
    // least 1 ms), two epoch ticks of deadline granularity and the
    // scheduling slack of a loaded host. Per phase (a few dozen decisions,
    // where P99 is the maximum) at most one decision may exceed it: one
    // thread kept off a core once.
    let fallback_ns = baseline.p99_ns.max(1_000_000);
    let bound_ns = (DEADLINE_MS + 2 + SCHEDULING_SLACK_MS) * 1_000_000 + fallback_ns;
    let overall = latency(&status, "dispatch").since(&latency(&baseline_status, "dispatch"));
    let mut ttft = ttft_us.lock().unwrap().clone();
    ttft.sort_unstable();
    let ttft_p99 = ttft[(ttft.len() * 99).div_ceil(100) - 1];
    eprintln!(
        "baseline (llumnix) dispatch decisions {}: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms\n{}\n\
         all hostile phases: {} dispatch decisions, p99 {:.3} ms, max {:.3} ms (bound {:.1} ms, deadline {DEADLINE_MS} ms)\n\
         {completed} requests completed, none lost; client-visible TTFT p99 {:.1} ms; wall time {:.1?}",
        baseline.count,
        baseline.p50_ns as f64 / 1e6,
        baseline.p99_ns as f64 / 1e6,
        baseline.max_ns as f64 / 1e6,
        report.join("\n"),
        overall.count,
        overall.p99_ns as f64 / 1e6,
        overall.max_ns as f64 / 1e6,
        bound_ns as f64 / 1e6,
        ttft_p99 as f64 / 1e3,
        started.elapsed(),
    );
    assert!(overall.p99_ns <= bound_ns, "{overall:?}");
    for (name, phase) in &phases {
        // (Counted by bucket: a bucket straddling the bound counts as over.)
        let over: u64 = phase
            .buckets
            .iter()
            .filter(|&&(upper, _)| upper > bound_ns)
            .map(|&(_, n)| n)
            .sum();
        assert!(
            over <= 1,
            "{name}: {over} dispatch decisions over {bound_ns} ns: {phase:?}"
        );
    }

    // The same figures through the CLI (`llumen status --json`).
    let cli = live.server.cli_json(&["status", "--json"]);
    let d = slot(&cli, "dispatch");
    assert!(d["demotions"].as_u64().unwrap() >= demotions(&baseline_status, "dispatch") + 6);
    assert!(d["retries"].as_u64().unwrap() >= 1, "{d}");
    assert!(latency(&cli, "dispatch").count >= overall.count, "{d}");

    // The counters reach /metrics too.
    let (code, metrics) = common::http(live.server.http(), "GET", "/metrics", "");
    assert_eq!(code, 200);
    let demoted_spin = metrics.lines().any(|l| {
        l.starts_with("llumen_policy_demotions_total{kind=\"dispatch\",version=\"hostile-spin@")
            && !l.ends_with(" 0")
    });
    assert!(demoted_spin, "{metrics}");
    assert!(metrics
        .contains("llumen_policy_retries_total{kind=\"dispatch\",version=\"hostile-wrong-ids@"));
    assert!(metrics
        .contains("llumen_policy_decision_duration_seconds{kind=\"dispatch\",quantile=\"0.99\"}"));

    drop(client);
    let Live { server, client, .. } = live;
    Arc::try_unwrap(client).ok().unwrap().close().await;
    assert!(server.stop().success());
}

fn before_retries(status: &Value) -> u64 {
    slot(status, "dispatch")["retries"].as_u64().unwrap()
}
