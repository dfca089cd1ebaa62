//! Live migration end to end: a real `llumen serve` with in-process
//! instances of the test model, KV blocks moving over QUIC between them
//! while requests decode, driven both by the migration policy's rounds and
//! by explicit `migrate` admin calls.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::Server;
use llumen_host::front::admin::AdminCommand;
use llumen_host::front::api::GenerateRequest;
use llumen_host::front::client::{Client, Completion};

fn prompts() -> Vec<String> {
    (0..8)
        .map(|i| format!("migrating request {i}: ").repeat(2 + i % 3))
        .collect()
}

const MAX_TOKENS: u32 = 240;

async fn run_all(client: &Arc<Client>) -> Vec<tokio::task::JoinHandle<Completion>> {
    prompts()
        .into_iter()
        .map(|p| {
            let client = client.clone();
            tokio::spawn(async move {
                client
                    .generate(&GenerateRequest::text(p, MAX_TOKENS))
                    .await
                    .unwrap()
                    .collect()
                    .await
                    .unwrap()
            })
        })
        .collect()
}

/// Each prompt alone, one after the other (no migration happens then).
async fn one_by_one(client: &Client) -> Vec<Completion> {
    let mut out = Vec::new();
    for p in prompts() {
        out.push(
            client
                .generate(&GenerateRequest::text(p, MAX_TOKENS))
                .await
                .unwrap()
                .collect()
                .await
                .unwrap(),
        );
    }
    out
}

/// Waits (up to 5 s) until no instance holds a block, a request or a
/// migration; false if that never happens.
async fn idle_and_clean(admin: &Client, token: &str) -> bool {
    for _ in 0..100 {
        let s = admin
            .admin(token, &AdminCommand::Status, &[])
            .await
            .unwrap();
        let clean = s["instances"].as_array().unwrap().iter().all(|i| {
            i["load"]["used_blocks"] == 0
                && i["load"]["running"] == 0
                && i["load"]["waiting"] == 0
                && i["load"]["migrating_in"] == 0
                && i["load"]["migrating_out"] == 0
        }) && s["requests_in_flight"] == 0;
        if clean {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_migrated_mid_decode_produce_the_same_tokens() {
    // Reference: migration off.
    let tmp = tempfile::tempdir().unwrap();
    let reference = {
        let server = Server::start(
            &tmp.path().join("ref"),
            &["--instances", "2", "--no-migrate"],
        );
        let client = Arc::new(server.client().await);
        let mut out = Vec::new();
        for t in run_all(&client).await {
            out.push(t.await.unwrap());
        }
        assert!(out.iter().all(|c| c.finish.moves == 0));
        Arc::try_unwrap(client).ok().unwrap().close().await;
        assert!(server.stop().success());
        out
    };

    let server = Server::start(
        &tmp.path().join("live"),
        &[
            "--instances",
            "2",
            "--migration-period-ms",
            "50",
            "--blocks",
            "128",
        ],
    );
    let client = Arc::new(server.client().await);
    let token = server.token();
    let tasks = run_all(&client).await;
    // Move requests back and forth while they decode.
    let admin = server.client().await;
    let mut started = 0;
    for i in 0..400u32 {
        if tasks.iter().all(|t| t.is_finished()) {
            break;
        }
        let (source, destination) = (i % 2, (i + 1) % 2);
        let r = admin
            .admin(
                &token,
                &AdminCommand::Migrate {
                    source,
                    destination,
                    request: None,
                },
                &[],
            )
            .await;
        if r.is_ok() {
            started += 1;
        }
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    let mut outputs = Vec::new();
    for t in tasks {
        outputs.push(t.await.unwrap());
    }
    for (i, (got, want)) in outputs.iter().zip(&reference).enumerate() {
        assert_eq!(got.tokens.len(), MAX_TOKENS as usize, "request {i}");
        assert_eq!(
            got.tokens,
            want.tokens,
            "request {i} (moved {} times) differs from the run without migration\n{}",
            got.finish.moves,
            server.stderr()
        );
        assert_eq!(got.text, want.text, "request {i}");
    }
    let moved = outputs.iter().filter(|c| c.finish.moves > 0).count();
    let status = admin
        .admin(&token, &AdminCommand::Status, &[])
        .await
        .unwrap();
    let committed = status["migrations"]["committed"].as_u64().unwrap();
    assert!(
        committed >= 4 && moved >= 2,
        "{started} migrations started by hand, {committed} committed, {moved} requests moved: {}\n{}",
        status["migrations"],
        server.stderr()
    );
    eprintln!(
        "{started} migrations started by hand; {committed} committed in all; {moved} of {} requests moved; {}",
        outputs.len(),
        status["migrations"]
    );
    // Downtime is the last stage only: a few blocks, whatever the length.
    let stages: Vec<u64> =
        serde_json::from_value(status["migrations"]["last_stages_blocks"].clone()).unwrap();
    assert!(!stages.is_empty());
    // No block leaks on either side once everything is done.
    assert!(
        idle_and_clean(&admin, &token).await,
        "blocks or migrations left over"
    );
    let (_, metrics) = common::http(server.http(), "GET", "/metrics", "");
    assert!(metrics.contains("llumen_migrations_total{outcome=\"completed\"}"));
    admin.close().await;
    Arc::try_unwrap(client).ok().unwrap().close().await;
    assert!(server.stop().success());
}

/// Joined instances in their own processes migrate requests between them
/// (KV over QUIC from one process to the other, the stream resumed to the
/// manager); then a destination process is killed during a migration:
/// every request still completes once, with the tokens it would have had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joined_instances_migrate_and_survive_a_killed_destination() {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    let server = Server::start(&data_dir, &["--instances", "0", "--no-migrate"]);
    let (mut a, a_id) = common::join_instance(&server, tmp.path(), "a", &[]);
    let (mut b, b_id) = common::join_instance(&server, tmp.path(), "b", &[]);
    let (mut c, c_id) = common::join_instance(&server, tmp.path(), "c", &[]);
    let admin = server.client().await;
    let token = server.token();
    common::wait_for_loads(&admin, &token, 3).await;
    let client = Arc::new(server.client().await);
    let tasks = run_all(&client).await;
    // Wait until requests run everywhere, then move some between processes.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let migrate = |source: u32, destination: u32| {
        let admin = &admin;
        let token = &token;
        async move {
            admin
                .admin(
                    token,
                    &AdminCommand::Migrate {
                        source,
                        destination,
                        request: None,
                    },
                    &[],
                )
                .await
        }
    };
    let mut committed = 0;
    for i in 0..60 {
        let (s, d) = if i % 2 == 0 {
            (a_id, b_id)
        } else {
            (b_id, a_id)
        };
        let _ = migrate(s, d).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        let st = admin
            .admin(&token, &AdminCommand::Status, &[])
            .await
            .unwrap();
        committed = st["migrations"]["committed"].as_u64().unwrap();
        if committed >= 3 {
            break;
        }
    }
    let logs = || {
        ["a", "b", "c"]
            .iter()
            .map(|n| {
                format!(
                    "--- instance {n}:\n{}",
                    std::fs::read_to_string(tmp.path().join(format!("{n}.log")))
                        .unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        committed >= 3,
        "only {committed} migrations between joined instances committed\n{}\n{}",
        server.stderr(),
        logs()
    );
    // Now a migration into C, and C killed right away.
    let into_c = migrate(a_id, c_id).await.or(migrate(b_id, c_id).await);
    tokio::time::sleep(Duration::from_millis(2)).await;
    c.kill().unwrap();
    c.wait().unwrap();
    let mut outputs = Vec::new();
    for t in tasks {
        outputs.push(t.await.unwrap());
    }
    eprintln!("migration into C: {into_c:?}");
    let status = admin
        .admin(&token, &AdminCommand::Status, &[])
        .await
        .unwrap();
    eprintln!("migrations: {}", status["migrations"]);
    // The reference: each prompt alone on the survivors, no migration.
    let reference = one_by_one(&client).await;
    for (i, (got, want)) in outputs.iter().zip(&reference).enumerate() {
        assert_eq!(got.tokens.len(), MAX_TOKENS as usize, "request {i}");
        assert_eq!(
            got.tokens,
            want.tokens,
            "request {i} (moved {} times)\n{}",
            got.finish.moves,
            server.stderr()
        );
    }
    assert!(outputs.iter().any(|c| c.finish.moves > 0));
    for child in [&mut a, &mut b] {
        let _ = child.kill();
        let _ = child.wait();
    }
    admin.close().await;
    Arc::try_unwrap(client).ok().unwrap().close().await;
    assert!(server.stop().success());
}

/// The source's connection to the destination dies in the middle of each
/// migration (fault injection in the source process): every migration is
/// given up, the requests go on where they were and finish with the tokens
/// they would have had, and the destination holds nothing afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_migration_connection_leaves_requests_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    let server = Server::start(&data_dir, &["--instances", "0", "--no-migrate"]);
    // A drops its migration connection instead of sending its second
    // message (after the reservation was granted: a copy stage or the
    // commit, the request detached for it).
    let (mut a, a_id) = common::join_instance(
        &server,
        tmp.path(),
        "a",
        &[("LLUMEN_FAULT_MIGRATION_DROP_AFTER", "1")],
    );
    let (mut b, b_id) = common::join_instance(&server, tmp.path(), "b", &[]);
    let admin = server.client().await;
    let token = server.token();
    common::wait_for_loads(&admin, &token, 2).await;
    let client = Arc::new(server.client().await);
    let tasks = run_all(&client).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut aborted = 0;
    for _ in 0..100 {
        if tasks.iter().all(|t| t.is_finished()) || aborted >= 3 {
            break;
        }
        let _ = admin
            .admin(
                &token,
                &AdminCommand::Migrate {
                    source: a_id,
                    destination: b_id,
                    request: None,
                },
                &[],
            )
            .await;
        tokio::time::sleep(Duration::from_millis(30)).await;
        let st = admin
            .admin(&token, &AdminCommand::Status, &[])
            .await
            .unwrap();
        aborted = st["migrations"]["aborted"].as_u64().unwrap();
    }
    let mut outputs = Vec::new();
    for t in tasks {
        outputs.push(t.await.unwrap());
    }
    let status = admin
        .admin(&token, &AdminCommand::Status, &[])
        .await
        .unwrap();
    eprintln!(
        "migrations with dropped connections: {}",
        status["migrations"]
    );
    assert!(
        aborted >= 1,
        "no migration was cut: {}",
        status["migrations"]
    );
    assert_eq!(
        status["migrations"]["committed"], 0,
        "{}",
        status["migrations"]
    );
    let reference = one_by_one(&client).await;
    for (i, (got, want)) in outputs.iter().zip(&reference).enumerate() {
        assert_eq!(got.tokens, want.tokens, "request {i}");
    }
    // Nothing held anywhere once idle (the destination dropped its
    // reservations when the streams broke).
    assert!(
        idle_and_clean(&admin, &token).await,
        "blocks or migrations left over"
    );
    for child in [&mut a, &mut b] {
        let _ = child.kill();
        let _ = child.wait();
    }
    admin.close().await;
    Arc::try_unwrap(client).ok().unwrap().close().await;
    assert!(server.stop().success());
}
