//! `llumen-bench live`: a workload against a running llumen server, measured
//! from the client's side.
//!
//! **Owns**: sending a workload's requests at their arrival times (real
//! time) over llumen's QUIC API or the OpenAI HTTP API (streaming), one
//! stream per request, and recording what each client saw (time to first
//! token, finish, tokens, errors) as [`RequestRecord`]s; and, with
//! `--spawn` (the default when no `--server` is given), starting a fresh
//! `llumen serve` per policy on free loopback ports in a temporary data
//! directory, so that policies are compared on identical servers.
//! **Never touches**: the server's internals (only its public client API,
//! its `ready` line and `llumen status --json`), the workload generators
//! and the report (it hands them records).
//!
//! Prompts are token ids (seeded, inside the model's vocabulary) so that a
//! request carries exactly the workload's prompt length; outputs ignore
//! the end-of-sequence token so that it carries exactly its output length.
//! Lengths are clamped to `--max-prompt` / `--max-output` (the test model's
//! context is small) and the clamping is reported.
//!
//! On 2 cores a live comparison is noisy and order-dependent (the policy
//! that ran first was slower in back-to-back runs), so every server gets
//! `--warmup` short requests before the measured workload, and
//! `--repeats N` runs the policies N times in alternating order (forward,
//! reversed, …), each policy's records pooled over its runs.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use llumen_host::front::admin::AdminCommand;
use llumen_host::front::api::{GenerateEvent, GenerateRequest, PromptInput};
use llumen_host::front::client::{trust_from, Client};

use crate::record::{FleetRecord, RequestRecord, RequestSpec};
use crate::report;
use crate::rng::Rng;
use crate::workload::WorkloadSpec;

#[derive(clap::Args)]
pub struct Args {
    /// A running server's QUIC address (its data directory gives the trust:
    /// --data-dir). Without it, a `llumen serve` is started per policy.
    #[arg(long)]
    server: Option<SocketAddr>,
    /// The running server's data directory (certificate), with --server.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Policies to compare (each on a fresh spawned server, for every kind).
    #[arg(long, value_delimiter = ',', default_value = "llumnix,round-robin")]
    policies: Vec<String>,
    /// The `llumen` binary to spawn (default: next to this one).
    #[arg(long)]
    llumen: Option<PathBuf>,
    /// In-process instances of the spawned server.
    #[arg(long, default_value_t = 4)]
    instances: u32,
    /// Model of the spawned server.
    #[arg(long, default_value = "tiny")]
    model: String,
    /// KV blocks per instance of the spawned server (small = memory
    /// pressure, where load balancing shows: 32 blocks hold 512 tokens).
    #[arg(long, default_value_t = 32)]
    blocks: u32,
    /// More `llumen serve` flags, space-separated.
    #[arg(long, default_value = "")]
    serve_args: String,
    /// The workload (grammar: bench/src/workload.rs, e.g.
    /// `gamma:cv=4:rate=30;prompt=exp:64;output=exp:256`: bursty arrivals
    /// of long-lived requests, so that memory, not the shared CPU, is what
    /// an instance runs out of).
    #[arg(
        long,
        default_value = "gamma:cv=4:rate=30;prompt=exp:64;output=exp:256"
    )]
    workload: String,
    #[arg(long, default_value_t = 500)]
    requests: usize,
    /// Runs per policy, in alternating order (forward, reversed, ...); a
    /// policy's figures pool the records of all its runs.
    #[arg(long, default_value_t = 2)]
    repeats: u32,
    /// Short requests (16 prompt tokens, 8 output) sent to each server and
    /// awaited before the measured workload starts (not recorded).
    #[arg(long, default_value_t = 16)]
    warmup: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Fraction of high-priority requests (sent with priority 1).
    #[arg(long, default_value_t = 0.0)]
    high_priority: f64,
    /// Longest prompt sent (longer ones are clamped; prompt + output must fit
    /// one instance's blocks).
    #[arg(long, default_value_t = 192)]
    max_prompt: u32,
    #[arg(long, default_value_t = 300)]
    max_output: u32,
    /// Use the OpenAI HTTP API (`/v1/completions`, streaming) instead of QUIC.
    #[arg(long)]
    http: bool,
    /// Directory for results.json, results.csv and plots.
    #[arg(long, default_value = "target/bench/live")]
    out: PathBuf,
    /// Print one JSON document on stdout.
    #[arg(long)]
    json: bool,
}

/// Token ids used for prompts: inside every shipped model's vocabulary
/// (the test model's byte codec has 256 + specials; SmolLM2 49,152).
const PROMPT_TOKEN_RANGE: (u32, u32) = (32, 127);

pub fn run(args: &Args) -> Result<()> {
    let spec = WorkloadSpec::parse(&args.workload).map_err(|e| anyhow!("--workload: {e}"))?;
    let mut workload = spec
        .generate(args.requests, args.seed, args.high_priority)
        .map_err(|e| anyhow!("--workload: {e}"))?;
    let clamped = clamp(&mut workload, args.max_prompt, args.max_output);
    if clamped > 0 {
        eprintln!(
            "live: {clamped} of {} requests clamped to --max-prompt {} / --max-output {}",
            workload.len(),
            args.max_prompt,
            args.max_output
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if args.repeats == 0 {
        bail!("--repeats must be at least 1");
    }
    let targets: Vec<Option<String>> = if args.server.is_some() {
        vec![None]
    } else {
        args.policies.iter().cloned().map(Some).collect()
    };
    // Per target: its records and fleet figures, pooled over the repeats.
    let mut pooled: Vec<(Vec<RequestRecord>, FleetRecord)> =
        vec![(Vec::new(), FleetRecord::default()); targets.len()];
    for repeat in 0..args.repeats {
        let mut order: Vec<usize> = (0..targets.len()).collect();
        if repeat % 2 == 1 {
            order.reverse();
        }
        for &t in &order {
            let policy = &targets[t];
            let label = policy.clone().unwrap_or_else(|| "server".into());
            eprintln!(
                "live: {} requests of {} against {} (run {} of {}) ...",
                workload.len(),
                spec.name(),
                label,
                repeat + 1,
                args.repeats
            );
            let drive_args = DriveArgs {
                workload: &workload,
                use_http: args.http,
                instances: args.instances,
                warmup: args.warmup,
            };
            let (records, fleet) = match policy {
                None => {
                    let addr = args.server.expect("checked");
                    let dir = args
                        .data_dir
                        .clone()
                        .unwrap_or_else(llumen_host::front::client::default_data_dir);
                    rt.block_on(drive(addr, &dir, None, &drive_args))?
                }
                Some(p) => {
                    let server = Spawned::start(&ServeSpec::of(args), p)?;
                    let out = rt.block_on(drive(
                        server.quic,
                        server.dir.path(),
                        Some(server.http),
                        &drive_args,
                    ));
                    drop(server);
                    out?
                }
            };
            let (all, total) = &mut pooled[t];
            all.extend(records);
            total.pool(fleet);
        }
    }
    let mut results = Vec::new();
    for (policy, (records, fleet)) in targets.iter().zip(&pooled) {
        let label = policy.clone().unwrap_or_else(|| "server".into());
        let (records, fleet) = (records.as_slice(), fleet);
        let result = report::RunResult::new(
            report::RunMeta {
                policy: label,
                workload: spec.name(),
                rate: spec
                    .rate()
                    .unwrap_or_else(|| crate::workload::mean_rate(&workload)),
                seed: args.seed,
                instances: args.instances,
            },
            records,
            fleet,
        )
        .with_requests(records);
        results.push(result);
    }
    report::print_table(&results);
    report::write_all(&args.out, &results).context("writing the results")?;
    eprintln!("live: results in {}", args.out.display());
    if args.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    }
    Ok(())
}

/// Clamps lengths to what the server's model takes; how many changed.
pub(crate) fn clamp(workload: &mut [RequestSpec], max_prompt: u32, max_output: u32) -> usize {
    let mut n = 0;
    for r in workload.iter_mut() {
        let (p, o) = (
            r.prompt_tokens.clamp(1, max_prompt),
            r.output_tokens.clamp(1, max_output),
        );
        if (p, o) != (r.prompt_tokens, r.output_tokens) {
            n += 1;
        }
        r.prompt_tokens = p;
        r.output_tokens = o;
    }
    n
}

/// How to start a `llumen serve` for one policy.
pub(crate) struct ServeSpec {
    /// The binary (default: `llumen` next to this executable).
    pub llumen: Option<PathBuf>,
    pub model: String,
    pub instances: u32,
    pub blocks: u32,
    /// More flags, space-separated.
    pub serve_args: String,
}

impl ServeSpec {
    fn of(args: &Args) -> Self {
        Self {
            llumen: args.llumen.clone(),
            model: args.model.clone(),
            instances: args.instances,
            blocks: args.blocks,
            serve_args: args.serve_args.clone(),
        }
    }
}

/// A `llumen serve` started for one policy; killed when dropped.
pub(crate) struct Spawned {
    child: Child,
    dir: tempfile::TempDir,
    quic: SocketAddr,
    http: SocketAddr,
}

impl Spawned {
    pub(crate) fn start(args: &ServeSpec, policy: &str) -> Result<Spawned> {
        let llumen = match &args.llumen {
            Some(p) => p.clone(),
            None => std::env::current_exe()?
                .parent()
                .map(|d| d.join("llumen"))
                .context("no directory of this executable")?,
        };
        if !llumen.is_file() {
            bail!(
                "{} not found: build it (cargo build --release -p llumen-host) or pass --llumen",
                llumen.display()
            );
        }
        let dir = tempfile::tempdir()?;
        let mut cmd = Command::new(&llumen);
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"])
            .arg("--model")
            .arg(&args.model)
            .arg("--instances")
            .arg(args.instances.to_string())
            .arg("--blocks")
            .arg(args.blocks.to_string())
            .arg("--default-policy")
            .arg(policy)
            .arg("--data-dir")
            .arg(dir.path())
            .args(args.serve_args.split_whitespace())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(
                dir.path().join("serve.log"),
            )?));
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", llumen.display()))?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped"))
            .read_line(&mut line)
            .context("reading the server's ready line")?;
        let ready: serde_json::Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(_) => {
                let _ = child.kill();
                let log = std::fs::read_to_string(dir.path().join("serve.log")).unwrap_or_default();
                bail!("llumen serve did not start: {line:?}\n{log}");
            }
        };
        let addr = |k: &str| -> Result<SocketAddr> {
            ready[k]
                .as_str()
                .and_then(|s| s.parse().ok())
                .with_context(|| format!("ready line without {k}: {line}"))
        };
        Ok(Spawned {
            quic: addr("quic")?,
            http: addr("http")?,
            child,
            dir,
        })
    }
}

impl Spawned {
    /// Sends `workload` at its arrival times (real time) over QUIC after
    /// `warmup` short requests; the records and the fleet's figures.
    pub(crate) fn drive(
        &self,
        workload: &[RequestSpec],
        instances: u32,
        warmup: usize,
    ) -> Result<(Vec<RequestRecord>, FleetRecord)> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        rt.block_on(drive(
            self.quic,
            self.dir.path(),
            Some(self.http),
            &DriveArgs {
                workload,
                use_http: false,
                instances,
                warmup,
            },
        ))
    }

    /// The server's log so far (its stderr).
    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("serve.log")).unwrap_or_default()
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one run sends.
struct DriveArgs<'a> {
    workload: &'a [RequestSpec],
    use_http: bool,
    instances: u32,
    /// Short requests sent and awaited first (not recorded).
    warmup: usize,
}

/// Sends `warmup` short requests at once and waits for them: the server's
/// first steps (allocations, caches) and this client's connections are warm
/// before the clock starts. A failed warm-up request fails the run.
async fn warm_up(clients: &[Arc<Client>], warmup: usize) -> Result<()> {
    let mut tasks = Vec::with_capacity(warmup);
    for i in 0..warmup {
        let client = clients[i % clients.len()].clone();
        let spec = RequestSpec {
            id: u64::MAX - i as u64,
            arrival_us: 0,
            prompt_tokens: 16,
            output_tokens: 8,
            high_priority: false,
        };
        tasks.push(tokio::spawn(async move {
            one_quic(&client, spec, Instant::now()).await
        }));
    }
    for t in tasks {
        let rec = t.await?;
        if let Some(e) = rec.error {
            bail!("warm-up request failed: {e}");
        }
    }
    Ok(())
}

/// Warms the server up, then sends every request at its arrival time and
/// waits for all of them.
async fn drive(
    quic: SocketAddr,
    data_dir: &Path,
    http: Option<SocketAddr>,
    run: &DriveArgs<'_>,
) -> Result<(Vec<RequestRecord>, FleetRecord)> {
    let DriveArgs {
        workload,
        use_http,
        instances,
        warmup,
    } = *run;
    let trust = trust_from(data_dir, None, None);
    // A few connections, requests spread over them (one connection's
    // streams share one congestion controller and one task).
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(Arc::new(
            Client::connect(quic, &trust)
                .await
                .context("connecting to the server")?,
        ));
    }
    let http_addr = if use_http {
        Some(http.context("--http needs the server's HTTP address (spawned servers only)")?)
    } else {
        None
    };
    warm_up(&clients, warmup).await?;
    // The server's migration counters before and after the run (its admin
    // token from the data directory); the run's migrations are the
    // difference.
    let token = llumen_host::transport::tls::read_token(
        &data_dir.join(llumen_host::transport::tls::TOKEN_FILE),
    )
    .map_err(|e| anyhow!("the server's admin token (for its migration counters): {e}"))?;
    let migrations_before = migration_counts(&clients[0], &token).await?;
    let started = Instant::now();
    let wall = Instant::now();
    let mut tasks = Vec::with_capacity(workload.len());
    for (i, spec) in workload.iter().copied().enumerate() {
        let at = started + Duration::from_micros(spec.arrival_us);
        tokio::time::sleep_until(at.into()).await;
        let client = clients[i % clients.len()].clone();
        tasks.push(tokio::spawn(async move {
            match http_addr {
                Some(addr) => one_http(addr, spec, started).await,
                None => one_quic(&client, spec, started).await,
            }
        }));
    }
    let mut records = Vec::with_capacity(tasks.len());
    for t in tasks {
        records.push(t.await?);
    }
    let run_seconds = started.elapsed().as_secs_f64();
    let migrations_after = migration_counts(&clients[0], &token).await?;
    for c in clients {
        if let Ok(c) = Arc::try_unwrap(c) {
            c.close().await;
        }
    }
    let fleet = FleetRecord {
        // A fixed fleet for the whole run (the spawned server does not
        // scale unless --serve-args asks it to; then this is a lower bound).
        instance_seconds: f64::from(instances) * run_seconds,
        migrations_committed: migrations_after.0.saturating_sub(migrations_before.0),
        migrations_aborted: migrations_after.1.saturating_sub(migrations_before.1),
        run_seconds,
        wall_seconds: wall.elapsed().as_secs_f64(),
        ..FleetRecord::default()
    };
    Ok((records, fleet))
}

/// The server's live-migration counters so far (`llumen status`):
/// (committed, aborted).
async fn migration_counts(client: &Client, token: &str) -> Result<(u64, u64)> {
    let status = client
        .admin(token, &AdminCommand::Status, &[])
        .await
        .context("asking the server for its status")?;
    let count = |k: &str| {
        status["migrations"][k]
            .as_u64()
            .with_context(|| format!("the server's status has no migrations.{k}"))
    };
    Ok((count("committed")?, count("aborted")?))
}

/// The prompt of `spec`: seeded token ids.
fn prompt_of(spec: &RequestSpec) -> Vec<u32> {
    let mut rng = Rng::new(0x11fe ^ spec.id.wrapping_mul(0x9E37_79B9));
    let (lo, hi) = PROMPT_TOKEN_RANGE;
    (0..spec.prompt_tokens)
        .map(|_| lo + rng.below(hi - lo))
        .collect()
}

fn request_of(spec: &RequestSpec) -> GenerateRequest {
    let mut r = GenerateRequest::text("", spec.output_tokens);
    r.input = PromptInput::Tokens(prompt_of(spec));
    r.ignore_eos = true;
    r.priority = u8::from(spec.high_priority);
    r
}

fn blank(spec: &RequestSpec) -> RequestRecord {
    RequestRecord {
        id: spec.id,
        high_priority: spec.high_priority,
        arrival_us: spec.arrival_us,
        prompt_tokens: spec.prompt_tokens,
        output_tokens: 0,
        first_token_us: None,
        finish_us: None,
        preemptions: 0,
        preemption_loss_us: 0,
        migrations: 0,
        error: None,
    }
}

fn since(started: Instant) -> u64 {
    started.elapsed().as_micros() as u64
}

async fn one_quic(client: &Client, spec: RequestSpec, started: Instant) -> RequestRecord {
    let mut rec = blank(&spec);
    let mut stream = match client.generate(&request_of(&spec)).await {
        Ok(s) => s,
        Err(e) => {
            rec.error = Some(e.to_string());
            return rec;
        }
    };
    loop {
        match stream.next().await {
            Ok(Some(GenerateEvent::Tokens(chunk))) => {
                if rec.first_token_us.is_none() {
                    rec.first_token_us = Some(since(started));
                }
                rec.output_tokens += chunk.ids.len() as u32;
            }
            Ok(Some(GenerateEvent::Finished(f))) => {
                rec.finish_us = Some(since(started));
                rec.migrations = f.moves;
                return rec;
            }
            Ok(Some(GenerateEvent::Error(e))) => {
                rec.error = Some(e.to_string());
                return rec;
            }
            Ok(None) => {
                rec.error = Some("the stream ended without a final record".into());
                return rec;
            }
            Err(e) => {
                rec.error = Some(e.to_string());
                return rec;
            }
        }
    }
}

/// One streaming `/v1/completions` over a plain HTTP/1.1 connection.
async fn one_http(addr: SocketAddr, spec: RequestSpec, started: Instant) -> RequestRecord {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let mut rec = blank(&spec);
    let body = serde_json::json!({
        "model": "llumen",
        "prompt": prompt_of(&spec),
        "max_tokens": spec.output_tokens,
        "temperature": 0,
        "stream": true,
        "stream_options": {"include_usage": true},
        "ignore_eos": true,
        "priority": u8::from(spec.high_priority),
    })
    .to_string();
    let result: Result<()> = async {
        let mut conn = tokio::net::TcpStream::connect(addr).await?;
        conn.set_nodelay(true)?;
        let head = format!(
            "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        conn.write_all(head.as_bytes()).await?;
        conn.write_all(body.as_bytes()).await?;
        let mut lines = tokio::io::BufReader::new(conn).lines();
        let status = lines.next_line().await?.unwrap_or_default();
        if !status.contains(" 200 ") {
            let mut rest = String::new();
            while let Some(l) = lines.next_line().await? {
                rest.push_str(&l);
            }
            bail!("{status}: {rest}");
        }
        while let Some(line) = lines.next_line().await? {
            let Some(data) = line.strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                rec.finish_us = Some(since(started));
                return Ok(());
            }
            let v: serde_json::Value = serde_json::from_str(data)?;
            if let Some(err) = v.get("error") {
                bail!("{err}");
            }
            let text = v["choices"][0]["text"].as_str().unwrap_or("");
            if (!text.is_empty() || v["choices"][0]["finish_reason"].is_null())
                && rec.first_token_us.is_none()
            {
                rec.first_token_us = Some(since(started));
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                rec.output_tokens = n as u32;
            }
        }
        bail!("the event stream ended without [DONE]")
    }
    .await;
    if let Err(e) = result {
        rec.error = Some(e.to_string());
    }
    rec
}
