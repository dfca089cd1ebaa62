//! `llumen-bench migration`: live migration of a running request between two
//! engine instances, KV cache and all, over a real QUIC loopback connection
//! (Llumnix §6.2's migration micro-benchmark).
//!
//! For every model and context length L:
//! - two engines (source and destination) over the same `LoadedModel`, each
//!   with a KV pool sized for the long request plus the short ones
//!   (`InstanceShape { num_blocks, block_size: 16 }`, `scheduler_config`);
//! - on the source, a greedy request with a prompt of L seeded pseudo-random
//!   token ids (shortened so that prompt + its decode budget fits the model's
//!   context; lengths over the context are skipped), installed as if
//!   prefilled with seeded synthetic KV through the engine's attach path
//!   (`--prefill-source`: a real prefill, minutes for SmolLM2 at 8k), then
//!   `--others` short requests decoding alongside; a few warm-up decode
//!   steps, then `--before-steps` timed ones;
//! - the long request migrates live. Each engine is then wrapped in an
//!   instance's core (`llumen_fleet::InstanceCore`, which serves the
//!   requests already in it), so the engine's `SourceMigration` /
//!   `DestinationMigration` run inside the cores, driven as the llumlet
//!   drives its core, on the host's clock (`clock::now_us`). The source
//!   side runs on this thread: `MigrateOut` starts it; between two engine
//!   steps (`turn` + `end_step`) it hands the destination's replies to the
//!   core and the core's messages to a tokio task, and keeps stepping (the
//!   request decodes during the pre-copy stages, the other requests all
//!   along). The destination runs on its own thread, idle by default; with
//!   `--destination-others N` it decodes N short requests of its own all
//!   along and, like a llumlet, takes the migration's messages only between
//!   its steps (applying them with `apply_inputs` before its next step, so
//!   that the commit can be stamped). Both follow the llumlet's scheduling
//!   hints (`llumen_host::process::threads`): a short kernel time slice while
//!   waiting and for the tokio workers, the default one while stepping.
//!   Every message crosses one QUIC stream of a warm loopback connection
//!   (the host's TLS identity and transport config,
//!   `migration::write_message` / `MessageReader` over `FrameReader`);
//! - after `Committed`, the destination's next step must emit the
//!   request's next token (the index continuing where the source stopped).
//!
//! Figures per length (the median of `--repeats` migrations, taken in
//! rounds over all lengths, by time out of
//! batch): the downtime the targets are about,
//! `detach_to_destination_commit_ms` (the request's time out of every
//! batch: from its detach at the source to its commit at the destination,
//! stamped when the destination's core returns from applying the commit,
//! before it replies; its next step carries the request); `downtime_ms`,
//! the source's view (the
//! outcome's detach → `Committed`, which adds the wait for the source's
//! current step to end before it reads the reply and frees the blocks),
//! `total_ms` (start → end), the stages and their blocks, KV
//! bytes moved; the baselines: `recompute_ms` (a prefill of the prompt on
//! the idle destination engine, what a migration by recompute costs; not
//! measured where predicted over `--recompute-budget-s`) and
//! `decode_step_ms` (median source step of the whole batch before the
//! migration); the others' slowdown: wall time per source step (step end to
//! step end, so the source's migration work between steps counts) before
//! the migration and during its pre-copy stages (same batch).
//!
//! Also, in the same run: bulk bandwidth on loopback of QUIC (the same
//! endpoints and transport config, migration-sized messages through
//! `write_message` / `MessageReader`; plus bare quinn `write_all`) against a
//! tokio `TcpStream` (length-prefixed messages), median of 3.
//!
//! What it must not touch: anything outside loopback and its temporary
//! directory; the host's server (only its public transport helpers).

use std::net::SocketAddr;
use std::sync::mpsc as smpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use llumen_engine::candle::CandleBackend;
use llumen_engine::{
    models, BlockId, DetachedSequence, Engine, MigrationConfig, MigrationId,
    MigrationMessage as Message, MigrationOutcome, MigrationResult, ModelBackend, ReleaseReason,
    Request, SamplingParams, SeqId, SourceState, TokenId,
};
use llumen_fleet::{CoreConfig, CoreEvent, Input, InstanceCore, MigrationReport, Turn};
use llumen_host::process::clock;
use llumen_host::process::model::{InstanceShape, LoadedModel, ModelChoice};
use llumen_host::process::threads;
use llumen_host::transport::migration::{write_message, MessageReader};
use llumen_host::transport::protocol::MAX_MIGRATION_CHUNK;
use llumen_host::transport::tls::{self, Trust};
use llumen_host::transport::wire::FrameReader;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc as tmpsc;

use crate::rng::Rng;

const BLOCK: usize = 16;
/// The migrated request.
const LONG: SeqId = 1;
/// Decode budget of the migrated request (it must not finish mid-migration).
const LONG_MAX_TOKENS: usize = 128;
const OTHER_PROMPT: usize = 32;
const OTHER_MAX_TOKENS: usize = 512;
/// Decode steps before the timed ones.
const WARMUP_STEPS: usize = 3;
/// Frame limit of migration streams (as the host reads them).
const MAX_FRAME: usize = MAX_MIGRATION_CHUNK + 64;

#[derive(clap::Args)]
pub struct Args {
    /// Models: `tiny` (random test model) and/or `smollm2` (skipped when its
    /// GGUF file is not installed).
    #[arg(long, value_delimiter = ',', default_value = "tiny,smollm2")]
    models: Vec<String>,
    /// Context lengths (prompt tokens of the migrated request).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "256,512,1024,2048,4096,8192"
    )]
    lengths: Vec<usize>,
    /// Short requests decoding alongside the migrated one.
    #[arg(long, default_value_t = 3)]
    others: usize,
    /// Short requests decoding on the destination all along. A busy
    /// destination takes the migration's messages only between its own
    /// steps, as a llumlet does, so the time out of batch then includes the
    /// rest of the step it was running when the `Commit` arrived. 0: an
    /// idle destination, the case the targets are stated for.
    #[arg(long, default_value_t = 0)]
    destination_others: usize,
    /// Decode steps timed before the migration.
    #[arg(long, default_value_t = 6)]
    before_steps: usize,
    /// Largest KV pool of one engine, MiB (longer contexts are skipped).
    #[arg(long, default_value_t = 2048)]
    max_pool_mib: usize,
    /// MiB sent per transport and run in the QUIC vs TCP bandwidth test.
    #[arg(long, default_value_t = 256)]
    transfer_mib: usize,
    /// Message size of the bandwidth test, MiB.
    #[arg(long, default_value_t = 8)]
    message_mib: usize,
    /// The recompute baseline (a prefill of the prompt on the destination)
    /// is skipped for a length when its predicted time (the last measured
    /// one scaled by the square of the length ratio) is over this many
    /// seconds: SmolLM2 takes over 3 minutes at 8k tokens on 2 cores.
    #[arg(long, default_value_t = 30.0)]
    recompute_budget_s: f64,
    /// Prefill the migrated request on the source for real instead of
    /// installing it with synthetic KV (seeded values; the same bytes to
    /// move and the same decode work, without the minutes of prefill).
    #[arg(long)]
    prefill_source: bool,
    /// Migrations measured per length, in rounds over all lengths; the run
    /// with the median time out of batch is reported (all runs' figures
    /// are listed with it). The recompute baseline is measured once.
    #[arg(long, default_value_t = 9)]
    repeats: usize,
    /// Print one JSON document on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize, Clone)]
struct LengthResult {
    length: usize,
    prompt_tokens: usize,
    /// Tokens of KV the request held when the migration started.
    context_tokens_at_start: usize,
    committed: bool,
    result: String,
    /// The outcome's `downtime_us`: detach → the source handles
    /// `Committed`. The source reads replies between two steps (as a
    /// llumlet does), so this includes the wait for the step of the other
    /// requests that was running when `Committed` arrived.
    downtime_ms: Option<f64>,
    total_ms: f64,
    stages: usize,
    blocks_per_stage: Vec<u32>,
    /// Send → acknowledgement of every stage (the last: → `Committed`).
    stage_ms: Vec<Option<f64>>,
    /// KV bytes copied (all stages).
    bytes: u64,
    last_stage_bytes: u64,
    /// Encoded message bytes that crossed QUIC, both directions.
    wire_bytes: u64,
    /// bytes / total_ms.
    effective_mb_per_s: f64,
    /// Detach → the destination's commit (one process, one clock): the
    /// request's time out of every batch, the downtime the targets are
    /// about (after the commit the destination's next step carries it).
    detach_to_destination_commit_ms: Option<f64>,
    /// `detach_to_destination_commit_ms` of every repeat of this length
    /// (this result is the median one); `None` for a run that did not
    /// commit.
    out_of_batch_runs_ms: Vec<Option<f64>>,
    /// The outcome of every repeat that did not commit (the targets
    /// require none).
    runs_not_committed: Vec<String>,
    /// Detach → the destination's first token of the request.
    detach_to_destination_token_ms: Option<f64>,
    /// The destination's first token carried the next index.
    destination_continued: bool,
    /// Time on the source thread in the migration's work between steps: the
    /// core applying the start and the replies, and ending each step (the
    /// state machine's exports, the core's bookkeeping), messages encoded
    /// (see `run_source`).
    source_migration_work_ms: f64,
    /// Time on the destination thread handling messages (decoding, imports).
    destination_migration_work_ms: f64,
    /// Prefill of the prompt alone on the (idle) destination engine: what a
    /// migration by recompute costs. `None`: over `--recompute-budget-s`.
    recompute_ms: Option<f64>,
    /// Why `recompute_ms` is missing.
    recompute_note: Option<String>,
    /// The request's own prefill on the source (`--prefill-source`); without
    /// it the request is installed with synthetic KV.
    source_prefill_ms: Option<f64>,
    /// Median source step (the long request + the others) before migrating.
    decode_step_ms: f64,
    recompute_in_decode_steps: Option<f64>,
    /// Mean wall time per source step (end to end) before the migration.
    others_step_ms_before: f64,
    /// The same during the pre-copy stages (the long request still decoding
    /// in the batch); `None` when no step fell in them.
    others_step_ms_during: Option<f64>,
    steps_during: usize,
    /// others_step_ms_during / others_step_ms_before − 1, percent.
    others_slowdown_pct: Option<f64>,
    /// Source steps between detach and the end (the batch without the
    /// long request), mean wall time.
    steps_after_detach: usize,
    others_step_ms_after_detach: Option<f64>,
    /// With `--destination-others`: the destination's steps of its own
    /// requests before the commit, how many and their median.
    destination_steps_before_commit: usize,
    destination_step_ms: Option<f64>,
    /// The target: time out of batch (detach → destination commit) below
    /// `decode_step_ms`, migration committed.
    downtime_below_decode_step: bool,
    /// The source's view (`downtime_ms`) below `decode_step_ms`.
    source_view_below_decode_step: bool,
}

#[derive(Serialize)]
struct Skipped {
    length: usize,
    reason: String,
}

#[derive(Serialize)]
struct ModelReport {
    model: String,
    /// Set (and nothing measured) when the model is not available.
    skipped: Option<String>,
    backend: String,
    max_context: usize,
    kv_bytes_per_token: usize,
    results: Vec<LengthResult>,
    skipped_lengths: Vec<Skipped>,
    /// Of the time out of batch (`detach_to_destination_commit_ms`)
    /// across the lengths (committed migrations).
    downtime: Option<Spread>,
    /// The target: every migration committed, and the time out of batch's
    /// max and min within ±20% of its mean.
    downtime_flat: Option<bool>,
    /// Of the source's view `downtime_ms` (not a target: it includes the
    /// wait for the source's current step, see the field).
    source_view: Option<Spread>,
}

/// Spread of a figure across lengths.
#[derive(Serialize)]
struct Spread {
    min_ms: f64,
    mean_ms: f64,
    max_ms: f64,
    /// max and min within ±20% of the mean.
    flat: bool,
}

fn spread(values: &[f64]) -> Option<Spread> {
    let avg = mean(values)?;
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Some(Spread {
        min_ms: round(lo, 3),
        mean_ms: round(avg, 3),
        max_ms: round(hi, 3),
        flat: hi <= 1.2 * avg && lo >= 0.8 * avg,
    })
}

#[derive(Serialize)]
struct ConfigReport {
    block_size: usize,
    last_stage_max_blocks: usize,
    max_precopy_stages: u32,
    reserve_slack_blocks: usize,
    long_request_max_tokens: usize,
    other_requests: usize,
    other_prompt_tokens: usize,
    other_max_tokens: usize,
    /// `--destination-others`: requests decoding on the destination.
    destination_other_requests: usize,
    warmup_steps: usize,
    before_steps: usize,
    /// The slice the transport's and the waiting engines' threads ask for
    /// (`llumen_host::process::threads`, `LLUMEN_SHORT_SLICE_US`), µs; 0: off.
    short_slice_us: u64,
}

#[derive(Serialize)]
struct Report {
    benchmark: &'static str,
    threads: usize,
    config: ConfigReport,
    models: Vec<ModelReport>,
    transfer_bytes: usize,
    message_bytes: usize,
    /// QUIC through the migration path (`write_message` / `MessageReader`).
    quic_mb_per_s: f64,
    /// QUIC, bare `write_all` / `read_chunk` (no llumen framing).
    quic_raw_mb_per_s: f64,
    tcp_mb_per_s: f64,
    quic_tcp_ratio: f64,
    /// Targets: the time out of batch (`detach_to_destination_commit_ms`)
    /// below `decode_step_ms` at every length (and every migration
    /// committed); `downtime_flat` for every model; QUIC at least half of
    /// TCP's bandwidth.
    downtime_below_decode_step: bool,
    downtime_flat: bool,
    quic_at_least_half_tcp: bool,
    /// Not targets: the same two checks on the source's view `downtime_ms`
    /// (which adds the source's wait for its current step to end before
    /// it reads `Committed` and frees the blocks).
    source_view_below_decode_step: bool,
    source_view_flat: bool,
    notes: Vec<String>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

fn prompt(seed: u64, len: usize, vocab: usize) -> Vec<TokenId> {
    let mut rng = Rng::new(seed);
    (0..len).map(|_| rng.below(vocab as u32)).collect()
}

fn request(id: SeqId, prompt: Vec<TokenId>, max_tokens: usize) -> Request {
    Request {
        id,
        prompt,
        sampling: SamplingParams::greedy(max_tokens as u32),
        priority: 0,
        headroom_blocks: 0,
        arrival_us: clock::now_us(),
    }
}

// ---------------------------------------------------------------------------
// QUIC plumbing
// ---------------------------------------------------------------------------

/// Both ends of one warm loopback QUIC connection.
struct Link {
    _server: quinn::Endpoint,
    client_endpoint: quinn::Endpoint,
    /// The source's side (it opens the streams).
    client: quinn::Connection,
    /// The destination's side.
    server: quinn::Connection,
}

async fn connect(dir: &std::path::Path) -> Result<Link> {
    let (identity, _) = tls::load_or_create_identity(dir)?;
    let trust = Trust::Fingerprint(identity.fingerprint.clone());
    let server = tls::server_endpoint("127.0.0.1:0".parse()?, &identity)?;
    let addr: SocketAddr = server.local_addr()?;
    let client_endpoint = tls::client_endpoint(addr, &trust)?;
    let accept = {
        let server = server.clone();
        tokio::spawn(async move {
            let incoming = server.accept().await.context("server endpoint closed")?;
            Ok::<_, anyhow::Error>(incoming.await?)
        })
    };
    // The configuration live migration uses (migration::MigrationTransport).
    let client = client_endpoint
        .connect_with(
            tls::migration_client_config(&trust, addr)?,
            addr,
            tls::SERVER_NAME,
        )?
        .await?;
    let server_conn = accept.await??;
    Ok(Link {
        _server: server,
        client_endpoint,
        client,
        server: server_conn,
    })
}

/// The source's end of one migration stream: messages from the source
/// thread go out, replies come back to it.
async fn source_stream(
    conn: quinn::Connection,
    mut out: tmpsc::UnboundedReceiver<Vec<u8>>,
    replies_tx: smpsc::Sender<Vec<u8>>,
) -> Result<()> {
    let (mut send, recv) = conn.open_bi().await?;
    let mut replies = MessageReader::new(FrameReader::new(recv, MAX_FRAME));
    let mut sending = true;
    loop {
        tokio::select! {
            m = out.recv(), if sending => match m {
                Some(bytes) => write_message(&mut send, bytes).await?,
                None => {
                    sending = false;
                    let _ = send.finish();
                }
            },
            r = replies.next() => match r.map_err(|e| anyhow!(e))? {
                Some(bytes) => {
                    if replies_tx.send(bytes).is_err() {
                        return Ok(());
                    }
                }
                None => return Ok(()),
            },
        }
    }
}

/// The destination's end: messages go to the destination thread, its
/// replies go back on the stream.
async fn destination_stream(
    conn: quinn::Connection,
    to_dst: smpsc::Sender<Vec<u8>>,
    mut replies: tmpsc::UnboundedReceiver<Vec<u8>>,
) -> Result<()> {
    let (mut send, recv) = conn.accept_bi().await?;
    let mut messages = MessageReader::new(FrameReader::new(recv, MAX_FRAME));
    let mut to_dst = Some(to_dst);
    loop {
        tokio::select! {
            m = messages.next(), if to_dst.is_some() => match m.map_err(|e| anyhow!(e))? {
                Some(bytes) => {
                    if let Some(tx) = &to_dst {
                        let _ = tx.send(bytes);
                    }
                }
                // The source is done: let the destination thread finish.
                None => to_dst = None,
            },
            r = replies.recv() => match r {
                Some(bytes) => write_message(&mut send, bytes).await?,
                None => {
                    let _ = send.finish();
                    return Ok(());
                }
            },
        }
    }
}

// ---------------------------------------------------------------------------
// Bandwidth: QUIC vs TCP
// ---------------------------------------------------------------------------

async fn quic_transfer(link: &Link, total: usize, msg: usize, framed: bool) -> Result<Duration> {
    let n = total / msg;
    let server = link.server.clone();
    let receiver = tokio::spawn(async move {
        let (_send, mut recv) = server.accept_bi().await?;
        let mut bytes = 0usize;
        if framed {
            let mut reader = MessageReader::new(FrameReader::new(recv, MAX_FRAME));
            while let Some(m) = reader.next().await.map_err(|e| anyhow!(e))? {
                bytes += m.len();
            }
        } else {
            while let Some(chunk) = recv.read_chunk(1 << 20, true).await? {
                bytes += chunk.bytes.len();
            }
        }
        Ok::<_, anyhow::Error>((bytes, Instant::now()))
    });
    let message = bytes::Bytes::from(vec![0xa5u8; msg]);
    let started = Instant::now();
    let (mut send, _recv) = link.client.open_bi().await?;
    for _ in 0..n {
        if framed {
            write_message(&mut send, message.clone()).await?;
        } else {
            send.write_all(&message).await?;
        }
    }
    send.finish()?;
    let (bytes, done) = receiver.await??;
    ensure!(
        bytes == n * msg,
        "QUIC received {bytes} of {} bytes",
        n * msg
    );
    Ok(done - started)
}

async fn tcp_transfer(total: usize, msg: usize) -> Result<Duration> {
    let n = total / msg;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let receiver = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await?;
        let mut bytes = 0usize;
        loop {
            let mut len = [0u8; 8];
            match stream.read_exact(&mut len).await {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(e.into()),
            }
            let mut m = vec![0u8; u64::from_le_bytes(len) as usize];
            stream.read_exact(&mut m).await?;
            bytes += m.len();
        }
        Ok::<_, anyhow::Error>((bytes, Instant::now()))
    });
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let message = vec![0xa5u8; msg];
    let started = Instant::now();
    for _ in 0..n {
        stream.write_all(&(msg as u64).to_le_bytes()).await?;
        stream.write_all(&message).await?;
    }
    stream.shutdown().await?;
    let (bytes, done) = receiver.await??;
    ensure!(
        bytes == n * msg,
        "TCP received {bytes} of {} bytes",
        n * msg
    );
    Ok(done - started)
}

struct Bandwidth {
    quic: f64,
    quic_raw: f64,
    tcp: f64,
}

async fn bandwidth(link: &Link, total: usize, msg: usize) -> Result<Bandwidth> {
    let mbps = |d: Duration| total as f64 / d.as_secs_f64() / 1e6;
    // Warm the connection (slow start) with one untimed transfer.
    quic_transfer(link, msg * 4, msg, true).await?;
    let (mut quic, mut raw, mut tcp) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..3 {
        quic.push(mbps(quic_transfer(link, total, msg, true).await?));
        raw.push(mbps(quic_transfer(link, total, msg, false).await?));
        tcp.push(mbps(tcp_transfer(total, msg).await?));
    }
    Ok(Bandwidth {
        quic: median(&quic),
        quic_raw: median(&raw),
        tcp: median(&tcp),
    })
}

// ---------------------------------------------------------------------------
// One migration
// ---------------------------------------------------------------------------

/// The source instance's id (its core), as the destination's core sees it.
const SOURCE: u32 = 0;
/// The destination instance's id, as the source's core sees it.
const DESTINATION: u32 = 1;
/// The one migration of a run.
const MIGRATION: MigrationId = 1;

/// Carries the core's messages for its peer to the migration stream
/// (encoded; their bytes are counted), showing each to `seen` first.
fn transmit(
    core: &mut InstanceCore<CandleBackend>,
    link: &tmpsc::UnboundedSender<Vec<u8>>,
    wire_bytes: &mut u64,
    mut seen: impl FnMut(&Message),
) {
    while let Some(t) = core.poll_transmit() {
        seen(&t.message);
        let b = t.message.encode();
        *wire_bytes += b.len() as u64;
        let _ = link.send(b);
    }
}

/// What the destination thread saw.
#[derive(Default)]
struct DestinationSide {
    committed_us: Option<u64>,
    first_token_us: Option<u64>,
    first_token_index: Option<u32>,
    work: Duration,
    released: Option<String>,
    /// Durations of the destination's steps of its own requests before the
    /// commit (a busy destination), ms.
    steps_before_commit: Vec<f64>,
}

impl DestinationSide {
    /// Notes why the migration's reservation went away without a commit.
    /// The core does not report a release, so it is read from the core and
    /// the message flow: the reservation was there (`reserved`), now it is
    /// not and no `MovedIn` came; `why` is the cause of that call, one of
    /// the engine's three release reasons (the source's `Abort` it just
    /// applied, the `Refused` it just replied, or else its idle timeout).
    fn note_release(
        &mut self,
        core: &InstanceCore<CandleBackend>,
        reserved: &mut bool,
        why: ReleaseReason,
    ) {
        if core.is_incoming(MIGRATION) {
            *reserved = true;
        } else if std::mem::take(reserved) && self.committed_us.is_none() {
            self.released.get_or_insert_with(|| format!("{why:?}"));
        }
    }
}

/// The destination thread, as a llumlet's turn: takes every message that
/// has arrived and hands each to the core (`apply_inputs`, so that the
/// commit is stamped before any step), then steps its batch if it has one
/// (`--destination-others`) or once after the commit (the request's next
/// token); with nothing to step it waits for the next message. Ends when
/// the stream closes.
fn run_destination(
    core: &mut InstanceCore<CandleBackend>,
    rx: smpsc::Receiver<Vec<u8>>,
    tx: tmpsc::UnboundedSender<Vec<u8>>,
    wire_bytes: &mut u64,
) -> Result<DestinationSide> {
    let mut side = DestinationSide::default();
    // Requests of its own (not the migrated one) keep it stepping.
    let busy = |core: &InstanceCore<CandleBackend>| {
        let s = core.engine().scheduler();
        s.running_ids().iter().any(|&r| r != LONG) || s.waiting_ids().iter().any(|&r| r != LONG)
    };
    // The migration held a reservation here after the last look.
    let mut reserved = false;
    let mut closed = false;
    while !closed {
        let awaiting_first_token = side.committed_us.is_some() && side.first_token_us.is_none();
        let mut inbox = Vec::new();
        if !busy(core) && !awaiting_first_token {
            // As a llumlet: waiting, it asks to wake promptly.
            threads::latency_critical();
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(b) => inbox.push(b),
                Err(smpsc::RecvTimeoutError::Timeout) => {}
                Err(smpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(b) => inbox.push(b),
                Err(smpsc::TryRecvError::Empty) => break,
                Err(smpsc::TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        // Due timeouts (a reservation its source left silent is freed).
        core.apply_inputs(clock::now_us());
        while core.poll_event().is_some() {}
        transmit(core, &tx, wire_bytes, |_| {});
        side.note_release(core, &mut reserved, ReleaseReason::Timeout);
        // One message at a time, as the state machine took them: the
        // commit's stamp and a release's cause belong to one message.
        for bytes in inbox {
            let started = Instant::now();
            let message = Message::decode(&bytes).context("destination: undecodable message")?;
            drop(bytes);
            let abort = match message {
                Message::Abort { reason, .. } => Some(reason),
                _ => None,
            };
            core.input(Input::Message {
                peer: SOURCE,
                message,
            });
            core.apply_inputs(clock::now_us());
            // The request is in this engine's batch from here on; replying
            // to the source is not part of its time out of batch.
            let applied_us = clock::now_us();
            while let Some(e) = core.poll_event() {
                if let CoreEvent::MovedIn { request: LONG, .. } = e {
                    side.committed_us = Some(applied_us);
                }
            }
            let mut refused = None;
            transmit(core, &tx, wire_bytes, |m| {
                if let Message::Refused { reason, .. } = m {
                    refused = Some(*reason);
                }
            });
            let why = match (refused, abort) {
                (Some(r), _) => ReleaseReason::Refused(r),
                (None, Some(a)) => ReleaseReason::SourceAborted(a),
                (None, None) => ReleaseReason::Timeout,
            };
            side.note_release(core, &mut reserved, why);
            side.work += started.elapsed();
        }
        let awaiting_first_token = side.committed_us.is_some() && side.first_token_us.is_none();
        if busy(core) || awaiting_first_token {
            threads::compute();
            let started = Instant::now();
            let turn = core.turn(clock::now_us());
            let step_ms = ms(started.elapsed());
            match turn {
                Turn::Stepping { .. } => {
                    if side.committed_us.is_none() {
                        side.steps_before_commit.push(step_ms);
                    }
                    core.end_step(clock::now_us());
                }
                // A failed step is reported as `StepFailed` below.
                Turn::Idle | Turn::Stalled | Turn::Failed => {}
            }
            while let Some(e) = core.poll_event() {
                match e {
                    CoreEvent::Token {
                        request: LONG,
                        index,
                        ..
                    } if side.first_token_us.is_none() => {
                        side.first_token_us = Some(clock::now_us());
                        side.first_token_index = Some(index);
                    }
                    CoreEvent::StepFailed { message } => {
                        bail!("destination step failed: {message}")
                    }
                    _ => {}
                }
            }
            transmit(core, &tx, wire_bytes, |_| {});
        }
    }
    Ok(side)
}

struct SourceSide {
    outcome: MigrationOutcome,
    /// Wall time per step during pre-copy, and after detach.
    precopy_steps: Vec<f64>,
    detached_steps: Vec<f64>,
    work: Duration,
    /// The last token index of the request the source emitted.
    last_index: Option<u32>,
    context_at_start: usize,
}

/// Reads the source core's events: the request's tokens (`last_index`) and
/// the migration's end (`outcome`).
fn source_events(
    core: &mut InstanceCore<CandleBackend>,
    last_index: &mut Option<u32>,
    outcome: &mut Option<MigrationOutcome>,
) -> Result<()> {
    while let Some(e) = core.poll_event() {
        match e {
            CoreEvent::Token {
                request: LONG,
                index,
                ..
            } => *last_index = Some(index),
            CoreEvent::MigrationEnded {
                migration_id: MIGRATION,
                report,
                ..
            } => match *report {
                MigrationReport::Ended(o) => *outcome = Some(o),
                MigrationReport::NotStarted(why) => bail!("start: {why}"),
            },
            CoreEvent::StepFailed { message } => bail!("source step failed: {message}"),
            _ => {}
        }
    }
    Ok(())
}

/// The source side of one migration, on this thread, as a llumlet's turn
/// over the source's core: replies between steps, the engine stepping
/// throughout.
///
/// `work` (the source's migration work, `source_migration_work_ms`) is the
/// time, between the steps, of: the start (applying `MigrateOut`: the
/// `Reserve`); each batch of replies (decoding them, one `apply_inputs`
/// that hands them to the state machine and runs due timeouts); each
/// step's end (`end_step`: the state machine's view of the step, that is
/// the next stage's export or the detach and the last stage, plus the
/// core's own bookkeeping of the step's tokens and load snapshot); each
/// with its messages encoded and handed to the stream.
fn run_source(
    core: &mut InstanceCore<CandleBackend>,
    from_dst: smpsc::Receiver<Vec<u8>>,
    to_dst: tmpsc::UnboundedSender<Vec<u8>>,
    wire_bytes: &mut u64,
) -> Result<SourceSide> {
    let context_at_start = core
        .engine()
        .scheduler()
        .block_manager()
        .num_tokens(LONG)
        .unwrap_or(0);
    let (mut last_index, mut outcome) = (None, None);
    let mut work = Duration::ZERO;
    let t = Instant::now();
    core.input(Input::MigrateOut {
        migration_id: MIGRATION,
        request: LONG,
        peer: DESTINATION,
    });
    core.apply_inputs(clock::now_us());
    transmit(core, &to_dst, wire_bytes, |_| {});
    work += t.elapsed();
    source_events(core, &mut last_index, &mut outcome)?;
    let (mut precopy_steps, mut detached_steps) = (Vec::new(), Vec::new());
    let mut last_step_end = Instant::now();
    // Replies not applied yet.
    let mut inbox: Vec<Vec<u8>> = Vec::new();
    'migration: while outcome.is_none() {
        // Replies, between two steps: all that have arrived, and those that
        // arrive while they are applied (as the state machine took them
        // one by one until none was left).
        loop {
            loop {
                match from_dst.try_recv() {
                    Ok(b) => inbox.push(b),
                    Err(smpsc::TryRecvError::Empty) => break,
                    Err(smpsc::TryRecvError::Disconnected) => {
                        bail!("the migration stream broke")
                    }
                }
            }
            let timeout_due = core.poll_timeout().is_some_and(|d| d <= clock::now_us());
            if inbox.is_empty() && !timeout_due {
                break;
            }
            let t = Instant::now();
            for bytes in inbox.drain(..) {
                let message = Message::decode(&bytes).context("source: undecodable reply")?;
                core.input(Input::Message {
                    peer: DESTINATION,
                    message,
                });
            }
            core.apply_inputs(clock::now_us());
            transmit(core, &to_dst, wire_bytes, |_| {});
            work += t.elapsed();
            // The core counts a reply its state machine would not take and
            // goes on (a timeout would end the migration): here that is a
            // protocol error, as it always was for this bench.
            ensure!(
                core.stats().messages_refused == 0,
                "source: the state machine refused a reply of the destination"
            );
            source_events(core, &mut last_index, &mut outcome)?;
            if outcome.is_some() {
                break 'migration;
            }
        }
        let precopy = matches!(
            core.outgoing_state(MIGRATION),
            Some(SourceState::Reserving | SourceState::Copying { .. })
        );
        threads::compute();
        match core.turn(clock::now_us()) {
            Turn::Stepping { .. } => {
                // The step ran inside the turn: it ends now.
                let end = Instant::now();
                core.end_step(clock::now_us());
                transmit(core, &to_dst, wire_bytes, |_| {});
                work += end.elapsed();
                let wall = ms(end - last_step_end);
                last_step_end = end;
                if precopy {
                    precopy_steps.push(wall);
                } else {
                    detached_steps.push(wall);
                }
            }
            Turn::Idle | Turn::Stalled => {
                // Nothing to decode: wait for the next reply.
                transmit(core, &to_dst, wire_bytes, |_| {});
                source_events(core, &mut last_index, &mut outcome)?;
                if outcome.is_some() {
                    break;
                }
                threads::latency_critical();
                let now = clock::now_us();
                let wait = core.poll_timeout().map_or(Duration::from_millis(50), |d| {
                    Duration::from_micros(d.saturating_sub(now))
                });
                match from_dst.recv_timeout(wait) {
                    Ok(bytes) => inbox.push(bytes),
                    Err(smpsc::RecvTimeoutError::Timeout) => {}
                    Err(smpsc::RecvTimeoutError::Disconnected) => {
                        bail!("the migration stream broke")
                    }
                }
                last_step_end = Instant::now();
                continue;
            }
            // Reported as `StepFailed` (an error) below.
            Turn::Failed => {}
        }
        source_events(core, &mut last_index, &mut outcome)?;
    }
    Ok(SourceSide {
        outcome: outcome.context("the migration ended without an outcome")?,
        precopy_steps,
        detached_steps,
        work,
        last_index,
        context_at_start,
    })
}

/// Prefill of `prompt` alone in one step of `engine` (ms); the request is
/// left running with one output token.
fn prefill(
    engine: &mut Engine<CandleBackend>,
    id: SeqId,
    prompt: Vec<TokenId>,
    max_tokens: usize,
) -> Result<f64> {
    let len = prompt.len();
    engine.add(request(id, prompt, max_tokens), clock::now_us())?;
    let started = Instant::now();
    let report = engine.step(clock::now_us())?;
    let t = ms(started.elapsed());
    ensure!(
        report.tokens == len && report.batch_size == 1,
        "prefill step of {} tokens in {} sequences, expected {len} in 1",
        report.tokens,
        report.batch_size
    );
    Ok(t)
}

/// Installs the migrated request on `engine` as if prefilled: a prompt of
/// `prompt.len()` tokens, one output token, and seeded synthetic KV for the
/// prompt (f32 values in [-1, 1)), through the engine's attach path. The
/// migration moves the same bytes and decoding does the same work as after
/// a real prefill, without its cost (minutes for SmolLM2 at 8k on 2 cores).
fn install_synthetic(
    engine: &mut Engine<CandleBackend>,
    prompt: Vec<TokenId>,
    seed: u64,
) -> Result<()> {
    let kv_tokens = prompt.len();
    let blocks = kv_tokens.div_ceil(BLOCK);
    let floats = blocks * engine.backend().kv_bytes_per_block() / 4;
    let mut rng = Rng::new(seed);
    let mut kv = Vec::with_capacity(floats * 4);
    for _ in 0..floats {
        let x = (rng.next() >> 40) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0;
        kv.extend_from_slice(&x.to_le_bytes());
    }
    let first = *prompt.last().expect("non-empty prompt");
    let detached = DetachedSequence {
        id: LONG,
        prompt,
        output: vec![first],
        sampling: SamplingParams::greedy(LONG_MAX_TOKENS as u32),
        priority: 0,
        headroom_blocks: 0,
        arrival_us: clock::now_us(),
        preemptions: 0,
        tokens_recomputed: 0,
        block_size: BLOCK,
        // Only its length matters to `attach_with_kv` (blocks to reserve).
        block_table: vec![BlockId(0); blocks],
        kv_tokens,
    };
    engine.attach_with_kv(&detached, &kv, clock::now_us())?;
    Ok(())
}

/// `count` short requests, ids from `first_id`, seeded prompts.
fn add_others(
    engine: &mut Engine<CandleBackend>,
    count: usize,
    first_id: SeqId,
    vocab: usize,
) -> Result<()> {
    for i in 0..count as u64 {
        let id = first_id + i;
        let tokens = prompt(id, OTHER_PROMPT, vocab);
        engine.add(request(id, tokens, OTHER_MAX_TOKENS), clock::now_us())?;
    }
    Ok(())
}

fn measure_length(
    model: &LoadedModel,
    rt: &tokio::runtime::Runtime,
    link: &Link,
    args: &Args,
    length: usize,
    last_recompute: &mut Option<(usize, f64)>,
    measure_recompute: bool,
) -> Result<std::result::Result<LengthResult, String>> {
    let llama = model
        .llama_config()
        .with_context(|| format!("{} is not a transformer", model.name))?;
    let max_context = llama.max_position;
    if length > max_context {
        return Ok(Err(format!(
            "longer than the model's context ({max_context} tokens)"
        )));
    }
    if length == 0 {
        return Ok(Err("empty prompt".into()));
    }
    let prompt_tokens = length.min(max_context - LONG_MAX_TOKENS);
    let long_blocks = (prompt_tokens + LONG_MAX_TOKENS).div_ceil(BLOCK);
    let other_blocks = (OTHER_PROMPT + OTHER_MAX_TOKENS).div_ceil(BLOCK);
    // The requests, a migration's slack, and vLLM's 1% watermark on top.
    let used = long_blocks + args.others.max(args.destination_others) * other_blocks + 16;
    let num_blocks = used * 100 / 99 + 2;
    let kv_per_block = llama.kv_bytes_per_token() * BLOCK;
    if num_blocks * kv_per_block > args.max_pool_mib << 20 {
        return Ok(Err(format!(
            "a KV pool of {num_blocks} blocks ({} MiB) is over --max-pool-mib {}",
            (num_blocks * kv_per_block) >> 20,
            args.max_pool_mib
        )));
    }
    let shape = InstanceShape {
        num_blocks,
        block_size: BLOCK,
    };
    let sched = model.scheduler_config(&shape);
    let backend = |_: ()| model.backend(&shape).map_err(|e| anyhow!(e));
    let mut src = Engine::new(sched.clone(), backend(())?)?;
    let mut dst = Engine::new(sched, backend(())?)?;
    let vocab = llama.vocab;
    let long_prompt = prompt(0x5eed ^ length as u64, prompt_tokens, vocab);

    // Baseline: what a migration by recompute costs, a prefill of the
    // prompt on the destination (one output token: the request finishes
    // with its prefill and frees its blocks).
    let predicted_s = last_recompute
        .map(|(len, ms): (usize, f64)| ms / 1e3 * (prompt_tokens as f64 / len as f64).powi(2));
    let mut recompute_note = None;
    let recompute_ms = match predicted_s {
        _ if !measure_recompute => None,
        Some(p) if p > args.recompute_budget_s => {
            recompute_note = Some(format!(
                "recompute not measured: predicted {p:.0} s (from {:.1} s at {} tokens, scaled by the square of the length) is over --recompute-budget-s {}",
                last_recompute.map_or(0.0, |l| l.1 / 1e3),
                last_recompute.map_or(0, |l| l.0),
                args.recompute_budget_s
            ));
            None
        }
        _ => {
            let t = prefill(&mut dst, 999, long_prompt.clone(), 1)?;
            dst.abort(999);
            ensure!(
                dst.scheduler().is_idle(),
                "the destination still holds the recompute request"
            );
            *last_recompute = Some((prompt_tokens, t));
            Some(t)
        }
    };

    // A busy destination: its own requests, prefilled and warmed up.
    add_others(&mut dst, args.destination_others, 200, vocab)?;
    if args.destination_others > 0 {
        for _ in 0..=WARMUP_STEPS {
            dst.step(clock::now_us())?;
        }
    }

    // The source: the long request, then the others, decoding together.
    let source_prefill_ms = if args.prefill_source {
        Some(prefill(&mut src, LONG, long_prompt, LONG_MAX_TOKENS)?)
    } else {
        install_synthetic(&mut src, long_prompt, 0xc0ffee ^ length as u64)?;
        None
    };
    add_others(&mut src, args.others, 100, vocab)?;
    if args.others > 0 {
        src.step(clock::now_us())?;
    }
    for _ in 0..WARMUP_STEPS {
        src.step(clock::now_us())?;
    }
    let (mut step_ms, mut wall_ms) = (Vec::new(), Vec::new());
    let mut last = Instant::now();
    for _ in 0..args.before_steps.max(1) {
        let started = Instant::now();
        let r = src.step(clock::now_us())?;
        ensure!(
            r.batch_size == args.others + 1,
            "decode batch of {}",
            r.batch_size
        );
        let end = Instant::now();
        step_ms.push(ms(end - started));
        wall_ms.push(ms(end - last));
        last = end;
    }
    let decode_step_ms = median(&step_ms);
    let others_step_ms_before = mean(&wall_ms).unwrap_or(0.0);
    let outputs_before = src
        .scheduler()
        .sequence(LONG)
        .map(|s| s.output_tokens)
        .context("the long request is gone")?;

    // The migration, each engine wrapped in an instance's core (its
    // requests so far are served by it).
    let config = CoreConfig {
        migration: MigrationConfig::default(),
        idle_publish_us: None,
        ..Default::default()
    };
    let mut src = InstanceCore::new(SOURCE, src, config.clone());
    let mut dst = InstanceCore::new(DESTINATION, dst, config);
    let (src_out_tx, src_out_rx) = tmpsc::unbounded_channel();
    let (src_in_tx, src_in_rx) = smpsc::channel();
    let (dst_in_tx, dst_in_rx) = smpsc::channel();
    let (dst_out_tx, dst_out_rx) = tmpsc::unbounded_channel();
    let dst_task = rt.spawn(destination_stream(
        link.server.clone(),
        dst_in_tx,
        dst_out_rx,
    ));
    let src_task = rt.spawn(source_stream(link.client.clone(), src_out_rx, src_in_tx));
    let (mut src_wire, mut dst_wire) = (0u64, 0u64);
    let (source, destination) = std::thread::scope(|scope| {
        let dst_ref = &mut dst;
        let dst_wire = &mut dst_wire;
        let handle = scope.spawn(move || run_destination(dst_ref, dst_in_rx, dst_out_tx, dst_wire));
        let source = run_source(&mut src, src_in_rx, src_out_tx, &mut src_wire);
        let destination = handle
            .join()
            .map_err(|_| anyhow!("the destination thread panicked"));
        (source, destination)
    });
    let source = source?;
    let destination = destination??;
    rt.block_on(async {
        match tokio::time::timeout(Duration::from_secs(10), async {
            src_task.await??;
            dst_task.await??;
            Ok::<_, anyhow::Error>(())
        })
        .await
        {
            Ok(r) => r,
            Err(_) => bail!("the migration stream did not close"),
        }
    })?;

    let o = &source.outcome;
    let committed = o.committed();
    let result = match o.result {
        MigrationResult::Committed => "committed".to_string(),
        other => format!("{other:?} (destination: {:?})", destination.released),
    };
    let detached = o.detached_us;
    let since_detach = |t: Option<u64>| -> Option<f64> {
        Some(round(t?.saturating_sub(detached?) as f64 / 1e3, 3))
    };
    let downtime_ms = o.downtime_us.map(|d| round(d as f64 / 1e3, 3));
    let bytes = o.bytes_copied();
    let total_ms = (o.finished_us - o.started_us) as f64 / 1e3;
    // The destination's first token must carry the index after the last
    // one the source emitted.
    let expected_index = source.last_index.map_or(outputs_before as u32, |i| i + 1);
    let destination_continued = committed && destination.first_token_index == Some(expected_index);
    let others_step_ms_during = mean(&source.precopy_steps);
    Ok(Ok(LengthResult {
        length,
        prompt_tokens,
        context_tokens_at_start: source.context_at_start,
        committed,
        result,
        downtime_ms,
        total_ms: round(total_ms, 3),
        stages: o.num_stages(),
        blocks_per_stage: o.blocks_per_stage(),
        stage_ms: o
            .stages
            .iter()
            .map(|s| {
                s.acked_us
                    .map(|a| round(a.saturating_sub(s.sent_us) as f64 / 1e3, 3))
            })
            .collect(),
        bytes,
        last_stage_bytes: o.stages.iter().find(|s| s.last).map_or(0, |s| s.bytes),
        wire_bytes: src_wire + dst_wire,
        effective_mb_per_s: round(bytes as f64 / (total_ms / 1e3).max(1e-9) / 1e6, 1),
        detach_to_destination_commit_ms: since_detach(destination.committed_us),
        out_of_batch_runs_ms: Vec::new(),
        runs_not_committed: Vec::new(),
        detach_to_destination_token_ms: since_detach(destination.first_token_us),
        destination_continued,
        source_migration_work_ms: round(ms(source.work), 3),
        destination_migration_work_ms: round(ms(destination.work), 3),
        recompute_ms: recompute_ms.map(|t| round(t, 3)),
        recompute_note,
        source_prefill_ms: source_prefill_ms.map(|t| round(t, 3)),
        decode_step_ms: round(decode_step_ms, 3),
        recompute_in_decode_steps: recompute_ms.map(|t| round(t / decode_step_ms.max(1e-9), 1)),
        others_step_ms_before: round(others_step_ms_before, 3),
        others_step_ms_during: others_step_ms_during.map(|x| round(x, 3)),
        steps_during: source.precopy_steps.len(),
        others_slowdown_pct: others_step_ms_during
            .map(|d| round((d / others_step_ms_before.max(1e-9) - 1.0) * 100.0, 1)),
        steps_after_detach: source.detached_steps.len(),
        others_step_ms_after_detach: mean(&source.detached_steps).map(|x| round(x, 3)),
        destination_steps_before_commit: destination.steps_before_commit.len(),
        destination_step_ms: (!destination.steps_before_commit.is_empty())
            .then(|| round(median(&destination.steps_before_commit), 3)),
        downtime_below_decode_step: since_detach(destination.committed_us)
            .is_some_and(|d| committed && d < decode_step_ms),
        source_view_below_decode_step: downtime_ms.is_some_and(|d| committed && d < decode_step_ms),
    }))
}

fn measure_model(
    name: &str,
    rt: &tokio::runtime::Runtime,
    link: &Link,
    args: &Args,
) -> Result<ModelReport> {
    let choice = match name {
        "tiny" => ModelChoice::Tiny,
        "smollm2" => ModelChoice::Smollm2,
        other => bail!("unknown model {other:?} (expected tiny or smollm2)"),
    };
    let empty = |skipped: String| ModelReport {
        model: name.into(),
        skipped: Some(skipped),
        backend: String::new(),
        max_context: 0,
        kv_bytes_per_token: 0,
        results: Vec::new(),
        skipped_lengths: Vec::new(),
        downtime: None,
        downtime_flat: None,
        source_view: None,
    };
    if choice == ModelChoice::Smollm2 && models::smollm2_path().is_none() {
        let why = "SmolLM2-135M-Instruct is not installed (scripts/fetch-smollm2.sh or LLUMEN_SMOLLM2_GGUF): skipped".to_string();
        eprintln!("migration: {name}: {why}");
        return Ok(empty(why));
    }
    let model = LoadedModel::load(&choice).map_err(|e| anyhow!(e))?;
    let llama = model
        .llama_config()
        .with_context(|| format!("{name} is not a transformer"))?;
    let backend = model
        .backend(&InstanceShape {
            num_blocks: 1,
            block_size: BLOCK,
        })
        .map_err(|e| anyhow!(e))?
        .describe();
    let mut results = Vec::new();
    let mut skipped_lengths = Vec::new();
    // Ascending, so that each recompute time predicts the next.
    let mut lengths = args.lengths.clone();
    lengths.sort_unstable();
    lengths.dedup();
    let mut last_recompute = None;
    // Round after round over every length (not all repeats of one length
    // in a row): a slow spell of the machine then lands on all lengths
    // alike instead of posing as a dependence on the length.
    let mut runs: Vec<(usize, Vec<LengthResult>)> =
        lengths.iter().map(|&l| (l, Vec::new())).collect();
    for round in 0..args.repeats.max(1) {
        for (length, done) in runs.iter_mut() {
            if skipped_lengths
                .iter()
                .any(|s: &Skipped| s.length == *length)
            {
                continue;
            }
            let length = *length;
            eprintln!(
                "migration: {} L={length}, run {} of {} ...",
                model.name,
                round + 1,
                args.repeats.max(1)
            );
            // The recompute baseline once per length, in the first round
            // (ascending, so each time predicts the next).
            match measure_length(
                &model,
                rt,
                link,
                args,
                length,
                &mut last_recompute,
                round == 0,
            )? {
                Ok(r) => {
                    eprintln!(
                        "  {}, out of batch {:?} ms, total {:.1} ms, stages {:?} ms, destination work {:.1} ms",
                        r.result,
                        r.detach_to_destination_commit_ms,
                        r.total_ms,
                        r.stage_ms,
                        r.destination_migration_work_ms
                    );
                    done.push(r)
                }
                Err(reason) => {
                    eprintln!("  skipped: {reason}");
                    skipped_lengths.push(Skipped { length, reason })
                }
            }
        }
    }
    for (_, done) in runs {
        if !done.is_empty() {
            results.push(median_run(done));
        }
    }
    let committed = results.iter().filter(|r| r.committed);
    let source_view = spread(
        &committed
            .clone()
            .filter_map(|r| r.downtime_ms)
            .collect::<Vec<_>>(),
    );
    let downtime = spread(
        &committed
            .filter_map(|r| r.detach_to_destination_commit_ms)
            .collect::<Vec<_>>(),
    );
    let all_committed = results
        .iter()
        .all(|r| r.committed && r.runs_not_committed.is_empty());
    let flat = downtime.as_ref().map(|d| all_committed && d.flat);
    Ok(ModelReport {
        model: model.name.clone(),
        skipped: None,
        backend,
        max_context: llama.max_position,
        kv_bytes_per_token: llama.kv_bytes_per_token(),
        results,
        skipped_lengths,
        downtime,
        downtime_flat: flat,
        source_view,
    })
}

/// The run of one length with the median time out of batch (a run that
/// did not commit counts as the slowest), listing every run's, carrying
/// the recompute baseline of the first run.
fn median_run(mut runs: Vec<LengthResult>) -> LengthResult {
    let key = |r: &LengthResult| match r.detach_to_destination_commit_ms {
        Some(t) if r.committed => t,
        _ => f64::INFINITY,
    };
    let all: Vec<Option<f64>> = runs
        .iter()
        .map(|r| {
            r.committed
                .then_some(r.detach_to_destination_commit_ms)
                .flatten()
        })
        .collect();
    let runs_not_committed: Vec<String> = runs
        .iter()
        .enumerate()
        .filter(|(_, r)| !r.committed)
        .map(|(i, r)| format!("run {}: {}", i + 1, r.result))
        .collect();
    let (recompute_ms, recompute_note) = (runs[0].recompute_ms, runs[0].recompute_note.clone());
    runs.sort_by(|a, b| key(a).total_cmp(&key(b)));
    let mut chosen = runs.swap_remove(runs.len() / 2);
    chosen.out_of_batch_runs_ms = all;
    chosen.runs_not_committed = runs_not_committed;
    if !chosen.runs_not_committed.is_empty() {
        // A target met by the median run alone is not met.
        chosen.downtime_below_decode_step = false;
    }
    chosen.recompute_ms = recompute_ms;
    chosen.recompute_note = recompute_note;
    chosen.recompute_in_decode_steps =
        recompute_ms.map(|t| round(t / chosen.decode_step_ms.max(1e-9), 1));
    chosen
}

pub fn run(args: &Args) -> Result<()> {
    ensure!(
        args.message_mib > 0 && args.message_mib <= 64,
        "--message-mib must be in 1..=64"
    );
    ensure!(
        args.transfer_mib >= args.message_mib,
        "--transfer-mib must be at least --message-mib"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .on_thread_start(threads::latency_critical)
        .enable_all()
        .build()?;
    let dir = tempfile::tempdir()?;
    let link = rt.block_on(connect(dir.path()))?;

    let msg = args.message_mib << 20;
    let total = (args.transfer_mib << 20) / msg * msg;
    eprintln!(
        "migration: QUIC vs TCP bandwidth, {} MiB in {} MiB messages, median of 3 ...",
        total >> 20,
        args.message_mib
    );
    let bw = rt.block_on(bandwidth(&link, total, msg))?;

    let mut notes = Vec::new();
    let mut models = Vec::new();
    for name in &args.models {
        let m = measure_model(name, &rt, &link, args)?;
        if let Some(why) = &m.skipped {
            notes.push(format!("{name}: {why}"));
        }
        for s in &m.skipped_lengths {
            notes.push(format!("{} L={}: skipped, {}", m.model, s.length, s.reason));
        }
        for r in &m.results {
            if r.prompt_tokens != r.length {
                notes.push(format!(
                    "{} L={}: prompt shortened to {} tokens so that it and the request's {LONG_MAX_TOKENS} decode tokens fit the {}-token context",
                    m.model, r.length, r.prompt_tokens, m.max_context
                ));
            }
            if let Some(n) = &r.recompute_note {
                notes.push(format!("{} L={}: {n}", m.model, r.length));
            }
            for failed in &r.runs_not_committed {
                notes.push(format!(
                    "{} L={}: migration not committed, {failed}",
                    m.model, r.length
                ));
            }
            if r.committed && !r.destination_continued {
                notes.push(format!(
                    "{} L={}: the destination did not continue the request's token stream",
                    m.model, r.length
                ));
            }
        }
        models.push(m);
    }

    link.client.close(0u32.into(), b"done");
    rt.block_on(link.client_endpoint.wait_idle());

    let measured: Vec<&LengthResult> = models.iter().flat_map(|m| &m.results).collect();
    let quic_tcp_ratio = bw.quic / bw.tcp.max(1e-9);
    let report = Report {
        benchmark: "migration",
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        config: {
            let c = MigrationConfig::default();
            ConfigReport {
                block_size: BLOCK,
                last_stage_max_blocks: c.last_stage_max_blocks,
                max_precopy_stages: c.max_precopy_stages,
                reserve_slack_blocks: c.reserve_slack_blocks,
                long_request_max_tokens: LONG_MAX_TOKENS,
                other_requests: args.others,
                other_prompt_tokens: OTHER_PROMPT,
                other_max_tokens: OTHER_MAX_TOKENS,
                destination_other_requests: args.destination_others,
                warmup_steps: WARMUP_STEPS,
                before_steps: args.before_steps.max(1),
                short_slice_us: threads::short_slice_us(),
            }
        },
        transfer_bytes: total,
        message_bytes: msg,
        quic_mb_per_s: round(bw.quic, 1),
        quic_raw_mb_per_s: round(bw.quic_raw, 1),
        tcp_mb_per_s: round(bw.tcp, 1),
        quic_tcp_ratio: round(quic_tcp_ratio, 3),
        downtime_below_decode_step: !measured.is_empty()
            && measured.iter().all(|r| r.downtime_below_decode_step),
        downtime_flat: models
            .iter()
            .filter(|m| m.skipped.is_none() && !m.results.is_empty())
            .all(|m| m.downtime_flat == Some(true))
            && !measured.is_empty(),
        quic_at_least_half_tcp: quic_tcp_ratio >= 0.5,
        source_view_below_decode_step: !measured.is_empty()
            && measured.iter().all(|r| r.source_view_below_decode_step),
        source_view_flat: !measured.is_empty()
            && models
                .iter()
                .filter(|m| m.skipped.is_none() && !m.results.is_empty())
                .all(|m| {
                    m.results.iter().all(|r| r.committed)
                        && m.source_view.as_ref().is_some_and(|d| d.flat)
                }),
        models,
        notes,
    };
    print_table(&report);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}

fn print_table(r: &Report) {
    eprintln!();
    eprintln!(
        "migration: live migration over QUIC loopback ({} threads); last stage <= {} blocks, <= {} pre-copy stages; {} other requests decoding on the source, {} on the destination; transport and waiting engines' slice {}",
        r.threads,
        r.config.last_stage_max_blocks,
        r.config.max_precopy_stages,
        r.config.other_requests,
        r.config.destination_other_requests,
        match r.config.short_slice_us {
            0 => "the kernel's default (LLUMEN_SHORT_SLICE_US=0)".to_string(),
            us => format!("{us} µs"),
        }
    );
    for m in &r.models {
        if let Some(why) = &m.skipped {
            eprintln!("{}: {why}", m.model);
            continue;
        }
        eprintln!(
            "{} ({} B KV/token, context {}):",
            m.model, m.kv_bytes_per_token, m.max_context
        );
        eprintln!(
            "{:>6} {:>6} | {:>9} {:>8} {:>9} | {:>6} {:>18} {:>8} | {:>9} {:>9} {:>6} | {:>8} {:>8} {:>6}",
            "L", "prompt", "src-view", "downtime", "total", "stages", "blocks/stage", "MB",
            "recompute", "step", "rc/st", "before", "during", "slow%"
        );
        for x in &m.results {
            let opt = |v: Option<f64>, p: usize| v.map_or("-".to_string(), |v| format!("{v:.p$}"));
            eprintln!(
                "{:>6} {:>6} | {:>9} {:>8} {:>9.1} | {:>6} {:>18} {:>8.1} | {:>9} {:>9.2} {:>6} | {:>8.2} {:>8} {:>6}{}{}",
                x.length,
                x.prompt_tokens,
                opt(x.downtime_ms, 2),
                opt(x.detach_to_destination_commit_ms, 2),
                x.total_ms,
                x.stages,
                format!("{:?}", x.blocks_per_stage),
                x.bytes as f64 / 1e6,
                opt(x.recompute_ms, 1),
                x.decode_step_ms,
                opt(x.recompute_in_decode_steps, 1),
                x.others_step_ms_before,
                opt(x.others_step_ms_during, 2),
                opt(x.others_slowdown_pct, 1),
                x.destination_step_ms
                    .map_or(String::new(), |d| format!(" | dst step {d:.2}")),
                if x.committed { "" } else { "  NOT COMMITTED" }
            );
        }
        for s in &m.skipped_lengths {
            eprintln!("{:>6} skipped: {}", s.length, s.reason);
        }
        if let Some(d) = &m.downtime {
            eprintln!(
                "  downtime (out of batch: detach -> commit at the destination; median of {} runs per length) min {:.2} / mean {:.2} / max {:.2} ms: flat within ±20%: {}",
                m.results.first().map_or(0, |r| r.out_of_batch_runs_ms.len()),
                d.min_ms, d.mean_ms, d.max_ms,
                m.downtime_flat.unwrap_or(false)
            );
        }
        if let Some(d) = &m.source_view {
            eprintln!(
                "  source view (detach -> the source reads Committed between its steps): min {:.2} / mean {:.2} / max {:.2} ms: flat within ±20%: {}",
                d.min_ms, d.mean_ms, d.max_ms, d.flat
            );
        }
    }
    eprintln!(
        "bandwidth ({} MiB in {} MiB messages, median of 3): QUIC (migration framing) {:.0} MB/s, QUIC bare {:.0} MB/s, TCP {:.0} MB/s; QUIC/TCP {:.2}",
        r.transfer_bytes >> 20,
        r.message_bytes >> 20,
        r.quic_mb_per_s,
        r.quic_raw_mb_per_s,
        r.tcp_mb_per_s,
        r.quic_tcp_ratio
    );
    eprintln!(
        "targets: downtime < decode step: {}; downtime flat (±20%): {}; QUIC >= 0.5 x TCP: {}",
        r.downtime_below_decode_step, r.downtime_flat, r.quic_at_least_half_tcp
    );
    eprintln!(
        "(not targets) source view < decode step: {}; flat (±20%): {}",
        r.source_view_below_decode_step, r.source_view_flat
    );
    for n in &r.notes {
        eprintln!("note: {n}");
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    /// The bench's own path, outcomes only (no timing is asserted): on the
    /// test model, with an idle destination and with one busy with its own
    /// requests, the migration commits, the destination's first token of
    /// the request carries the next index, and the busy destination really
    /// stepped its batch while the migration ran.
    #[test]
    fn the_request_continues_on_an_idle_and_on_a_busy_destination() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let link = rt.block_on(connect(dir.path())).unwrap();
        for destination_others in [0, 2] {
            let n = destination_others.to_string();
            let args = Cli::parse_from([
                "migration",
                "--models",
                "tiny",
                "--lengths",
                "300",
                "--repeats",
                "1",
                "--others",
                "2",
                "--before-steps",
                "2",
                "--destination-others",
                &n,
            ])
            .args;
            let m = measure_model("tiny", &rt, &link, &args).unwrap();
            assert!(m.skipped.is_none() && m.skipped_lengths.is_empty());
            let [r] = &m.results[..] else {
                panic!("{} results", m.results.len())
            };
            assert!(r.committed, "{}", r.result);
            assert!(r.destination_continued, "destination_others {n}");
            assert_eq!(r.prompt_tokens, 300);
            // Every block the request held at the start moved (and any it
            // wrote since); the last stage at most the configured few.
            let blocks: u32 = r.blocks_per_stage.iter().sum();
            assert!(blocks as usize >= r.context_tokens_at_start.div_ceil(BLOCK));
            assert!(
                *r.blocks_per_stage.last().unwrap() as usize
                    <= MigrationConfig::default().last_stage_max_blocks
            );
            if destination_others == 0 {
                assert_eq!(r.destination_steps_before_commit, 0);
                assert!(r.destination_step_ms.is_none());
            } else {
                assert!(r.destination_steps_before_commit > 0);
                assert!(r.destination_step_ms.is_some());
            }
        }
    }
}
