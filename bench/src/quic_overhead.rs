//! `llumen-bench quic-overhead`: what one request round trip over llumen's
//! QUIC API costs on loopback, against a bare quinn echo.
//!
//! Three measurements in one process, on one tokio runtime, each on one
//! warm connection with requests sent one after another (100 warm-up
//! requests first, not counted), timed with `Instant` on the client:
//! - `bare_echo`: quinn with llumen's TLS and transport settings
//!   (`tls::server_endpoint` / `client_endpoint`, pinned certificate), no
//!   llumen framing: open a stream, write 64 bytes, finish, read the echo to
//!   its end. The floor any QUIC request pays.
//! - `framing`: the same shape through llumen's protocol, no manager and no
//!   engine behind it: `llumen_host::front::client::Client` sends a `Generate`
//!   frame; a stub server reads it with `FrameReader` (the real server's
//!   decoder limits) and answers one `Tokens` and one `Finished` frame,
//!   which the client collects. Isolates protocol + codec cost.
//! - `serve`: the real thing, a `llumen serve` started in-process with
//!   `serve::run_serve` (one `tiny` instance, the policies from
//!   `--policy-dir`, a temporary data dir, no HTTP), asked
//!   `GenerateRequest::text("hi", 1)`. The server's own `FinishRecord.total_us`
//!   (arrival in the manager to the last token) is subtracted from each
//!   client round trip: what is left is the request's transport, framing,
//!   stream handling and relay overhead.
//!
//! What it must not touch: anything outside loopback and its temporary
//! directories; the server's internals (the `serve` figures go through the
//! public client API only).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use llumen_host::front::api::{FinishReason, FinishRecord, GenerateRequest, TokenChunk};
use llumen_host::front::client::Client;
use llumen_host::process::serve::{run_serve, Ready, ServeConfig};
use llumen_host::transport::protocol::{self, Frame, FrameDecoder};
use llumen_host::transport::tls::{self, Trust};
use llumen_host::transport::wire::{write_frame, FrameReader};
use serde::Serialize;

#[derive(clap::Args)]
pub struct Args {
    /// Timed requests per measurement.
    #[arg(long, default_value_t = 2000)]
    requests: usize,
    /// Untimed requests first, per measurement.
    #[arg(long, default_value_t = 100)]
    warmup: usize,
    /// Directory holding the policy components `llumen serve` starts on.
    #[arg(long, env = "LLUMEN_POLICY_DIR", default_value = "target/policies")]
    policy_dir: PathBuf,
    /// Print one JSON document on stdout.
    #[arg(long)]
    json: bool,
}

/// The bare echo's request size.
const ECHO_BYTES: usize = 64;

#[derive(Serialize)]
struct Latency {
    p50_us: f64,
    p99_us: f64,
    mean_us: f64,
    min_us: f64,
}

fn latency(samples: &[f64]) -> Latency {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let at = |q: f64| s[((s.len() - 1) as f64 * q).round() as usize];
    let round = |x: f64| (x * 10.0).round() / 10.0;
    Latency {
        p50_us: round(at(0.50)),
        p99_us: round(at(0.99)),
        mean_us: round(s.iter().sum::<f64>() / s.len() as f64),
        min_us: round(s[0]),
    }
}

#[derive(Serialize)]
struct Serve {
    /// Client round trip of a whole request.
    client_rtt: Latency,
    /// `FinishRecord.total_us`: arrival in the manager to the last token.
    server_total: Latency,
    /// Client round trip − server total, per request.
    overhead: Latency,
    completion_tokens: u32,
    policies: Vec<String>,
}

#[derive(Serialize)]
struct Report {
    benchmark: &'static str,
    requests: usize,
    warmup_requests: usize,
    echo_request_bytes: usize,
    /// Generate frame size of the `framing` and `serve` requests.
    generate_frame_bytes: usize,
    bare_echo: Latency,
    framing: Latency,
    serve: Serve,
    /// framing p50 ÷ bare_echo p50.
    framing_vs_bare_p50: f64,
    framing_vs_bare_mean: f64,
    /// serve overhead (client round trip − server total) p50 ÷ bare_echo p50.
    serve_overhead_vs_bare_p50: f64,
    serve_overhead_vs_bare_mean: f64,
}

fn us(d: Duration) -> f64 {
    d.as_nanos() as f64 / 1e3
}

/// Times `n` sequential calls of `f` after `warmup` untimed ones.
async fn timed<F, Fut, T>(warmup: usize, n: usize, mut f: F) -> Result<Vec<(f64, T)>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    for _ in 0..warmup {
        f().await?;
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        let value = f().await?;
        out.push((us(start.elapsed()), value));
    }
    Ok(out)
}

/// Accepts connections on `endpoint` and runs `handle` on every stream.
fn serve_streams<H, Fut>(endpoint: quinn::Endpoint, handle: H) -> tokio::task::JoinHandle<()>
where
    H: Fn(quinn::SendStream, quinn::RecvStream) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            let handle = handle.clone();
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                while let Ok((send, recv)) = conn.accept_bi().await {
                    tokio::spawn(handle(send, recv));
                }
            });
        }
    })
}

async fn bare_echo(addr: SocketAddr, trust: &Trust, args: &Args) -> Result<Vec<f64>> {
    let endpoint = tls::client_endpoint(addr, trust)?;
    let conn = endpoint.connect(addr, tls::SERVER_NAME)?.await?;
    let request = [0x5au8; ECHO_BYTES];
    let shared = &conn;
    let samples = timed(args.warmup, args.requests, move || {
        let conn = shared.clone();
        async move {
            let (mut send, mut recv) = conn.open_bi().await?;
            send.write_all(&request).await?;
            send.finish()?;
            let reply = recv.read_to_end(64 * 1024).await?;
            anyhow::ensure!(reply.len() == ECHO_BYTES, "echo of {} bytes", reply.len());
            Ok(())
        }
    })
    .await?;
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    Ok(samples.into_iter().map(|(t, ())| t).collect())
}

/// The framing stub: one `Generate` in, one `Tokens` and one `Finished` out.
async fn framing_stub(mut send: quinn::SendStream, recv: quinn::RecvStream) {
    let decoder =
        FrameDecoder::new(protocol::MAX_ADMIN_FRAME).with_kind_limit(protocol::limit_by_kind);
    let mut reader = FrameReader::with_decoder(recv, decoder);
    let Ok(Some(Frame::Generate(request))) = reader.next().await else {
        return;
    };
    let tokens = Frame::Tokens(TokenChunk {
        index: 0,
        ids: vec![u32::from(b'!')],
        text: "!".into(),
    });
    let finished = Frame::Finished(FinishRecord {
        request_id: 1,
        reason: FinishReason::Length,
        prompt_tokens: 2,
        completion_tokens: request.max_tokens.min(1),
        queue_us: 0,
        ttft_us: 0,
        total_us: 0,
        instance: 0,
        moves: 0,
    });
    if write_frame(&mut send, &tokens).await.is_ok()
        && write_frame(&mut send, &finished).await.is_ok()
    {
        let _ = send.finish();
    }
}

async fn framing(addr: SocketAddr, trust: &Trust, args: &Args) -> Result<Vec<f64>> {
    let client = Client::connect(addr, trust).await?;
    let request = GenerateRequest::text("hi", 1);
    let (c, r) = (&client, &request);
    let samples = timed(args.warmup, args.requests, move || async move {
        let done = c.generate(r).await?.collect().await?;
        anyhow::ensure!(done.tokens.len() == 1, "{} tokens", done.tokens.len());
        Ok(())
    })
    .await?;
    client.close().await;
    Ok(samples.into_iter().map(|(t, ())| t).collect())
}

async fn serve(args: &Args) -> Result<(Vec<(f64, FinishRecord)>, Ready)> {
    let data_dir = tempfile::tempdir()?;
    let config = ServeConfig {
        instances: 1,
        model: "tiny".into(),
        listen: "127.0.0.1:0".parse()?,
        http: String::new(),
        data_dir: Some(data_dir.path().to_path_buf()),
        policy_dir: Some(args.policy_dir.clone()),
        ..ServeConfig::default()
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Ready>();
    let server = tokio::spawn(run_serve(
        config,
        async move {
            let _ = stop_rx.await;
        },
        move |ready: &Ready| {
            let _ = ready_tx.send(ready.clone());
        },
    ));
    let ready = match ready_rx.await {
        Ok(r) => r,
        Err(_) => {
            return Err(match server.await {
                Ok(Err(e)) => e.context("llumen serve failed to start"),
                Ok(Ok(())) => anyhow::anyhow!("llumen serve stopped before it was ready"),
                Err(e) => anyhow::anyhow!("llumen serve panicked: {e}"),
            })
        }
    };
    let client = Client::connect(ready.quic, &Trust::Fingerprint(ready.fingerprint.clone()))
        .await
        .context("connecting to llumen serve")?;
    let request = GenerateRequest::text("hi", 1);
    let (c, r) = (&client, &request);
    let samples = timed(args.warmup, args.requests, move || async move {
        let done = c.generate(r).await?.collect().await?;
        Ok(done.finish)
    })
    .await;
    client.close().await;
    let _ = stop_tx.send(());
    match tokio::time::timeout(Duration::from_secs(10), server).await {
        Ok(Ok(result)) => result.context("llumen serve")?,
        Ok(Err(e)) => anyhow::bail!("llumen serve panicked: {e}"),
        Err(_) => anyhow::bail!("llumen serve did not stop within 10 s"),
    }
    drop(data_dir);
    Ok((samples?, ready))
}

async fn measure(args: &Args) -> Result<Report> {
    let dir = tempfile::tempdir()?;
    let (identity, _) = tls::load_or_create_identity(dir.path())?;
    let trust = Trust::Fingerprint(identity.fingerprint.clone());
    let localhost: SocketAddr = "127.0.0.1:0".parse()?;

    let echo_server = tls::server_endpoint(localhost, &identity)?;
    let echo_addr = echo_server.local_addr()?;
    let echo_task = serve_streams(echo_server.clone(), |mut send, mut recv| async move {
        if let Ok(bytes) = recv.read_to_end(64 * 1024).await {
            if send.write_all(&bytes).await.is_ok() {
                let _ = send.finish();
            }
        }
    });
    eprintln!("quic-overhead: bare echo ...");
    let bare = bare_echo(echo_addr, &trust, args).await?;
    echo_server.close(0u32.into(), b"done");
    echo_task.abort();

    let stub_server = tls::server_endpoint(localhost, &identity)?;
    let stub_addr = stub_server.local_addr()?;
    let stub_task = serve_streams(stub_server.clone(), framing_stub);
    eprintln!("quic-overhead: llumen framing (stub server) ...");
    let framed = framing(stub_addr, &trust, args).await?;
    stub_server.close(0u32.into(), b"done");
    stub_task.abort();

    eprintln!("quic-overhead: llumen serve (tiny model, 1 instance) ...");
    let (served, ready) = serve(args).await?;
    let rtt: Vec<f64> = served.iter().map(|(t, _)| *t).collect();
    let server_total: Vec<f64> = served.iter().map(|(_, f)| f.total_us as f64).collect();
    let overhead: Vec<f64> = served.iter().map(|(t, f)| t - f.total_us as f64).collect();
    let completion_tokens = served.last().map_or(0, |(_, f)| f.completion_tokens);

    let bare = latency(&bare);
    let framing = latency(&framed);
    let overhead = latency(&overhead);
    let ratio = |a: f64, b: f64| ((a / b.max(1e-9)) * 100.0).round() / 100.0;
    Ok(Report {
        benchmark: "quic-overhead",
        requests: args.requests,
        warmup_requests: args.warmup,
        echo_request_bytes: ECHO_BYTES,
        generate_frame_bytes: protocol::encode(&Frame::Generate(GenerateRequest::text("hi", 1)))
            .len(),
        framing_vs_bare_p50: ratio(framing.p50_us, bare.p50_us),
        framing_vs_bare_mean: ratio(framing.mean_us, bare.mean_us),
        serve_overhead_vs_bare_p50: ratio(overhead.p50_us, bare.p50_us),
        serve_overhead_vs_bare_mean: ratio(overhead.mean_us, bare.mean_us),
        bare_echo: bare,
        framing,
        serve: Serve {
            client_rtt: latency(&rtt),
            server_total: latency(&server_total),
            overhead,
            completion_tokens,
            policies: ready.policies,
        },
    })
}

pub fn run(args: &Args) -> Result<()> {
    anyhow::ensure!(args.requests > 0, "--requests must be at least 1");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(measure(args))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

fn print_table(r: &Report) {
    eprintln!(
        "quic-overhead: loopback, one warm connection, {} sequential requests each (+{} warm-up); µs",
        r.requests, r.warmup_requests
    );
    eprintln!(
        "{:>34} | {:>8} {:>8} {:>8} {:>8}",
        "", "p50", "p99", "mean", "min"
    );
    let row = |label: &str, l: &Latency| {
        eprintln!(
            "{label:>34} | {:>8.1} {:>8.1} {:>8.1} {:>8.1}",
            l.p50_us, l.p99_us, l.mean_us, l.min_us
        )
    };
    row(
        &format!("(a) bare quinn echo, {} B", r.echo_request_bytes),
        &r.bare_echo,
    );
    row(
        &format!(
            "(b) llumen framing, stub ({} B req)",
            r.generate_frame_bytes
        ),
        &r.framing,
    );
    row("(c) llumen serve: client RTT", &r.serve.client_rtt);
    row("server total_us", &r.serve.server_total);
    row("RTT - server total", &r.serve.overhead);
    eprintln!(
        "(b)/(a): {:.2}x p50, {:.2}x mean; (c - server)/(a): {:.2}x p50, {:.2}x mean; serve policies: {}",
        r.framing_vs_bare_p50,
        r.framing_vs_bare_mean,
        r.serve_overhead_vs_bare_p50,
        r.serve_overhead_vs_bare_mean,
        r.serve.policies.join("; ")
    );
}
