//! Live migration end to end: a real `llumen serve` with in-process
//! instances of the test model, KV blocks moving over QUIC between them
//! while requests decode, driven both by the migration policy's rounds and
//! by explicit `migrate` admin calls.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::Server;
use llumen_host::admin::AdminCommand;
use llumen_host::api::GenerateRequest;
use llumen_host::client::{Client, Completion};

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
    let mut clean = false;
    for _ in 0..100 {
        let s = admin
            .admin(&token, &AdminCommand::Status, &[])
            .await
            .unwrap();
        clean = s["instances"].as_array().unwrap().iter().all(|i| {
            i["load"]["used_blocks"] == 0
                && i["load"]["running"] == 0
                && i["load"]["waiting"] == 0
                && i["load"]["migrating_in"] == 0
                && i["load"]["migrating_out"] == 0
        }) && s["requests_in_flight"] == 0;
        if clean {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(clean, "blocks or migrations left over");
    let (_, metrics) = common::http(server.http(), "GET", "/metrics", "");
    assert!(metrics.contains("llumen_migrations_total{outcome=\"completed\"}"));
    admin.close().await;
    Arc::try_unwrap(client).ok().unwrap().close().await;
    assert!(server.stop().success());
}
