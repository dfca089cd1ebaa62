//! A seeded fault campaign over a multi-process fleet: `llumen serve` with
//! one in-process instance plus three `llumen instance --join` processes
//! (one of which drops its outgoing migration connections), the tiny model,
//! live migration every 100 ms. Faults, in a seeded order: an instance
//! process killed while idle, while decoding, as the source and as the
//! destination of a live migration; migration connections dropped between
//! two instances; the manager killed with SIGKILL and restarted on the same
//! data dir.
//!
//! For every request sent: it completes once, with the tokens the same
//! request gets from a fault-free server (greedy decoding, fixed
//! `max_tokens`), or its client gets a clear error (a typed server error,
//! or, for requests in flight when the manager died, the connection's
//! error, and then the journal lists them as interrupted). No request
//! hangs. At the end the surviving instances hold nothing.
//!
//! `LLUMEN_FAULT_SEED` changes the seed, `LLUMEN_FAULT_ROUNDS` runs every
//! kind of fault that many times (default 1).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Rng, Server};
use llumen_host::front::admin::AdminCommand;
use llumen_host::front::api::{GenerateRequest, ServeError};
use llumen_host::front::client::{Client, ClientError, Completion};
use llumen_store::{JournalEvent, JournalOutcome};

/// KV blocks of every instance: small, so that a round's requests fill
/// instances, preempt, and the migration policy moves requests.
const BLOCKS: usize = 96;
const REQUESTS_PER_ROUND: usize = 12;
/// Longest any request may take before it counts as hung.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// The manager's flush period is 1 s: a journal event is durable this
/// long after it was written.
const FLUSHED_AFTER: Duration = Duration::from_millis(1_600);
/// Base of the restart round's long requests' max_tokens (below 1,536,
/// the instances' context with 96 blocks, less the longest prompt: the
/// tiny model's prompts are one token per byte).
const LONG_BASE: u32 = 1_300;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillIdle,
    KillDecoding,
    KillMigrationSource,
    KillMigrationDestination,
    DropMigrationConnection,
    RestartManager,
}

impl Fault {
    const ALL: [Fault; 6] = [
        Fault::KillIdle,
        Fault::KillDecoding,
        Fault::KillMigrationSource,
        Fault::KillMigrationDestination,
        Fault::DropMigrationConnection,
        Fault::RestartManager,
    ];
    fn name(self) -> &'static str {
        match self {
            Fault::KillIdle => "kill_idle",
            Fault::KillDecoding => "kill_decoding",
            Fault::KillMigrationSource => "kill_migration_source",
            Fault::KillMigrationDestination => "kill_migration_destination",
            Fault::DropMigrationConnection => "drop_migration_connection",
            Fault::RestartManager => "restart_manager",
        }
    }
}

/// One request of the campaign. `max_tokens` is unique across the
/// campaign: the journal's `Accepted` record identifies the request.
#[derive(Clone, Debug)]
struct Spec {
    prompt: String,
    max_tokens: u32,
    round: usize,
}

impl Spec {
    fn request(&self) -> GenerateRequest {
        GenerateRequest::text(self.prompt.clone(), self.max_tokens)
    }
}

#[derive(Debug)]
enum Outcome {
    Completed(Completion),
    /// A typed error from the server.
    Typed(ServeError),
    /// The connection to the manager died.
    Connection(String),
    /// The client saw a broken stream (gap, repeat, no final record).
    Protocol(String),
    Hung,
}

impl Outcome {
    fn describe(&self) -> String {
        match self {
            Outcome::Completed(c) => format!("completed ({} tokens)", c.tokens.len()),
            Outcome::Typed(e) => format!("typed error: {e}"),
            Outcome::Connection(e) => format!("connection error: {e}"),
            Outcome::Protocol(e) => format!("broken stream: {e}"),
            Outcome::Hung => format!("hung (no end within {} s)", REQUEST_TIMEOUT.as_secs()),
        }
    }
}

struct Ended {
    spec: usize,
    outcome: Outcome,
    at: Instant,
}

struct Joined {
    child: Child,
    id: u32,
    drops: bool,
}

struct Fleet {
    server: Server,
    args: Vec<String>,
    token: String,
    admin: Client,
    joined: Vec<Joined>,
    dir: PathBuf,
    names: usize,
    logs: Vec<PathBuf>,
    /// Migration counters of earlier manager runs (a restart resets them).
    migrations_before: BTreeMap<String, u64>,
}

impl Fleet {
    async fn start(dir: &Path) -> Fleet {
        let args: Vec<String> = [
            "--instances",
            "1",
            "--blocks",
            &BLOCKS.to_string(),
            // Rounds on the period, not the step cadence.
            "--migration-every-steps",
            "0",
            "--migration-period-ms",
            "100",
            // A fixed fleet: the scaling round would drain the in-process
            // instance once the fleet idles (min/max instances count the
            // joined ones too).
            "--scaling-period-ms",
            "3600000",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let server = Server::start(
            &dir.join("data"),
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        let admin = server.client().await;
        let mut fleet = Fleet {
            token: server.token(),
            server,
            args,
            admin,
            joined: Vec::new(),
            dir: dir.to_path_buf(),
            names: 0,
            logs: Vec::new(),
            migrations_before: BTreeMap::new(),
        };
        fleet.join(false);
        fleet.join(false);
        fleet.join(true);
        fleet.wait_ready().await;
        fleet
    }

    /// Joins one more instance process; `drops`: its outgoing migrations
    /// close their connection after the first message.
    fn join(&mut self, drops: bool) {
        let name = format!(
            "instance-{}{}",
            self.names,
            if drops { "-drops" } else { "" }
        );
        self.names += 1;
        let env: &[(&str, &str)] = if drops {
            &[("LLUMEN_FAULT_MIGRATION_DROP_AFTER", "1")]
        } else {
            &[]
        };
        let (child, id, log) =
            common::join_instance_with(&self.server, &self.dir, &name, env, BLOCKS);
        self.logs.push(log);
        self.joined.push(Joined { child, id, drops });
    }

    async fn status(&self) -> serde_json::Value {
        common::status(&self.admin, &self.token).await
    }

    /// Waits until the manager lists exactly the in-process instance and
    /// the joined ones alive, each with a load (a killed one is gone).
    async fn wait_ready(&self) {
        let want: BTreeSet<u32> = self.joined.iter().map(|j| j.id).collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = self.status().await;
            let listed: Vec<&serde_json::Value> =
                s["instances"].as_array().unwrap().iter().collect();
            let remote: BTreeSet<u32> = listed
                .iter()
                .filter(|i| i["kind"] == "remote")
                .map(|i| i["instance"].as_u64().unwrap() as u32)
                .collect();
            if remote == want
                && listed.len() == want.len() + 1
                && listed.iter().all(|i| !i["load"].is_null())
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the fleet did not settle to {want:?}: {}",
                s["instances"]
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills joined instance `id` (SIGKILL).
    fn kill(&mut self, id: u32) {
        let at = self.joined.iter().position(|j| j.id == id).unwrap();
        let mut j = self.joined.remove(at);
        j.child.kill().unwrap();
        j.child.wait().unwrap();
    }

    /// Joined instances that behave (candidates for kills).
    fn plain(&self) -> Vec<u32> {
        self.joined
            .iter()
            .filter(|j| !j.drops)
            .map(|j| j.id)
            .collect()
    }

    fn dropper(&self) -> Option<u32> {
        self.joined.iter().find(|j| j.drops).map(|j| j.id)
    }

    fn migration_totals(&self, status: &serde_json::Value) -> BTreeMap<String, u64> {
        let mut out = self.migrations_before.clone();
        for k in ["started", "committed", "aborted", "not_started"] {
            *out.entry(k.to_string()).or_default() += status["migrations"][k].as_u64().unwrap_or(0);
        }
        out
    }

    /// Migration connections the dropping instances have cut so far.
    fn drops_logged(&self) -> usize {
        self.logs
            .iter()
            .filter(|l| l.to_string_lossy().contains("-drops"))
            .map(|l| {
                std::fs::read_to_string(l)
                    .unwrap_or_default()
                    .matches("fault injection: connection dropped")
                    .count()
            })
            .sum()
    }

    fn logs(&self) -> String {
        let mut out = format!("--- manager:\n{}", self.server.stderr());
        for l in &self.logs {
            out += &format!(
                "\n--- {}:\n{}",
                l.display(),
                std::fs::read_to_string(l).unwrap_or_default()
            );
        }
        out
    }
}

fn load_of(status: &serde_json::Value, id: u32) -> Option<&serde_json::Value> {
    status["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["instance"] == id)
        .map(|i| &i["load"])
}

fn count(load: Option<&serde_json::Value>, field: &str) -> u64 {
    load.and_then(|l| l[field].as_u64()).unwrap_or(0)
}

fn spawn_requests(
    client: &Arc<Client>,
    specs: &[Spec],
    which: &[usize],
) -> Vec<tokio::task::JoinHandle<Ended>> {
    which
        .iter()
        .enumerate()
        .map(|(k, &i)| {
            let client = client.clone();
            let request = specs[i].request();
            // Arrivals 20 ms apart: the dispatch policy sees the loads
            // change between them (all at once, every request would go to
            // the instance that was freest before the first).
            let delay = Duration::from_millis(20 * k as u64);
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let r = tokio::time::timeout(REQUEST_TIMEOUT, async {
                    client.generate(&request).await?.collect().await
                })
                .await;
                let outcome = match r {
                    Err(_) => Outcome::Hung,
                    Ok(Ok(c)) => Outcome::Completed(c),
                    Ok(Err(ClientError::Server(e))) => Outcome::Typed(e),
                    Ok(Err(ClientError::Protocol(p))) => Outcome::Protocol(p),
                    Ok(Err(e)) => Outcome::Connection(e.to_string()),
                };
                Ended {
                    spec: i,
                    outcome,
                    at: Instant::now(),
                }
            })
        })
        .collect()
}

async fn join_all(tasks: Vec<tokio::task::JoinHandle<Ended>>) -> Vec<Ended> {
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// What one injected fault did.
#[derive(Debug)]
struct Injected {
    fault: Fault,
    /// Whether the point was hit (the victim was decoding / migrating when
    /// killed); false: attempted only.
    hit: bool,
    note: String,
    /// The migration a kill aimed at: (request, source, destination).
    migration: Option<(u64, u32, u32)>,
}

/// A seeded round of requests: prompts of a few words, unique max_tokens.
fn round_specs(rng: &mut Rng, round: usize, used: &mut BTreeSet<u32>, fault: Fault) -> Vec<Spec> {
    // Long requests where the kill must find them running; the restart
    // round's run past the flush period.
    let (lo, hi) = match fault {
        Fault::RestartManager => (LONG_BASE as u64, LONG_BASE as u64 + 100),
        Fault::KillMigrationSource
        | Fault::KillMigrationDestination
        | Fault::DropMigrationConnection => (250, 650),
        Fault::KillIdle | Fault::KillDecoding => (100, 400),
    };
    const WORDS: [&str; 12] = [
        "alpha", "block", "cache", "decode", "engine", "fleet", "greedy", "host", "instance",
        "journal", "kernel", "llama",
    ];
    (0..REQUESTS_PER_ROUND)
        .map(|i| {
            let words: Vec<&str> = (0..rng.range(2, 9))
                .map(|_| WORDS[rng.below(WORDS.len() as u64) as usize])
                .collect();
            let max_tokens = loop {
                let m = rng.range(lo, hi) as u32;
                if used.insert(m) {
                    break m;
                }
            };
            Spec {
                prompt: format!("round {round} request {i}: {}", words.join(" ")),
                max_tokens,
                round,
            }
        })
        .collect()
}

/// Polls until `cond` holds on a status (true) or `within` passes (false).
async fn until(
    fleet: &Fleet,
    within: Duration,
    mut cond: impl FnMut(&serde_json::Value) -> bool,
) -> (bool, serde_json::Value) {
    let deadline = Instant::now() + within;
    loop {
        let s = fleet.status().await;
        if cond(&s) {
            return (true, s);
        }
        if Instant::now() >= deadline {
            return (false, s);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Without ANSI colour sequences.
fn plain_text(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Whether the manager logged migration `request` from `source` to
/// `destination` as committed.
fn committed_in_log(fleet: &Fleet, request: u64, source: u32, destination: u32) -> bool {
    let needle = format!("request={request} source={source} destination={destination}");
    plain_text(&fleet.server.stderr())
        .lines()
        .any(|l| l.contains("migration committed") && l.contains(&needle))
}

/// The in-process instance(s).
fn locals(status: &serde_json::Value) -> Vec<u32> {
    status["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["kind"] == "local")
        .map(|i| i["instance"].as_u64().unwrap() as u32)
        .collect()
}

async fn order_migration(fleet: &Fleet, source: u32, destination: u32) -> Result<u64, String> {
    fleet
        .admin
        .admin(
            &fleet.token,
            &AdminCommand::Migrate {
                source,
                destination,
                request: None,
            },
            &[],
        )
        .await
        .map(|v| v["started"].as_u64().unwrap_or(0))
        .map_err(|e| e.to_string())
}

/// Kills a joined instance while it takes part in a live migration, as its
/// source or as its destination. Migrations are ordered by hand (the admin
/// `migrate` command) between behaving instances; the kill comes as soon
/// as the victim's load shows the migration (`migrating_out` /
/// `migrating_in`), else right after an order. Hit: the victim's load
/// showed the migration at the kill, or the migration never committed.
async fn kill_mid_migration(fleet: &mut Fleet, rng: &mut Rng, as_source: bool) -> Injected {
    let fault = if as_source {
        Fault::KillMigrationSource
    } else {
        Fault::KillMigrationDestination
    };
    let field = if as_source {
        "migrating_out"
    } else {
        "migrating_in"
    };
    let mut orders = 0;
    let mut refusals: Vec<String> = Vec::new();
    let mut last: Option<(u64, u32, u32)> = None;
    for attempt in 0..80 {
        let s = fleet.status().await;
        let running = |i: &u32| count(load_of(&s, *i), "running");
        let mut plain = fleet.plain();
        rng.shuffle(&mut plain);
        let peers: Vec<u32> = locals(&s)
            .into_iter()
            .chain(plain.iter().copied())
            .collect();
        // Source: a busy instance (the victim when it is the source);
        // destination: the least busy other one (the victim otherwise).
        let pair = if as_source {
            plain
                .iter()
                .copied()
                .filter(|i| running(i) > 0)
                .max_by_key(running)
                .and_then(|v| {
                    peers
                        .iter()
                        .copied()
                        .filter(|&p| p != v)
                        .min_by_key(running)
                        .map(|d| (v, d))
                })
        } else {
            peers
                .iter()
                .copied()
                .filter(|i| running(i) > 0)
                .max_by_key(running)
                .and_then(|src| {
                    plain
                        .iter()
                        .copied()
                        .filter(|&p| p != src)
                        .min_by_key(running)
                        .map(|v| (src, v))
                })
        };
        let Some((source, destination)) = pair else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let victim = if as_source { source } else { destination };
        let last_try = attempt >= 60;
        let request = match order_migration(fleet, source, destination).await {
            Ok(r) => r,
            Err(e) => {
                // Busy (a policy migration runs there) or nothing to move yet.
                refusals.push(e);
                tokio::time::sleep(Duration::from_millis(10 + rng.below(20))).await;
                continue;
            }
        };
        orders += 1;
        last = Some((request, source, destination));
        if last_try {
            // Not caught in a load so far: kill right after the order.
            tokio::time::sleep(Duration::from_millis(rng.below(5))).await;
            fleet.kill(victim);
            return Injected {
                fault,
                hit: false,
                migration: None,
                note: format!(
                    "instance {victim} killed {} after ordering migration of request {request} {source} -> {destination} (load never showed one; {orders} orders)",
                    "right"
                ),
            }
            .judged(fleet, request, source, destination);
        }
        for _ in 0..60 {
            let s = fleet.status().await;
            if count(load_of(&s, victim), field) > 0 {
                fleet.kill(victim);
                return Injected {
                    fault,
                    hit: true,
                    migration: None,
                    note: format!(
                        "instance {victim} killed with {field} > 0 in its load (request {request} {source} -> {destination}, order {orders}, {} refused before)",
                        refusals.len()
                    ),
                }
                .judged(fleet, request, source, destination);
            }
            if common::migrations_in_flight(&s) == 0 {
                break; // over before the load showed it
            }
        }
    }
    // No migration could be ordered (nothing left to move): the point was
    // not reached; kill a behaving instance anyway, as an attempt.
    let plain = fleet.plain();
    let victim = plain[rng.below(plain.len() as u64) as usize];
    fleet.kill(victim);
    Injected {
        fault,
        hit: false,
        migration: None,
        note: format!(
            "instance {victim} killed without a migration to cut ({orders} orders, last {last:?}, {} refusals: {:?})",
            refusals.len(),
            refusals.last()
        ),
    }
}

impl Injected {
    /// Keeps the migration to judge once it has ended (see
    /// [`Injected::settle`]).
    fn judged(mut self, _fleet: &Fleet, request: u64, source: u32, destination: u32) -> Self {
        self.migration = Some((request, source, destination));
        self
    }

    /// After the round: a migration the kill was meant to cut that
    /// committed anyway means the kill came after it.
    fn settle(&mut self, fleet: &Fleet) {
        if let Some((request, source, destination)) = self.migration {
            if committed_in_log(fleet, request, source, destination) {
                self.hit = false;
                self.note += "; the migration had committed (missed)";
            } else {
                self.hit = true;
                self.note += "; the migration never committed (cut by the kill)";
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_fault_campaign_loses_no_request() {
    let wall = Instant::now();
    let seed = common::seed_from_env("LLUMEN_FAULT_SEED", 20_251_124);
    let rounds_per_kind = common::seed_from_env("LLUMEN_FAULT_ROUNDS", 1) as usize;
    let mut rng = Rng::new(seed);
    let mut kinds: Vec<Fault> = (0..rounds_per_kind).flat_map(|_| Fault::ALL).collect();
    rng.shuffle(&mut kinds);
    eprintln!("fault campaign: seed {seed}, order {:?}", kinds);

    let tmp = common::test_dir();
    let mut fleet = Fleet::start(tmp.path()).await;
    let mut specs: Vec<Spec> = Vec::new();
    let mut used_max_tokens = BTreeSet::new();
    let mut ended: Vec<Ended> = Vec::new();
    let mut injected: Vec<Injected> = Vec::new();
    // The restart rounds' checks, for the summary.
    let mut restart_notes: Vec<String> = Vec::new();
    // Specs whose clients lost the manager (and are in the journal).
    let mut interrupted_specs: BTreeSet<usize> = BTreeSet::new();

    for (round, &fault) in kinds.iter().enumerate() {
        let round_start = Instant::now();
        let first = specs.len();
        specs.extend(round_specs(&mut rng, round, &mut used_max_tokens, fault));
        let which: Vec<usize> = (first..specs.len()).collect();
        let client = Arc::new(fleet.server.client().await);
        let tasks;
        match fault {
            Fault::KillIdle => {
                let (clean, s) =
                    common::wait_clean(&fleet.admin, &fleet.token, Duration::from_secs(20)).await;
                assert!(clean, "not idle before the idle kill: {s}");
                let plain = fleet.plain();
                let victim = plain[rng.below(plain.len() as u64) as usize];
                fleet.kill(victim);
                // Requests at once: the manager still counts on the dead
                // instance until its connection times out.
                tasks = spawn_requests(&client, &specs, &which);
                injected.push(Injected {
                    fault,
                    hit: true,
                    note: format!(
                        "instance {victim} killed idle; {} requests sent right after",
                        which.len()
                    ),
                    migration: None,
                });
            }
            Fault::KillDecoding => {
                tasks = spawn_requests(&client, &specs, &which);
                // A seeded pause into the decoding, then a behaving instance
                // that is running requests right now (seeded among them).
                tokio::time::sleep(Duration::from_millis(100 + rng.below(300))).await;
                let mut victim = None;
                let deadline = Instant::now() + Duration::from_secs(10);
                while victim.is_none() && Instant::now() < deadline {
                    let s = fleet.status().await;
                    let busy: Vec<u32> = fleet
                        .plain()
                        .into_iter()
                        .filter(|&i| count(load_of(&s, i), "running") > 0)
                        .collect();
                    if !busy.is_empty() {
                        let v = busy[rng.below(busy.len() as u64) as usize];
                        victim = Some((v, count(load_of(&s, v), "running")));
                    } else {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
                let (victim, running) = victim.unwrap_or_else(|| {
                    let plain = fleet.plain();
                    (plain[rng.below(plain.len() as u64) as usize], 0)
                });
                fleet.kill(victim);
                injected.push(Injected {
                    fault,
                    hit: running > 0,
                    note: format!("instance {victim} killed with {running} requests running"),
                    migration: None,
                });
            }
            Fault::KillMigrationSource | Fault::KillMigrationDestination => {
                tasks = spawn_requests(&client, &specs, &which);
                tokio::time::sleep(Duration::from_millis(50)).await;
                let done =
                    kill_mid_migration(&mut fleet, &mut rng, fault == Fault::KillMigrationSource)
                        .await;
                injected.push(done);
            }
            Fault::DropMigrationConnection => {
                tasks = spawn_requests(&client, &specs, &which);
                let dropper = fleet.dropper().expect("an instance that drops migrations");
                let drops_before = fleet.drops_logged();
                let (mut out_orders, mut in_orders) = (0, 0);
                for _ in 0..150 {
                    if out_orders >= 3 {
                        break;
                    }
                    let s = fleet.status().await;
                    let running = |i: &u32| count(load_of(&s, *i), "running");
                    let mut peers: Vec<u32> = s["instances"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|i| i["instance"].as_u64().unwrap() as u32)
                        .filter(|&i| i != dropper)
                        .collect();
                    rng.shuffle(&mut peers);
                    if running(&dropper) == 0 {
                        // Nothing to move out: bring a request in first
                        // (migrations into it work).
                        if let Some(src) = peers
                            .iter()
                            .copied()
                            .filter(|i| running(i) > 0)
                            .max_by_key(running)
                        {
                            if order_migration(&fleet, src, dropper).await.is_ok() {
                                in_orders += 1;
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(30)).await;
                        continue;
                    }
                    let dest = peers.iter().copied().min_by_key(running).unwrap();
                    if order_migration(&fleet, dropper, dest).await.is_ok() {
                        out_orders += 1;
                        // Until the dropper has cut it.
                        let logged = fleet.drops_logged();
                        let deadline = Instant::now() + Duration::from_secs(3);
                        while fleet.drops_logged() == logged && Instant::now() < deadline {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    } else {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                let dropped = fleet.drops_logged() - drops_before;
                injected.push(Injected {
                    fault,
                    hit: dropped > 0,
                    note: format!(
                        "{out_orders} migrations out of instance {dropper} ordered ({in_orders} into it first), {dropped} connections dropped"
                    ),
                    migration: None,
                });
            }
            Fault::RestartManager => {
                let before = fleet.status().await;
                let accepted_before = before["requests_total"].as_u64().unwrap();
                tasks = spawn_requests(&client, &specs, &which);
                // Every request accepted (or already ended: refused ones
                // get their typed error at once).
                let (all_accepted, s) = until(&fleet, Duration::from_secs(20), |s| {
                    let ended = tasks.iter().filter(|t| t.is_finished()).count() as u64;
                    s["requests_total"].as_u64().unwrap() - accepted_before + ended
                        >= which.len() as u64
                })
                .await;
                assert!(
                    all_accepted,
                    "the restart round's requests were not accepted: {s}"
                );
                // Their Accepted events reach sled at the next flush.
                tokio::time::sleep(FLUSHED_AFTER).await;
                let s = fleet.status().await;
                fleet.migrations_before = fleet.migration_totals(&s);
                let kill_at = Instant::now();
                fleet.server.kill9();
                // Joined instances exit by themselves once they lose the manager.
                let exit_deadline = Instant::now() + Duration::from_secs(20);
                for j in &mut fleet.joined {
                    loop {
                        if j.child.try_wait().unwrap().is_some() {
                            break;
                        }
                        assert!(
                            Instant::now() < exit_deadline,
                            "instance {} still runs 20 s after its manager died",
                            j.id
                        );
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                let instances_gone = kill_at.elapsed();
                fleet.joined.clear();
                let round_ended = join_all(tasks).await;
                let failed: BTreeSet<usize> = round_ended
                    .iter()
                    .filter(|e| matches!(e.outcome, Outcome::Connection(_)))
                    .map(|e| e.spec)
                    .collect();
                // Completed in the last flush period before the kill: their
                // Finished event may not have reached sled.
                let late: BTreeSet<usize> = round_ended
                    .iter()
                    .filter(|e| {
                        matches!(e.outcome, Outcome::Completed(_))
                            && e.at + Duration::from_millis(1_500) > kill_at
                    })
                    .map(|e| e.spec)
                    .collect();
                let first_error = round_ended
                    .iter()
                    .find(|e| matches!(e.outcome, Outcome::Connection(_)))
                    .map(|e| e.outcome.describe())
                    .unwrap_or_default();
                let slowest = round_ended
                    .iter()
                    .filter(|e| failed.contains(&e.spec))
                    .map(|e| e.at.saturating_duration_since(kill_at))
                    .max()
                    .unwrap_or_default();
                ended.extend(round_ended);
                // The journal, read while no manager runs.
                let store_path = fleet.server.data_dir.join("store");
                let (in_flight, by_spec) = {
                    let store = llumen_store::Store::open(&store_path).unwrap();
                    let in_flight = store.in_flight().unwrap();
                    let mut by_spec = BTreeSet::new();
                    for &id in &in_flight {
                        let max_tokens = common::accepted_max_tokens(&store, id).unwrap();
                        let spec = specs
                            .iter()
                            .position(|s| s.max_tokens == max_tokens)
                            .expect("an interrupted request the campaign sent");
                        by_spec.insert(spec);
                    }
                    (in_flight, by_spec)
                };
                assert!(
                    failed.is_subset(&by_spec),
                    "requests whose clients lost the manager are missing from the journal's in-flight list: {:?}",
                    failed.difference(&by_spec).collect::<Vec<_>>()
                );
                let extra: BTreeSet<usize> = by_spec.difference(&failed).copied().collect();
                assert!(
                    extra.is_subset(&late),
                    "the journal lists requests as in flight that finished more than a flush period before the crash: {extra:?}"
                );
                interrupted_specs.extend(failed.iter().copied());
                // Restart on the same data dir.
                let old_log = fleet.server.stderr();
                std::fs::write(
                    fleet
                        .dir
                        .join(format!("manager-before-restart-{round}.log")),
                    old_log,
                )
                .unwrap();
                let restart_at = Instant::now();
                let args: Vec<&str> = fleet.args.iter().map(String::as_str).collect();
                let data_dir = fleet.server.data_dir.clone();
                fleet.server = Server::start(&data_dir, &args);
                fleet.admin = fleet.server.client().await;
                let restart_s = restart_at.elapsed().as_secs_f64();
                let s = fleet.status().await;
                let listed: Vec<u64> =
                    serde_json::from_value(s["interrupted_requests"].clone()).unwrap();
                assert_eq!(listed, in_flight, "interrupted_requests after the restart");
                fleet.join(false);
                fleet.join(false);
                fleet.join(true);
                fleet.wait_ready().await;
                restart_notes.push(format!(
                    "{} requests in flight at the kill -> {} client connection errors (all within {:.1} s; {first_error}), journal interrupted {} ({} finished within the last flush period), restart {:.1} s, instances exited {:.1} s after",
                    which.len(),
                    failed.len(),
                    slowest.as_secs_f64(),
                    in_flight.len(),
                    extra.len(),
                    restart_s,
                    instances_gone.as_secs_f64(),
                ));
                injected.push(Injected {
                    fault,
                    hit: !failed.is_empty(),
                    note: restart_notes.last().unwrap().clone(),
                    migration: None,
                });
                eprintln!(
                    "round {round} {}: {:.1} s; {}",
                    fault.name(),
                    round_start.elapsed().as_secs_f64(),
                    injected.last().unwrap().note
                );
                continue;
            }
        }
        let round_ended = join_all(tasks).await;
        ended.extend(round_ended);
        injected.last_mut().unwrap().settle(&fleet);
        // Replace killed instances; the manager must have dropped them.
        while fleet.joined.len() < 3 {
            let drops = fleet.dropper().is_none();
            fleet.join(drops);
        }
        fleet.wait_ready().await;
        eprintln!(
            "round {round} {}: {:.1} s; {}",
            fault.name(),
            round_start.elapsed().as_secs_f64(),
            injected.last().unwrap().note
        );
        drop(client);
    }

    // Everything ended; the survivors hold nothing.
    let rounds_done = wall.elapsed();
    let (clean, last) =
        common::wait_clean(&fleet.admin, &fleet.token, Duration::from_secs(20)).await;
    assert!(
        clean,
        "blocks, requests or migrations left over: {last}\n{}",
        fleet.logs()
    );
    let migrations = fleet.migration_totals(&last);
    let drops_logged = fleet.drops_logged();

    // The journal: each completed request accepted once, finished once.
    let server_log = fleet.logs();
    for j in &mut fleet.joined {
        let _ = j.child.kill();
        let _ = j.child.wait();
    }
    let data_dir = fleet.server.data_dir.clone();
    let Fleet { server, admin, .. } = fleet;
    admin.close().await;
    assert!(server.stop().success());
    {
        let store = llumen_store::Store::open(data_dir.join("store")).unwrap();
        for e in &ended {
            if let Outcome::Completed(c) = &e.outcome {
                let events = store.journal_events(c.finish.request_id).unwrap();
                let accepted = events
                    .iter()
                    .filter(|e| matches!(e, JournalEvent::Accepted { .. }))
                    .count();
                let finished: Vec<&JournalEvent> = events
                    .iter()
                    .filter(|e| matches!(e, JournalEvent::Finished { .. }))
                    .collect();
                assert_eq!(accepted, 1, "request {}: {events:?}", c.finish.request_id);
                assert!(
                    matches!(
                        finished.as_slice(),
                        [JournalEvent::Finished { outcome: JournalOutcome::Length, completion_tokens, .. }]
                            if *completion_tokens == specs[e.spec].max_tokens
                    ),
                    "request {} (spec {}) did not finish exactly once: {events:?}",
                    c.finish.request_id,
                    e.spec
                );
            }
        }
    }

    let checked = wall.elapsed();
    // The reference: every completed request on a fault-free server.
    let completed: Vec<usize> = ended
        .iter()
        .filter(|e| matches!(e.outcome, Outcome::Completed(_)))
        .map(|e| e.spec)
        .collect();
    let reference: BTreeMap<usize, Completion> = {
        let server = Server::start(
            &tmp.path().join("reference"),
            &["--instances", "2", "--no-migrate"],
        );
        let client = Arc::new(server.client().await);
        // In batches, so that no request waits behind all the others past
        // its deadline.
        let mut got = Vec::new();
        for batch in completed.chunks(48) {
            got.extend(join_all(spawn_requests(&client, &specs, batch)).await);
        }
        let mut out = BTreeMap::new();
        for e in got {
            match e.outcome {
                Outcome::Completed(c) => {
                    out.insert(e.spec, c);
                }
                other => panic!(
                    "the reference server failed spec {}: {}",
                    e.spec,
                    other.describe()
                ),
            }
        }
        Arc::try_unwrap(client).ok().unwrap().close().await;
        assert!(server.stop().success());
        out
    };

    eprintln!(
        "fault campaign phases: rounds {:.1} s, clean + journal {:.1} s, reference {:.1} s",
        rounds_done.as_secs_f64(),
        (checked - rounds_done).as_secs_f64(),
        (wall.elapsed() - checked).as_secs_f64()
    );
    // Tally.
    let mut identical = 0;
    let mut differing = Vec::new();
    let mut typed = Vec::new();
    let mut connection_at_restart = 0;
    let mut lost = Vec::new();
    let mut moved = 0;
    for e in &ended {
        match &e.outcome {
            Outcome::Completed(c) => {
                let want = &reference[&e.spec];
                if c.tokens == want.tokens && c.text == want.text {
                    identical += 1;
                } else {
                    differing.push((e.spec, c.finish.moves));
                }
                if c.finish.moves > 0 {
                    moved += 1;
                }
            }
            Outcome::Typed(err) => typed.push((e.spec, err.to_string())),
            Outcome::Connection(_) if interrupted_specs.contains(&e.spec) => {
                connection_at_restart += 1
            }
            other => lost.push((e.spec, specs[e.spec].round, other.describe())),
        }
    }
    let mut by_kind: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for i in &injected {
        let e = by_kind.entry(i.fault.name()).or_default();
        e.0 += 1;
        e.1 += usize::from(i.hit);
    }
    for i in &injected {
        eprintln!("fault {}: hit={} {}", i.fault.name(), i.hit, i.note);
    }
    eprintln!(
        "FAULTS SUMMARY seed={seed}: faults injected {} ({}; migration connections dropped by fault injection: {drops_logged}); \
         requests sent {}, completed identical {identical}, completed differing {}, typed errors {}, connection errors at the manager restart {connection_at_restart} (all journaled as interrupted), lost {}; \
         {moved} completed requests moved (re-dispatch or migration); migrations started {} committed {} aborted {} not started {}; wall {:.1} s",
        injected.len(),
        by_kind
            .iter()
            .map(|(k, (n, hit))| format!("{k}={n} (hit {hit})"))
            .collect::<Vec<_>>()
            .join(", "),
        specs.len(),
        differing.len(),
        typed.len(),
        lost.len(),
        migrations["started"],
        migrations["committed"],
        migrations["aborted"],
        migrations["not_started"],
        wall.elapsed().as_secs_f64(),
    );
    assert_eq!(ended.len(), specs.len());
    assert!(
        lost.is_empty(),
        "lost requests (spec, round, outcome): {lost:?}\n{server_log}"
    );
    assert!(
        differing.is_empty(),
        "completed with other tokens than the fault-free run (spec, moves): {differing:?}"
    );
    if !typed.is_empty() {
        eprintln!("typed errors (spec, error): {typed:?}");
    }
    assert!(drops_logged > 0, "no migration connection was dropped");
    assert!(
        migrations["committed"] > 0,
        "no live migration committed during the campaign: {migrations:?}"
    );
}
