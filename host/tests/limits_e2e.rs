//! Stream limits of a real `llumen serve`: a slow-loris stream (its first
//! frame never completes) is answered `Timeout` and closed after the
//! configured deadline, without disturbing the connection's other streams.

mod common;

use std::time::{Duration, Instant};

use common::Server;
use llumen_host::front::api::{ErrorCode, GenerateRequest};
use llumen_host::transport::protocol::{encode, Frame, MAX_REQUEST_FRAME};
use llumen_host::transport::wire::FrameReader;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_loris_stream_times_out_and_the_connection_carries_on() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("serve.toml");
    std::fs::write(&config, "first_frame_timeout_ms = 400\n").unwrap();
    let server = Server::start(
        &data,
        &["--instances", "1", "--config", config.to_str().unwrap()],
    );
    let client = server.client().await;

    // A Generate frame cut after a few bytes, and the stream left open.
    let whole = encode(&Frame::Generate(GenerateRequest::text("hello", 4)));
    let (mut send, recv) = client.connection().open_bi().await.unwrap();
    let started = Instant::now();
    send.write_all(&whole[..5]).await.unwrap();
    let mut reader = FrameReader::new(recv, MAX_REQUEST_FRAME);
    let reply = tokio::time::timeout(Duration::from_secs(10), reader.next())
        .await
        .expect("the server must not wait forever")
        .expect("a frame");
    let waited = started.elapsed();
    match reply {
        Some(Frame::Error(e)) => {
            assert_eq!(e.code, ErrorCode::Timeout, "{e}");
            assert!(e.message.contains("400 ms"), "{e}");
        }
        other => panic!("expected a Timeout error, got {other:?}"),
    }
    assert!(
        waited >= Duration::from_millis(350),
        "answered after {waited:?}"
    );

    // The same connection still serves a request.
    let done = client
        .generate(&GenerateRequest::text("hello", 4))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(done.finish.completion_tokens, 4);
    server.stop();
}

/// A parameter the default policy does not take stops `llumen serve` before
/// it listens, with the parameter named: it must not serve under rules its
/// operator did not ask for.
#[test]
fn serve_refuses_a_policy_parameter_the_policy_does_not_take() {
    let dir = tempfile::tempdir().unwrap();
    for (policy, param, expected) in [
        ("llumnix", "select=fifo", "\"select\""),
        ("llumnix", "no-such-knob=1", "unknown parameter"),
        ("llumnix", "select", "NAME=VALUE"),
        ("round-robin", "select=sjf", "takes no parameters"),
        // Not a first-party name: the component itself refuses.
        ("dispatch-only", "a=1", "does not export llumen:policy/params"),
    ] {
        let out = std::process::Command::new(common::llumen())
            .args(["serve", "--instances", "1", "--model", "tiny"])
            .args(["--default-policy", policy])
            .args(["--listen", "127.0.0.1:0", "--http", ""])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--policy-dir")
            .arg(common::policy_dir())
            .args(["--policy-param", param])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{param}: served anyway");
        assert!(stderr.contains(expected), "{param}: {stderr}");
    }
}
