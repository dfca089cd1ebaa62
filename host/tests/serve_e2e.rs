//! End to end: a real `llumen serve` process with in-process instances of
//! the test model, driven through the Rust client, raw HTTP, the real
//! Python `openai` client and the `llumen` CLI; and `llumen instance
//! --join` processes, one of which is killed mid-generation.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{http, sse_events, Server};
use llumen_host::front::admin::AdminCommand;
use llumen_host::front::api::{ErrorCode, GenerateRequest, PromptInput};
use llumen_host::front::client::ClientError;
use llumen_host::transport::protocol::{self, Frame};

fn sha_of(file: &Path) -> String {
    let out = Command::new(common::llumen())
        .args(["policy", "inspect", "--json"])
        .arg(file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v[0]["sha256"].as_str().unwrap().to_string()
}

fn active_sha(status: &serde_json::Value, kind: &str) -> String {
    status["policies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["kind"] == kind)
        .and_then(|p| p["active"]["sha256"].as_str())
        .unwrap_or("")
        .to_string()
}

/// Sends one request on a task of its own; its collected completion.
fn spawn_generate(
    client: &std::sync::Arc<llumen_host::front::client::Client>,
    prompt: String,
    max_tokens: u32,
) -> tokio::task::JoinHandle<Result<llumen_host::front::client::Completion, ClientError>> {
    let client = client.clone();
    tokio::spawn(async move {
        client
            .generate(&GenerateRequest::text(prompt, max_tokens))
            .await?
            .collect()
            .await
    })
}

fn prompt(i: usize) -> String {
    format!("request number {i}: tell me about scheduling")
}

/// The greedy output of each prompt, from a fresh request each.
async fn reference(server: &Server, prompts: &[String], max_tokens: u32) -> Vec<Vec<u32>> {
    let client = server.client().await;
    let mut out = Vec::new();
    for p in prompts {
        let c = client
            .generate(&GenerateRequest::text(p.clone(), max_tokens))
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        out.push(c.tokens);
    }
    client.close().await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_swap_status_sled_restart_and_openai_client() {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    let server = Server::start(&data_dir, &["--instances", "2"]);
    let policies = common::policy_dir();
    let llumnix_sha = sha_of(&policies.join("llumnix.wasm"));
    let rr_sha = sha_of(&policies.join("round-robin.wasm"));
    let status = server.cli_json(&["status", "--json"]);
    assert_eq!(active_sha(&status, "dispatch"), llumnix_sha);
    assert_eq!(status["instances"].as_array().unwrap().len(), 2);

    // Concurrent requests through QUIC and HTTP; swap dispatch mid-stream.
    let max_tokens = 96u32;
    let prompts: Vec<String> = (0..12).map(prompt).collect();
    let client = std::sync::Arc::new(server.client().await);
    let mut quic = Vec::new();
    for p in prompts.clone() {
        quic.push(spawn_generate(&client, p, max_tokens));
    }
    let http_addr = server.http();
    let mut web = Vec::new();
    for i in 0..4 {
        web.push(tokio::task::spawn_blocking(move || {
            let body = serde_json::json!({
                "model": "llumen-tiny-test", "prompt": prompt(100 + i), "max_tokens": 48,
                "temperature": 0, "stream": true,
            });
            http(http_addr, "POST", "/v1/completions", &body.to_string())
        }));
    }
    tokio::time::sleep(Duration::from_millis(30)).await;
    let swap = server.cli_json(&[
        "policy",
        "swap",
        "dispatch",
        policies.join("round-robin.wasm").to_str().unwrap(),
    ]);
    assert_eq!(swap["active"], rr_sha.as_str());
    // Requests after the swap.
    for p in prompts.iter().take(4).cloned() {
        quic.push(spawn_generate(&client, p, max_tokens));
    }
    let mut outputs = Vec::new();
    for q in quic {
        let c = q.await.unwrap().expect("every QUIC request completes");
        assert_eq!(c.finish.completion_tokens, max_tokens);
        assert_eq!(c.tokens.len(), max_tokens as usize);
        assert!(!c.text.is_empty());
        outputs.push(c);
    }
    for w in web {
        let (status, body) = w.await.unwrap();
        assert_eq!(status, 200, "{body}");
        let events = sse_events(&body);
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{body}");
        let finish: Vec<serde_json::Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .filter(|v: &serde_json::Value| !v["choices"][0]["finish_reason"].is_null())
            .collect();
        assert_eq!(finish.len(), 1, "{body}");
        assert_eq!(finish[0]["choices"][0]["finish_reason"], "length");
    }
    // Greedy outputs do not depend on the instance or the dispatch policy:
    // the requests sent after the swap equal the ones before.
    for i in 0..4 {
        assert_eq!(outputs[i].tokens, outputs[12 + i].tokens, "prompt {i}");
    }
    // Both instances served (round-robin alternates).
    let served: std::collections::BTreeSet<u32> =
        outputs.iter().map(|c| c.finish.instance).collect();
    assert_eq!(served.len(), 2, "{served:?}");

    let status = server.cli_json(&["status", "--json"]);
    assert_eq!(active_sha(&status, "dispatch"), rr_sha);
    assert_eq!(active_sha(&status, "migration"), llumnix_sha);
    assert_eq!(status["requests_in_flight"], 0);
    let stored: BTreeMap<String, u64> =
        serde_json::from_value(status["stored_snapshots"].clone()).unwrap();
    assert!(
        stored.values().all(|&n| n > 0) && stored.len() == 2,
        "{stored:?}"
    );

    // The real openai client, streaming and not.
    let python = openai_python();
    let out = Command::new(&python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py"))
        .env("LLUMEN_HTTP_BASE", format!("http://{http_addr}/v1"))
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openai client: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Metrics saw the traffic.
    let (code, metrics) = http(http_addr, "GET", "/metrics", "");
    assert_eq!(code, 200);
    assert!(metrics.contains("llumen_request_ttft_seconds_bucket"));
    assert!(
        metrics.contains(&format!(
            "llumen_policy_active{{kind=\"dispatch\",version=\"round-robin@{}\"}} 1",
            &rr_sha[..12]
        )),
        "{metrics}"
    );

    std::sync::Arc::try_unwrap(client)
        .ok()
        .unwrap()
        .close()
        .await;
    assert!(server.stop().success());

    // Snapshots and the journal are in sled.
    {
        let store = llumen_store::Store::open(data_dir.join("store")).unwrap();
        let snaps = store.range_all(0, u64::MAX).unwrap();
        assert!(snaps.len() >= 2, "{} snapshots", snaps.len());
        assert!(store.in_flight().unwrap().is_empty());
        assert!(store.dispatches_between(0, u64::MAX).unwrap().len() >= 16);
    }

    // A restart keeps the policy choice.
    let server = Server::start(&data_dir, &["--instances", "2"]);
    let status = server.cli_json(&["status", "--json"]);
    assert_eq!(active_sha(&status, "dispatch"), rr_sha);
    assert_eq!(active_sha(&status, "scaling"), llumnix_sha);
    assert_eq!(status["interrupted_requests"], serde_json::json!([]));
    // And rollback walks back to llumnix, durably.
    let back = server.cli_json(&["policy", "rollback", "dispatch"]);
    assert_eq!(back["active"], llumnix_sha.as_str());
    let list = server.cli_json(&["policy", "list", "--json"]);
    assert_eq!(list["active"]["dispatch"], llumnix_sha.as_str());
    let again = reference(&server, &prompts[..2], max_tokens).await;
    assert_eq!(again[0], outputs[0].tokens);
    assert_eq!(again[1], outputs[1].tokens);
    assert!(server.stop().success());
}

/// The Python with `openai` installed (scripts/setup-python-openai.sh).
fn openai_python() -> String {
    if let Ok(p) = std::env::var("LLUMEN_OPENAI_PYTHON") {
        return p;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/setup-python-openai.sh");
    let out = Command::new("bash").arg(script).output().unwrap();
    assert!(
        out.status.success(),
        "setting up the openai client: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .lines()
        .last()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_typed_errors_and_the_server_keeps_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(
        &tmp.path().join("data"),
        &["--instances", "1", "--blocks", "64"],
    );
    let client = server.client().await;
    let server_error = |r: Result<Vec<Frame>, ClientError>| -> ErrorCode {
        match r.unwrap().as_slice() {
            [Frame::Error(e)] => e.code,
            other => panic!("expected one error frame, got {other:?}"),
        }
    };
    // Random bytes, an unknown version, an unknown kind, an oversize frame.
    assert_eq!(
        server_error(client.raw(&[0, 0, 0, 3, 1, 0x7e, 0]).await),
        ErrorCode::Malformed
    );
    let mut v9 = protocol::encode(&Frame::Generate(GenerateRequest::text("x", 4)));
    v9[4] = 9;
    assert_eq!(
        server_error(client.raw(&v9).await),
        ErrorCode::UnsupportedVersion
    );
    let mut huge = (protocol::MAX_REQUEST_FRAME as u32 + 1)
        .to_be_bytes()
        .to_vec();
    huge.extend([1, 0x01]);
    assert_eq!(server_error(client.raw(&huge).await), ErrorCode::TooLarge);
    let truncated = &protocol::encode(&Frame::Generate(GenerateRequest::text("hello", 4)))[..9];
    assert_eq!(
        server_error(client.raw(truncated).await),
        ErrorCode::Malformed
    );
    // A reply-kind frame as a request.
    let welcome = protocol::encode(&Frame::Welcome { instance: 1 });
    assert_eq!(
        server_error(client.raw(&welcome).await),
        ErrorCode::Malformed
    );

    let refused = |req: GenerateRequest| {
        let client = &client;
        async move {
            match client.generate(&req).await.unwrap().collect().await {
                Err(ClientError::Server(e)) => e,
                other => panic!("{req:?} was not refused: {other:?}"),
            }
        }
    };
    // 64 blocks of 16 tokens: 1,008 tokens fit; this prompt does not.
    let e = refused(GenerateRequest::text("x".repeat(2000), 8)).await;
    assert_eq!(e.code, ErrorCode::PromptTooLong, "{e}");
    assert_eq!(
        refused(GenerateRequest::text("hi", 0)).await.code,
        ErrorCode::InvalidParameter
    );
    assert_eq!(
        refused(GenerateRequest::text("hi", u32::MAX)).await.code,
        ErrorCode::InvalidParameter
    );
    let mut bad_priority = GenerateRequest::text("hi", 4);
    bad_priority.priority = 200;
    assert_eq!(
        refused(bad_priority).await.code,
        ErrorCode::InvalidParameter
    );
    let mut bad_tokens = GenerateRequest::text("", 4);
    bad_tokens.input = PromptInput::Tokens(vec![1, 999_999]);
    assert_eq!(refused(bad_tokens).await.code, ErrorCode::InvalidParameter);
    let mut nan = GenerateRequest::text("hi", 4);
    nan.temperature = f32::NAN;
    assert_eq!(refused(nan).await.code, ErrorCode::InvalidParameter);

    // Admin: wrong token; not a component; the wrong world.
    let wrong = client
        .admin("not-the-token", &AdminCommand::Status, &[])
        .await;
    assert!(
        matches!(&wrong, Err(ClientError::Server(e)) if e.code == ErrorCode::Unauthorized),
        "{wrong:?}"
    );
    let token = server.token();
    let junk = client
        .admin(
            &token,
            &AdminCommand::PolicyInstall,
            b"\0asm\x01\0\0\0garbage",
        )
        .await;
    assert!(
        matches!(&junk, Err(ClientError::Server(e)) if e.code == ErrorCode::PolicyRejected),
        "{junk:?}"
    );
    let not_wasm = client
        .admin(&token, &AdminCommand::PolicyInstall, b"hello")
        .await;
    assert!(
        matches!(&not_wasm, Err(ClientError::Server(e)) if e.code == ErrorCode::PolicyRejected),
        "{not_wasm:?}"
    );
    let dispatch_only = std::fs::read(common::policy_dir().join("dispatch-only.wasm")).unwrap();
    let wrong_world = client
        .admin(
            &token,
            &AdminCommand::PolicySwap {
                kind: "migration".into(),
                sha256: None,
                params: Vec::new(),
            },
            &dispatch_only,
        )
        .await;
    assert!(
        matches!(&wrong_world, Err(ClientError::Server(e)) if e.code == ErrorCode::PolicyRejected && e.message.contains("migration")),
        "{wrong_world:?}"
    );
    let bad_kind = client
        .admin(
            &token,
            &AdminCommand::PolicyRollback {
                kind: "teleport".into(),
            },
            &[],
        )
        .await;
    assert!(
        matches!(&bad_kind, Err(ClientError::Server(e)) if e.code == ErrorCode::InvalidParameter),
        "{bad_kind:?}"
    );
    let bad_json = client
        .raw(&protocol::encode(&Frame::Admin {
            token: token.clone(),
            command_json: "{\"command\":\"self_destruct\"}".into(),
            blob: Vec::new(),
        }))
        .await;
    assert_eq!(server_error(bad_json), ErrorCode::Malformed);
    // HTTP: bad JSON and a bad parameter.
    let (code, body) = http(server.http(), "POST", "/v1/completions", "{not json");
    assert_eq!(code, 400, "{body}");
    let (code, body) = http(
        server.http(),
        "POST",
        "/v1/completions",
        r#"{"model":"m","prompt":"hi","max_tokens":0}"#,
    );
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("invalid_parameter"), "{body}");

    // A cancelled request frees its blocks; the server still serves.
    let stream = client
        .generate(&GenerateRequest::text("cancel me", 900))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    stream.cancel();
    let ok = client
        .generate(&GenerateRequest::text("still there?", 8))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", server.stderr()));
    assert_eq!(ok.tokens.len(), 8);
    let mut idle = false;
    for _ in 0..100 {
        let status = client
            .admin(&token, &AdminCommand::Status, &[])
            .await
            .unwrap();
        let load = &status["instances"][0]["load"];
        if load["used_blocks"] == 0 && load["running"] == 0 && status["requests_in_flight"] == 0 {
            idle = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(idle, "blocks were not freed after the cancellation");

    // Shadow a candidate on live traffic, then replay one over the record.
    let rr = std::fs::read(common::policy_dir().join("round-robin.wasm")).unwrap();
    let started = client
        .admin(
            &token,
            &AdminCommand::PolicyShadow {
                kind: "dispatch".into(),
                sha256: None,
                params: Vec::new(),
                stop: false,
            },
            &rr,
        )
        .await
        .unwrap();
    assert_eq!(started["name"], "round-robin");
    for i in 0..3 {
        client
            .generate(&GenerateRequest::text(format!("shadowed {i}"), 4))
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
    }
    let mut report = serde_json::Value::Null;
    for _ in 0..50 {
        let status = client
            .admin(&token, &AdminCommand::Status, &[])
            .await
            .unwrap();
        if status["shadows"][0]["compared"].as_u64() >= Some(3) {
            report = client
                .admin(
                    &token,
                    &AdminCommand::PolicyShadow {
                        kind: "dispatch".into(),
                        sha256: None,
                        params: Vec::new(),
                        stop: true,
                    },
                    &[],
                )
                .await
                .unwrap();
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(report["compared"].as_u64() >= Some(3), "{report}");
    assert_eq!(
        report["agreed"], report["compared"],
        "one instance: both policies agree"
    );
    let infaas = std::fs::read(common::policy_dir().join("infaas.wasm")).unwrap();
    let now = llumen_host::process::clock::now_us();
    let replay = client
        .admin(
            &token,
            &AdminCommand::PolicyReplay {
                kind: "dispatch".into(),
                sha256: None,
                params: Vec::new(),
                from_us: now - 600_000_000,
                to_us: now + 1,
                limit: 5,
            },
            &infaas,
        )
        .await
        .unwrap();
    assert_eq!(replay["policy"], "infaas");
    assert!(replay["decisions"].as_u64() >= Some(5), "{replay}");
    assert_eq!(replay["failed"], 0);
    assert!(replay["snapshots"].as_u64() > Some(0), "{replay}");
    client.close().await;
    assert!(server.stop().success());
}

/// `llumen instance --join`: two instance processes, one killed while it
/// generates; every request completes once, with the output it would have
/// had anyway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joined_instances_and_a_lost_one() {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    let server = Server::start(&data_dir, &["--instances", "0"]);
    let (mut first, first_id) = common::join_instance(&server, tmp.path(), "a", &[]);
    let (mut second, _) = common::join_instance(&server, tmp.path(), "b", &[]);
    let client = server.client().await;
    let token = server.token();
    common::wait_for_loads(&client, &token, 2).await;

    let max_tokens = 400u32;
    let prompts: Vec<String> = (0..6).map(prompt).collect();
    let client = std::sync::Arc::new(client);
    let mut tasks = Vec::new();
    for p in prompts.clone() {
        tasks.push(spawn_generate(&client, p, max_tokens));
    }
    // Kill the first instance once it is generating.
    for _ in 0..200 {
        let s = client
            .admin(&token, &AdminCommand::Status, &[])
            .await
            .unwrap();
        let busy =
            s["instances"].as_array().unwrap().iter().any(|i| {
                i["instance"] == first_id && i["load"]["running"].as_u64().unwrap_or(0) > 0
            });
        if busy {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.kill().unwrap();
    first.wait().unwrap();
    let mut outputs = Vec::new();
    for t in tasks {
        let c = t.await.unwrap().unwrap_or_else(|e| {
            panic!(
                "a request failed after the loss: {e}\nserver log:\n{}",
                server.stderr()
            )
        });
        assert_eq!(c.tokens.len(), max_tokens as usize);
        outputs.push(c);
    }
    let moved = outputs.iter().filter(|c| c.finish.moves > 0).count();
    assert!(moved > 0, "no request was on the killed instance");
    // The same requests again, on the surviving instance alone: identical.
    let again = reference(&server, &prompts, max_tokens).await;
    for (i, c) in outputs.iter().enumerate() {
        assert_eq!(
            c.tokens, again[i],
            "request {i} (moved {} times)",
            c.finish.moves
        );
    }
    let status = server.cli_json(&["status", "--json"]);
    assert_eq!(status["instances"].as_array().unwrap().len(), 1);
    let _ = second.kill();
    let _ = second.wait();
    std::sync::Arc::try_unwrap(client)
        .ok()
        .unwrap()
        .close()
        .await;
    assert!(server.stop().success());
}

/// The scaling round adds in-process instances under load and drains them
/// (no new requests, stopped once empty) when the load is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_round_adds_and_drains_instances() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(
        &tmp.path().join("data"),
        &[
            "--instances",
            "1",
            "--min-instances",
            "1",
            "--max-instances",
            "3",
            "--scaling-period-ms",
            "200",
            // Scaling from the start (the default waits 100 s, as the artifact).
            "--scaling-first-check-s",
            "0",
            "--blocks",
            "64",
        ],
    );
    let client = std::sync::Arc::new(server.client().await);
    let mut tasks = Vec::new();
    for i in 0..12 {
        tasks.push(spawn_generate(&client, prompt(i).repeat(4), 300));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for t in tasks {
        let c = t
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{e}\n{}", server.stderr()));
        assert_eq!(c.tokens.len(), 300);
    }
    let metric = |body: &str, name: &str| -> u64 {
        body.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0) as u64
    };
    let (_, body) = http(server.http(), "GET", "/metrics", "");
    assert!(
        metric(&body, "llumen_scaling_events_total{action=\"scale_up\"}") >= 1,
        "no scale-up under load:\n{}",
        server.stderr()
    );
    // Idle now: the extra instances drain and stop, down to the minimum.
    let mut instances = usize::MAX;
    for _ in 0..300 {
        let status = server.cli_json(&["status", "--json"]);
        instances = status["instances"].as_array().unwrap().len();
        if instances == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(instances, 1, "{}", server.stderr());
    let (_, body) = http(server.http(), "GET", "/metrics", "");
    assert!(metric(&body, "llumen_scaling_events_total{action=\"stopped\"}") >= 1);
    // The survivor still serves.
    let ok = client
        .generate(&GenerateRequest::text("after scaling", 8))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(ok.tokens.len(), 8);
    std::sync::Arc::try_unwrap(client)
        .ok()
        .unwrap()
        .close()
        .await;
    assert!(server.stop().success());
}
