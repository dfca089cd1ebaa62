//! The manager: the global scheduler and the request relays.
//!
//! Owns the links to the fleet (in-process llumlets and joined instances
//! behind [`InstanceLink`]), request ids, the relay task of every request
//! (tokens from whichever instance serves it, in order, once each, to the
//! client; re-dispatch from prompt + tokens so far when an instance is
//! lost), the timers of the periodic migration and scaling rounds, the
//! migration transport, and feeding snapshots to sled and metrics. The
//! decisions themselves (placement, the migration round's orders and
//! limits, the scaling round's actions, which instances exist and in what
//! phase) are the fleet core's [`Controller`], the code the simulator runs;
//! the manager carries them out.
//!
//! Invariants: a request accepted by [`Manager::submit`] ends with exactly
//! one `Finished` or `Error` event on its stream (or is cancelled by its
//! client); its journal says Accepted, Dispatched (once per placement) and
//! Finished. A removed instance's late snapshots are ignored.
//!
//! API boundary: instances are reached only through [`InstanceLink`];
//! policies only through the [`Controller`] asking [`RuntimeDecide`]; sled
//! only through `llumen-store`. It never parses bytes from the network.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use llumen_fleet::{
    Controller, ControllerConfig, InstancePhase, ManualMigrationError, MigrationCadence,
    MigrationNotStarted, MigrationOrder, ScalingAction,
};
use llumen_policy_logic::{InstanceLoad, MigrationCandidate, RequestMeta};
use llumen_store::{JournalEvent, JournalOutcome, Store};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::control::llumlet::{
    EventSender, InstanceEvent, LoadSink, Mailbox, MigrationReport, RouteBook, Routes,
};
use crate::control::metrics::Metrics;
use crate::control::shadow::Shadows;
use crate::front::api::{
    CancelOnDrop, ErrorCode, FinishReason, FinishRecord, GenerateEvent, GenerateRequest,
    Generation, ServeError, Serving, TokenChunk,
};
use crate::policy::{DecisionSource, PolicyKind, PolicyRuntime, RuntimeDecide, SlotStatus};
use crate::process::clock;
use crate::process::model::TextCodec;
use crate::transport::migration::MigrationTransport;
use crate::transport::protocol::Assignment;

/// A way to reach one instance.
pub trait InstanceLink: Send + Sync + 'static {
    /// Queues a request there; its events go to `events`.
    fn assign(&self, job: Assignment, events: EventSender) -> Result<(), ServeError>;
    /// Marks it draining (or not).
    fn set_draining(&self, draining: bool);
    /// Running requests a migration could move (empty where unknown).
    fn candidates(&self) -> Pin<Box<dyn Future<Output = Vec<MigrationCandidate>> + Send + '_>>;
    /// Stops it (in-process) or lets it go (joined).
    fn stop(&self);
    /// `local` or `remote`.
    fn kind(&self) -> &'static str;
    /// Where migration traffic for it goes, when it runs in this process.
    fn mailbox(&self) -> Option<Mailbox> {
        None
    }
    /// Starts migrating `request` out to instance `destination`, whose
    /// endpoint is `addr`; the report comes when it ends.
    fn migrate_out(
        &self,
        migration_id: u64,
        request: u64,
        destination: u32,
        addr: std::net::SocketAddr,
        transport: &Arc<MigrationTransport>,
    ) -> Result<tokio::sync::oneshot::Receiver<MigrationReport>, String>;
}

impl InstanceLink for crate::control::llumlet::Llumlet {
    fn assign(&self, job: Assignment, events: EventSender) -> Result<(), ServeError> {
        crate::control::llumlet::Llumlet::assign(self, job, events)
    }
    fn set_draining(&self, draining: bool) {
        crate::control::llumlet::Llumlet::set_draining(self, draining)
    }
    fn candidates(&self) -> Pin<Box<dyn Future<Output = Vec<MigrationCandidate>> + Send + '_>> {
        Box::pin(self.migration_candidates())
    }
    fn stop(&self) {
        crate::control::llumlet::Llumlet::stop(self)
    }
    fn kind(&self) -> &'static str {
        "local"
    }
    fn mailbox(&self) -> Option<Mailbox> {
        Some(crate::control::llumlet::Llumlet::mailbox(self))
    }
    fn migrate_out(
        &self,
        migration_id: u64,
        request: u64,
        destination: u32,
        addr: std::net::SocketAddr,
        transport: &Arc<MigrationTransport>,
    ) -> Result<tokio::sync::oneshot::Receiver<MigrationReport>, String> {
        let mailbox = crate::control::llumlet::Llumlet::mailbox(self);
        let link = transport.open(addr, destination, migration_id, mailbox.clone());
        Ok(mailbox.migrate_out(migration_id, request, link))
    }
}

/// Where the manager's requests' event channels are, by request: a weak
/// sender while an instance runs it (so the relay still learns of a lost
/// instance from its channel closing), or the strong one parked by a
/// migration's source until the destination claims it.
#[derive(Default)]
pub struct RouteTable {
    routes: Mutex<std::collections::HashMap<u64, Route>>,
}

enum Route {
    Weak(mpsc::WeakUnboundedSender<InstanceEvent>),
    Parked { events: EventSender, until_us: u64 },
}

/// How long a parked channel waits for its destination's claim before it is
/// dropped (its relay then places the request again).
const PARK_US: u64 = 10_000_000;

impl RouteTable {
    fn register(&self, request: u64, events: &EventSender) {
        lock(&self.routes).insert(request, Route::Weak(events.downgrade()));
    }
    fn forget(&self, request: u64) {
        lock(&self.routes).remove(&request);
    }
    /// Drops parked channels nobody claimed in time.
    fn sweep(&self, now_us: u64) {
        for route in lock(&self.routes).values_mut() {
            if let Route::Parked { events, until_us } = route {
                if *until_us <= now_us {
                    *route = Route::Weak(events.downgrade());
                }
            }
        }
    }
}

impl RouteBook for RouteTable {
    fn claim(&self, request: u64, instance: u32) -> Option<EventSender> {
        let mut routes = lock(&self.routes);
        let route = routes.get_mut(&request)?;
        let events = match route {
            Route::Weak(w) => w.upgrade()?,
            Route::Parked { events, .. } => events.clone(),
        };
        *route = Route::Weak(events.downgrade());
        let _ = events.send(InstanceEvent::Moved { instance });
        Some(events)
    }

    fn park(&self, request: u64, events: EventSender) {
        let mut routes = lock(&self.routes);
        if let Some(route) = routes.get_mut(&request) {
            // Claimed already (the destination was quicker): nothing to keep.
            if let Route::Weak(w) = route {
                if w.strong_count() > 1 {
                    return;
                }
            }
            *route = Route::Parked {
                events,
                until_us: clock::now_us() + PARK_US,
            };
        }
    }
}

/// Builds an in-process instance with the given id, publishing to the sink.
pub type LocalFactory =
    Box<dyn Fn(u32, LoadSink, Routes) -> Result<Arc<dyn InstanceLink>, String> + Send + Sync>;

/// Knobs of the manager.
/// How often the migration loop asks whether the snapshot cadence made a
/// round due ([`MigrationCadence::Snapshots`]).
pub const CADENCE_POLL: Duration = Duration::from_millis(10);

#[derive(Clone, Debug)]
pub struct ManagerConfig {
    pub model_name: String,
    /// Longest prompt + max_tokens an instance serves.
    pub max_model_len: usize,
    /// The migration round's timer with [`MigrationCadence::Period`].
    pub migration_period: Duration,
    /// When the migration round runs: on the period, or (the default, the
    /// artifact's cadence) once enough step snapshots came in, checked
    /// every [`CADENCE_POLL`].
    pub migration_cadence: MigrationCadence,
    pub scaling_period: Duration,
    /// The first scaling round waits this long after start (the artifact
    /// waits 100 s, letting a fresh fleet fill before judging its load).
    pub scaling_first_check: Duration,
    /// The scaling round never drains below / grows above these.
    pub min_instances: usize,
    pub max_instances: usize,
    /// Most times one request is placed again after losing its instance.
    pub max_moves: u32,
    /// Execute the migration rounds' choices (else only compute and log them).
    pub migrate: bool,
    /// Most migrations in or out of one instance at a time.
    pub max_migrations_per_instance: usize,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        Self {
            model_name: "llumen".into(),
            max_model_len: 2048,
            migration_period: Duration::from_secs(1),
            migration_cadence: MigrationCadence::Snapshots { per_instance: 4 },
            scaling_period: Duration::from_secs(5),
            scaling_first_check: Duration::ZERO,
            min_instances: 1,
            max_instances: 1,
            max_moves: 8,
            migrate: true,
            max_migrations_per_instance: 1,
        }
    }
}

/// Live migrations the manager ran.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MigrationStats {
    pub started: u64,
    pub committed: u64,
    /// Refused by the destination or given up by the source (the request
    /// went on where it was).
    pub aborted: u64,
    /// Could not start (request finished, not running, instance busy…).
    pub not_started: u64,
    /// Downtimes (detach → commit) of the latest committed migrations, µs.
    pub recent_downtime_us: Vec<u64>,
    /// Blocks per stage of the latest committed migration.
    pub last_stages_blocks: Vec<u32>,
}

struct InstanceEntry {
    link: Arc<dyn InstanceLink>,
    joined_us: u64,
    /// The endpoint that takes migrations into it (`None`: this manager's).
    migration_addr: Option<std::net::SocketAddr>,
}

/// One instance in [`StatusReport`].
#[derive(Clone, Debug, Serialize)]
pub struct InstanceStatus {
    pub instance: u32,
    pub kind: &'static str,
    pub draining: bool,
    pub joined_us: u64,
    pub load: Option<InstanceLoadView>,
}

/// The load fields people read in a status.
#[derive(Clone, Debug, Serialize)]
pub struct InstanceLoadView {
    pub timestamp_us: u64,
    pub total_blocks: u32,
    pub used_blocks: u32,
    pub running: u32,
    pub waiting: u32,
    pub preempted: u32,
    pub migrating_in: u32,
    pub migrating_out: u32,
    pub step_latency_us: u32,
}

impl From<&InstanceLoad> for InstanceLoadView {
    fn from(l: &InstanceLoad) -> Self {
        Self {
            timestamp_us: l.timestamp_us,
            total_blocks: l.total_blocks,
            used_blocks: l.used_blocks,
            running: l.running,
            waiting: l.waiting,
            preempted: l.preempted,
            migrating_in: l.migrating_in,
            migrating_out: l.migrating_out,
            step_latency_us: l.step_latency_us,
        }
    }
}

/// What `llumen status` shows.
#[derive(Clone, Debug, Serialize)]
pub struct StatusReport {
    pub model: String,
    pub uptime_s: f64,
    pub requests_in_flight: u64,
    pub requests_total: u64,
    pub instances: Vec<InstanceStatus>,
    pub policies: Vec<SlotStatus>,
    /// Snapshots recorded in sled per instance since this start (buffered
    /// ones included).
    pub stored_snapshots: BTreeMap<u32, u64>,
    /// Requests the journal showed in flight when this manager started
    /// (accepted, never finished: the previous run stopped under them).
    pub interrupted_requests: Vec<u64>,
    pub shadows: Vec<crate::control::shadow::ShadowReport>,
    pub migrations: MigrationStats,
}

struct Inner {
    config: ManagerConfig,
    runtime: Arc<PolicyRuntime>,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    codec: Arc<TextCodec>,
    /// The links of registered instances.
    instances: RwLock<BTreeMap<u32, InstanceEntry>>,
    /// The fleet core's decisions: which instances exist and in what phase
    /// (an id handed out is `Starting` until its link registers; its
    /// snapshots are kept from the start), placement, migration and scaling
    /// rounds. Locked for one decision at a time, never across an await;
    /// taken through [`Inner::controller`], which first ingests the
    /// snapshots that arrived meanwhile.
    controller: Mutex<Controller>,
    /// Snapshots not yet given to the controller. A llumlet never waits on
    /// the controller (a policy call may hold it up to its deadline): it
    /// queues here, and whoever takes the controller next ingests them.
    pending_loads: Mutex<Vec<InstanceLoad>>,
    next_request: AtomicU64,
    in_flight: AtomicU64,
    accepted: AtomicU64,
    factory: Option<LocalFactory>,
    shadows: Shadows,
    started_us: u64,
    stored_snapshots: Mutex<BTreeMap<u32, u64>>,
    interrupted: Vec<u64>,
    routes: Arc<RouteTable>,
    transport: std::sync::OnceLock<(Arc<MigrationTransport>, std::net::SocketAddr)>,
    migration_stats: Mutex<MigrationStats>,
}

/// The global scheduler. Cheap to clone.
#[derive(Clone)]
pub struct Manager {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}
fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

fn label(source: &DecisionSource) -> String {
    match source {
        DecisionSource::Active { name, sha256 } => {
            format!("{name}@{}", &sha256[..12.min(sha256.len())])
        }
        DecisionSource::LastGood { name, sha256 } => {
            format!("last-good:{name}@{}", &sha256[..12.min(sha256.len())])
        }
        DecisionSource::Builtin { name } => format!("builtin:{name}"),
    }
}

impl Manager {
    /// A manager with no instances yet. `factory` builds in-process
    /// instances for [`Manager::add_local_instance`] and scale-up.
    pub fn new(
        config: ManagerConfig,
        runtime: Arc<PolicyRuntime>,
        store: Arc<Store>,
        metrics: Arc<Metrics>,
        codec: Arc<TextCodec>,
        factory: Option<LocalFactory>,
    ) -> Self {
        let started_us = clock::now_us();
        let interrupted = store.in_flight().unwrap_or_else(|e| {
            tracing::error!(error = %e, "reading the request journal");
            Vec::new()
        });
        if !interrupted.is_empty() {
            tracing::warn!(
                requests = interrupted.len(),
                "the journal shows requests in flight when the last run stopped"
            );
            // They ended with that run: close them (failed, at this start)
            // so that a later start does not list them again and retention
            // can remove them. Durable before any new request is taken.
            for &request in &interrupted {
                let end = JournalEvent::Finished {
                    at_us: started_us,
                    completion_tokens: 0,
                    outcome: JournalOutcome::Failed,
                };
                if let Err(e) = store.journal(request, &end) {
                    tracing::error!(request, error = %e, "closing an interrupted request in the journal");
                }
            }
            if let Err(e) = store.flush() {
                tracing::error!(error = %e, "flushing the request journal");
            }
        }
        let controller = Controller::new(ControllerConfig {
            max_migrations_per_instance: u32::try_from(config.max_migrations_per_instance)
                .unwrap_or(u32::MAX),
            min_instances: u32::try_from(config.min_instances).unwrap_or(u32::MAX),
            max_instances: u32::try_from(config.max_instances).unwrap_or(u32::MAX),
            migrate: config.migrate,
            // Unique across restarts (joined instances may outlive a run).
            first_migration_id: started_us,
            max_total_tokens: Some(u32::try_from(config.max_model_len).unwrap_or(u32::MAX)),
            migration_cadence: config.migration_cadence,
        });
        Self {
            inner: Arc::new(Inner {
                config,
                shadows: Shadows::new(runtime.clone()),
                runtime,
                store,
                metrics,
                codec,
                instances: RwLock::new(BTreeMap::new()),
                controller: Mutex::new(controller),
                pending_loads: Mutex::new(Vec::new()),
                // Request ids start at the clock (µs since the epoch) so ids
                // stay unique in the journal across restarts.
                next_request: AtomicU64::new(started_us),
                in_flight: AtomicU64::new(0),
                accepted: AtomicU64::new(0),
                factory,
                started_us,
                stored_snapshots: Mutex::new(BTreeMap::new()),
                interrupted,
                routes: Arc::new(RouteTable::default()),
                transport: std::sync::OnceLock::new(),
                migration_stats: Mutex::new(MigrationStats::default()),
            }),
        }
    }

    pub fn runtime(&self) -> &Arc<PolicyRuntime> {
        &self.inner.runtime
    }
    pub fn store(&self) -> &Arc<Store> {
        &self.inner.store
    }
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }
    pub fn shadows(&self) -> &Shadows {
        &self.inner.shadows
    }
    pub fn config(&self) -> &ManagerConfig {
        &self.inner.config
    }

    /// The sink an instance with id `instance` publishes its loads to.
    pub fn load_sink(&self) -> LoadSink {
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        Box::new(move |load| {
            if let Some(inner) = weak.upgrade() {
                inner.on_load(load);
            }
        })
    }

    /// The policies' side of the controller's questions (shadows fed).
    fn decide(&self) -> RuntimeDecide<'_> {
        RuntimeDecide::new(&self.inner.runtime).with_shadows(&self.inner.shadows)
    }

    /// Reserves the next instance id: the instance is `Starting` (its
    /// snapshots are kept, not shown to the policies) until it registers.
    pub fn next_instance_id(&self) -> u32 {
        let mut c = self.inner.controller();
        let id = c.allocate_instance_id();
        c.add_instance(id, InstancePhase::Starting, false);
        id
    }

    /// Starts one more in-process instance.
    pub fn add_local_instance(&self) -> Result<u32, String> {
        let id = self.next_instance_id();
        self.start_local_instance(id)?;
        Ok(id)
    }

    /// Starts in-process instance `id` (reserved, `Starting`); forgets the
    /// id if it cannot start.
    fn start_local_instance(&self, id: u32) -> Result<(), String> {
        let started = match &self.inner.factory {
            Some(factory) => factory(id, self.load_sink(), self.routes()),
            None => Err("this manager cannot start in-process instances".into()),
        };
        match started {
            Ok(link) => {
                self.register(id, link, None);
                Ok(())
            }
            Err(e) => {
                self.inner
                    .controller()
                    .remove_instance(&mut self.decide(), id);
                Err(e)
            }
        }
    }

    /// Adds an instance under a reserved id; `migration_addr` is the
    /// endpoint that takes migrations into it (`None`: this manager's).
    pub fn register(
        &self,
        id: u32,
        link: Arc<dyn InstanceLink>,
        migration_addr: Option<std::net::SocketAddr>,
    ) {
        tracing::info!(instance = id, kind = link.kind(), "instance joined");
        // Only in-process instances are drained by the scaling round: a
        // joined instance's life belongs to whoever started it.
        let local = link.kind() == "local";
        write(&self.inner.instances).insert(
            id,
            InstanceEntry {
                link,
                joined_us: clock::now_us(),
                migration_addr,
            },
        );
        let mut c = self.inner.controller();
        c.add_instance(id, InstancePhase::Starting, local);
        c.set_drainable(id, local);
        c.instance_ready(&mut self.decide(), id);
    }

    /// Removes an instance: its requests' channels close and their relays
    /// place them again.
    pub fn remove_instance(&self, id: u32) {
        // No snapshot of `id` is observed from here on.
        let known = self
            .inner
            .controller()
            .remove_instance(&mut self.decide(), id);
        if known.is_some() {
            self.inner.metrics.remove_instance(id);
        }
        let entry = write(&self.inner.instances).remove(&id);
        if let Some(entry) = entry {
            entry.link.stop();
            tracing::info!(instance = id, "instance left");
        }
    }

    /// The route book llumlets and joined instances' resumed streams use.
    pub fn routes(&self) -> Routes {
        self.inner.routes.clone()
    }

    /// The mailbox of in-process instance `id`.
    pub fn local_mailbox(&self, id: u32) -> Option<Mailbox> {
        read(&self.inner.instances)
            .get(&id)
            .and_then(|e| e.link.mailbox())
    }

    /// Instances the policies know a load of.
    pub fn instances_reporting(&self) -> usize {
        self.inner.runtime.fleet().len()
    }

    /// Instances now.
    pub fn instance_ids(&self) -> Vec<u32> {
        read(&self.inner.instances).keys().copied().collect()
    }

    /// The link of registered instance `id`.
    fn link(&self, id: u32) -> Option<Arc<dyn InstanceLink>> {
        read(&self.inner.instances).get(&id).map(|e| e.link.clone())
    }

    /// Writes buffered snapshots and journal events to sled.
    pub fn flush(&self) {
        if let Err(e) = self.inner.store.flush() {
            tracing::error!(error = %e, "flushing the store");
        }
    }

    /// Stops every instance and flushes the store.
    pub fn shutdown(&self) {
        let ids = self.instance_ids();
        for id in ids {
            self.remove_instance(id);
        }
        self.flush();
    }

    /// Status for `llumen status`.
    pub fn status(&self) -> StatusReport {
        let fleet = self.inner.runtime.fleet();
        let draining: BTreeSet<u32> = {
            let c = self.inner.controller();
            c.instance_ids()
                .filter(|&id| c.phase(id) == Some(InstancePhase::Draining))
                .collect()
        };
        let instances = read(&self.inner.instances)
            .iter()
            .map(|(&id, e)| InstanceStatus {
                instance: id,
                kind: e.link.kind(),
                draining: draining.contains(&id),
                joined_us: e.joined_us,
                load: fleet.get(id).map(InstanceLoadView::from),
            })
            .collect();
        StatusReport {
            model: self.inner.config.model_name.clone(),
            uptime_s: (clock::now_us() - self.inner.started_us) as f64 / 1e6,
            requests_in_flight: self.inner.in_flight.load(Ordering::Relaxed),
            requests_total: self.inner.accepted.load(Ordering::Relaxed),
            instances,
            policies: PolicyKind::ALL
                .iter()
                .map(|&k| self.inner.runtime.status(k))
                .collect(),
            stored_snapshots: self
                .inner
                .stored_snapshots
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            shadows: self.inner.shadows.reports(),
            interrupted_requests: self.inner.interrupted.clone(),
            migrations: lock(&self.inner.migration_stats).clone(),
        }
    }

    /// Starts the migration and scaling rounds on the current tokio
    /// runtime; they stop when the manager is dropped.
    pub fn start_rounds(&self) {
        let config = &self.inner.config;
        match config.migration_cadence {
            MigrationCadence::Period => {
                self.every(config.migration_period, Duration::ZERO, |m| async move {
                    m.migration_round().await;
                });
            }
            MigrationCadence::Snapshots { .. } => {
                self.every(CADENCE_POLL, Duration::ZERO, |m| async move {
                    if m.inner.controller().migration_due() {
                        m.migration_round().await;
                    }
                });
            }
        }
        self.every(
            config.scaling_period,
            config.scaling_first_check,
            |m| async move {
                m.scaling_round();
            },
        );
    }

    /// Runs `round` every `period` (the first after `delay` + `period`)
    /// while the manager lives.
    fn every<F, Fut>(&self, period: Duration, delay: Duration, round: F)
    where
        F: Fn(Manager) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                round(Manager { inner }).await;
            }
        });
    }

    /// One migration round: the controller's pairs and, per pair, the
    /// requests the policy picks among the source's candidates; those the
    /// controller starts (within the per-instance limits) are carried out.
    /// Returns (source, destination, picks) per pair.
    pub async fn migration_round(&self) -> Vec<(u32, u32, Vec<u64>)> {
        self.inner.routes.sweep(clock::now_us());
        let pairs = self.inner.controller().plan_migrations(&mut self.decide());
        let mut out = Vec::new();
        for pair in pairs {
            let Some(link) = self.link(pair.source) else {
                continue;
            };
            let candidates = link.candidates().await;
            let choice =
                self.inner
                    .controller()
                    .choose_migrations(&mut self.decide(), pair, &candidates);
            if !choice.chosen.is_empty() {
                self.inner
                    .metrics
                    .migrations("planned", choice.chosen.len() as u64);
                tracing::debug!(
                    source = pair.source,
                    destination = pair.destination,
                    requests = ?choice.chosen,
                    "migration round: requests chosen to move"
                );
            }
            for order in choice.orders {
                if !self.carry_out(order) {
                    break;
                }
            }
            if let Some((request, why)) = &choice.refused {
                self.note_not_started(*request, pair.source, pair.destination, why);
            }
            out.push((pair.source, pair.destination, choice.chosen));
        }
        out
    }

    /// Lets the manager execute migrations: `transport` reaches the
    /// endpoint at `addr` that hosts the in-process instances.
    pub fn enable_migration(&self, transport: Arc<MigrationTransport>, addr: std::net::SocketAddr) {
        let _ = self.inner.transport.set((transport, addr));
    }

    /// Starts migrating `request` from `source` to `destination` unless the
    /// controller refuses (a side at its limit, a destination not serving…)
    /// or the manager cannot reach them. False when it did not start.
    pub fn start_migration(&self, request: u64, source: u32, destination: u32) -> bool {
        let order = self
            .inner
            .controller()
            .start_migration(request, source, destination);
        match order {
            Ok(order) => self.carry_out(order),
            Err(why) => {
                self.note_not_started(request, source, destination, &why);
                false
            }
        }
    }

    fn note_not_started(
        &self,
        request: u64,
        source: u32,
        destination: u32,
        why: &MigrationNotStarted,
    ) {
        lock(&self.inner.migration_stats).not_started += 1;
        tracing::debug!(request, source, destination, why = %why, "migration did not start");
    }

    /// Carries out a migration the controller started: the source's link
    /// opens a stream to the destination's endpoint. False (and the
    /// migration ended in the controller's books) when it cannot.
    fn carry_out(&self, order: MigrationOrder) -> bool {
        let MigrationOrder {
            migration_id,
            request,
            source,
            destination,
        } = order;
        lock(&self.inner.migration_stats).started += 1;
        let route = || -> Result<_, String> {
            let (transport, addr) = self
                .inner
                .transport
                .get()
                .ok_or("this manager has no migration transport")?;
            // The source's link and the destination's endpoint, the table
            // unlocked before the link is used.
            let (src, dst_addr) = {
                let instances = read(&self.inner.instances);
                let src = instances
                    .get(&source)
                    .ok_or_else(|| format!("instance {source} has no link"))?;
                let dst = instances
                    .get(&destination)
                    .ok_or_else(|| format!("instance {destination} has no link"))?;
                let dst_addr = match (&dst.migration_addr, dst.link.kind()) {
                    (Some(a), _) => *a,
                    (None, "local") => *addr,
                    (None, _) => {
                        return Err(format!("instance {destination} has no migration endpoint"))
                    }
                };
                (src.link.clone(), dst_addr)
            };
            src.migrate_out(migration_id, request, destination, dst_addr, transport)
        };
        let done = match route() {
            Ok(done) => done,
            Err(why) => {
                self.migration_ended(order, MigrationReport::NotStarted(why));
                return false;
            }
        };
        let manager = self.clone();
        tokio::spawn(async move {
            let report = done.await.unwrap_or_else(|_| {
                MigrationReport::NotStarted("the source instance stopped".into())
            });
            manager.migration_ended(order, report);
        });
        true
    }

    fn migration_ended(&self, order: MigrationOrder, report: MigrationReport) {
        let MigrationOrder {
            migration_id,
            request,
            source,
            destination,
        } = order;
        self.inner.controller().migration_ended(migration_id);
        self.inner.routes.sweep(clock::now_us());
        let mut stats = lock(&self.inner.migration_stats);
        match report {
            MigrationReport::Ended(outcome) if outcome.committed => {
                stats.committed += 1;
                if stats.recent_downtime_us.len() == 64 {
                    stats.recent_downtime_us.remove(0);
                }
                stats
                    .recent_downtime_us
                    .push(outcome.downtime_us.unwrap_or(0));
                stats.last_stages_blocks = outcome.blocks_per_stage.clone();
                self.inner.metrics.migrations("completed", 1);
                tracing::info!(
                    request,
                    source,
                    destination,
                    stages = ?outcome.blocks_per_stage,
                    downtime_us = outcome.downtime_us.unwrap_or(0),
                    total_us = outcome.total_us,
                    "migration committed"
                );
            }
            MigrationReport::Ended(outcome) => {
                stats.aborted += 1;
                self.inner.metrics.migrations("aborted", 1);
                tracing::info!(request, source, destination, result = ?outcome.result, "migration aborted");
            }
            MigrationReport::NotStarted(why) => {
                stats.not_started += 1;
                tracing::debug!(request, source, destination, why, "migration did not start");
            }
        }
    }

    /// Migrates one running request from `source` to `destination` now:
    /// `request`, or the one the migration policy picks among the source's
    /// candidates (else the first candidate). The request it started.
    pub async fn migrate_now(
        &self,
        source: u32,
        destination: u32,
        request: Option<u64>,
    ) -> Result<u64, ServeError> {
        if source == destination {
            return Err(ServeError::new(
                ErrorCode::InvalidParameter,
                "source and destination are the same instance",
            ));
        }
        let link = self
            .link(source)
            .ok_or_else(|| ServeError::new(ErrorCode::NotFound, format!("no instance {source}")))?;
        let candidates = link.candidates().await;
        let order = self.inner.controller().migrate_now(
            &mut self.decide(),
            source,
            destination,
            request,
            &candidates,
        );
        let order = order.map_err(|e| {
            let code = match &e {
                ManualMigrationError::NotRunning { .. }
                | ManualMigrationError::NoCandidate { .. } => ErrorCode::NotFound,
                ManualMigrationError::NotStarted(MigrationNotStarted::SameInstance { .. }) => {
                    ErrorCode::InvalidParameter
                }
                ManualMigrationError::NotStarted(MigrationNotStarted::UnknownInstance {
                    ..
                }) => ErrorCode::NotFound,
                ManualMigrationError::NotStarted(_) => ErrorCode::Unavailable,
            };
            ServeError::new(
                code,
                format!("cannot migrate from {source} to {destination} now: {e}"),
            )
        })?;
        if self.carry_out(order) {
            Ok(order.request)
        } else {
            Err(ServeError::new(
                ErrorCode::Unavailable,
                format!(
                    "cannot migrate from {source} to {destination} now (one of them cannot be reached for migration)"
                ),
            ))
        }
    }

    /// One scaling round: the controller's actions (start, drain, cancel a
    /// drain, stop an emptied instance), carried out.
    pub fn scaling_round(&self) {
        let actions = self.inner.controller().scaling_round(&mut self.decide());
        for action in actions {
            match action {
                ScalingAction::Start { instance } => match self.start_local_instance(instance) {
                    Ok(()) => {
                        self.inner.metrics.scaling("scale_up");
                        tracing::info!(instance, "scaled up");
                    }
                    Err(e) => tracing::warn!(instance, error = %e, "scale-up failed"),
                },
                ScalingAction::Drain { instance } => {
                    if let Some(link) = self.link(instance) {
                        link.set_draining(true);
                    }
                    self.inner.metrics.scaling("drain");
                    tracing::info!(instance, "draining");
                }
                ScalingAction::CancelDrain { instance } => {
                    if let Some(link) = self.link(instance) {
                        link.set_draining(false);
                    }
                    self.inner.metrics.scaling("drain_cancelled");
                    tracing::info!(instance, "drain cancelled");
                }
                ScalingAction::Stop { instance } => {
                    // The controller forgot it already; its link goes.
                    self.inner.metrics.remove_instance(instance);
                    if let Some(entry) = write(&self.inner.instances).remove(&instance) {
                        entry.link.stop();
                    }
                    self.inner.metrics.scaling("stopped");
                    tracing::info!(instance, "stopped after draining");
                }
            }
        }
    }

    /// One dispatch decision: the controller's placement (the dispatch
    /// policy's answer, or a serving instance not in `refused` when the
    /// answer is not one), resolved to the instance's link. `None` when no
    /// instance accepts requests.
    pub fn choose_instance(
        &self,
        meta: &RequestMeta,
        refused: &BTreeSet<u32>,
    ) -> Option<(u32, Arc<dyn InstanceLink>, String)> {
        let mut refused = std::borrow::Cow::Borrowed(refused);
        // A placed instance whose link has just gone is refused in turn.
        for _ in 0..4 {
            let mut decide = self.decide();
            let target = self.inner.controller().place(&mut decide, meta, &refused)?;
            if let Some(link) = self.link(target) {
                let decided_by = decide
                    .dispatched_by
                    .as_ref()
                    .map_or_else(|| "fallback".into(), label);
                return Some((target, link, decided_by));
            }
            refused.to_mut().insert(target);
        }
        None
    }

    /// Chooses an instance for `meta` and hands it `job`; tries again
    /// elsewhere when the chosen instance has gone.
    fn place(
        &self,
        meta: &RequestMeta,
        job: &Assignment,
    ) -> Result<(u32, mpsc::UnboundedReceiver<InstanceEvent>, String), ServeError> {
        let mut refused = BTreeSet::new();
        for _ in 0..4 {
            let Some((target, link, decided_by)) = self.choose_instance(meta, &refused) else {
                break;
            };
            let (tx, rx) = mpsc::unbounded_channel();
            self.inner.routes.register(meta.id, &tx);
            match link.assign(job.clone(), tx) {
                Ok(()) => return Ok((target, rx, decided_by)),
                Err(e) => {
                    tracing::warn!(instance = target, error = %e, "instance refused a request");
                    refused.insert(target);
                    if e.code == ErrorCode::Unavailable {
                        self.remove_instance(target);
                    }
                }
            }
        }
        Err(ServeError::new(
            ErrorCode::Unavailable,
            "no instance accepts requests now",
        ))
    }

    fn journal(&self, request: u64, event: JournalEvent) {
        if let Err(e) = self.inner.store.journal(request, &event) {
            tracing::error!(request, error = %e, "writing the request journal");
        }
    }
}

impl Inner {
    /// A snapshot from an instance: queued, and ingested at once unless a
    /// decision holds the controller (then it ingests it before its next).
    fn on_load(&self, load: InstanceLoad) {
        lock(&self.pending_loads).push(load);
        if let Ok(c) = self.controller.try_lock() {
            drop(self.ingest(c));
        }
    }

    /// The controller, with every queued snapshot ingested first.
    fn controller(&self) -> std::sync::MutexGuard<'_, Controller> {
        self.ingest(lock(&self.controller))
    }

    /// Gives the queued snapshots to the controller, in arrival order. Late
    /// snapshots of a removed instance must not bring it back: the
    /// controller ignores loads of instances it does not know, and removal
    /// forgets the instance under its lock.
    fn ingest<'a>(
        &self,
        mut c: std::sync::MutexGuard<'a, Controller>,
    ) -> std::sync::MutexGuard<'a, Controller> {
        let loads = std::mem::take(&mut *lock(&self.pending_loads));
        if loads.is_empty() {
            return c;
        }
        let mut decide = RuntimeDecide::new(&self.runtime);
        for load in loads {
            // The runtime records it in the snapshot history (sled, batched).
            if !c.observe(&mut decide, load) {
                continue;
            }
            let Some(kept) = c.load(load.instance).copied() else {
                continue;
            };
            *lock(&self.stored_snapshots)
                .entry(kept.instance)
                .or_default() += 1;
            self.metrics.set_instance_load(&kept);
        }
        c
    }
}

/// Marks a point in a joined instance's loads as coming from `id`.
pub fn relabel(mut load: InstanceLoad, id: u32) -> InstanceLoad {
    load.instance = id;
    load
}

fn prefix_hash(tokens: &[u32]) -> u64 {
    // FNV-1a over the first 32 tokens: equal prefixes, equal hashes.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for t in tokens.iter().take(32) {
        for b in t.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

impl Serving for Manager {
    fn submit(&self, request: GenerateRequest) -> Result<Generation, ServeError> {
        let result = self.submit_inner(request);
        if let Err(e) = &result {
            self.inner.metrics.request_rejected(e.code);
        }
        result
    }

    fn model_name(&self) -> String {
        self.inner.config.model_name.clone()
    }

    fn metrics_text(&self) -> String {
        let policies: Vec<SlotStatus> = PolicyKind::ALL
            .iter()
            .map(|&k| self.inner.runtime.status(k))
            .collect();
        self.inner.metrics.render(&policies)
    }
}

impl Manager {
    fn submit_inner(&self, request: GenerateRequest) -> Result<Generation, ServeError> {
        request.validate()?;
        let prompt = self.inner.codec.encode(&request.input)?;
        let id = self.inner.next_request.fetch_add(1, Ordering::Relaxed);
        let arrival_us = clock::now_us();
        let mut meta = RequestMeta {
            id,
            prompt_tokens: u32::try_from(prompt.len()).unwrap_or(u32::MAX),
            max_tokens: request.max_tokens,
            requested_priority: request.priority,
            priority: request.priority,
            prefix_hash: prefix_hash(&prompt),
            arrival_us,
        };
        let priority = {
            let mut c = self.inner.controller();
            c.admit(&meta)
                .map_err(|e| ServeError::new(ErrorCode::PromptTooLong, e.to_string()))?;
            c.prioritize(&mut self.decide(), &mut meta)
        };
        let mut stop_token_ids = request.stop_token_ids.clone();
        if !request.ignore_eos {
            stop_token_ids.extend(self.inner.codec.eos());
        }
        let job = Assignment {
            request_id: id,
            prompt,
            generated: Vec::new(),
            max_tokens: request.max_tokens,
            temperature: request.temperature,
            top_p: request.top_p,
            seed: request.seed,
            stop_token_ids,
            priority: meta.priority,
            headroom_blocks: priority.headroom_blocks,
        };
        let (instance, events, decided_by) = self.place(&meta, &job)?;
        self.journal(
            id,
            JournalEvent::Accepted {
                at_us: arrival_us,
                prompt_tokens: meta.prompt_tokens,
                max_tokens: meta.max_tokens,
                priority: request.priority,
            },
        );
        self.journal(
            id,
            JournalEvent::Dispatched {
                at_us: clock::now_us(),
                instance,
                decided_by,
            },
        );
        self.inner.metrics.request_accepted();
        self.inner.accepted.fetch_add(1, Ordering::Relaxed);
        self.inner.in_flight.fetch_add(1, Ordering::Relaxed);
        let (client_tx, client_rx) = mpsc::unbounded_channel();
        let (cancel_tx, cancel_rx) = oneshot::channel::<()>();
        let relay = Relay {
            manager: self.clone(),
            meta,
            job,
            instance,
            events,
            client: client_tx,
            cancel: cancel_rx,
            stop: request.stop,
            decoder: self.inner.codec.decoder(),
            pending: String::new(),
            next_index: 0,
            first_token_us: None,
            last_token_us: None,
            queue_us: 0,
            moves: 0,
        };
        tokio::spawn(relay.run());
        Ok(Generation {
            request_id: id,
            events: client_rx,
            cancel: CancelOnDrop::new(move || {
                let _ = cancel_tx.send(());
            }),
        })
    }
}

/// One request's way from its instance(s) to its client.
struct Relay {
    manager: Manager,
    meta: RequestMeta,
    /// The request as an instance runs it; `generated` grows with every
    /// token so that a re-dispatch resumes where it was.
    job: Assignment,
    instance: u32,
    events: mpsc::UnboundedReceiver<InstanceEvent>,
    client: mpsc::UnboundedSender<GenerateEvent>,
    cancel: oneshot::Receiver<()>,
    stop: Vec<String>,
    decoder: crate::process::model::TextDecoder,
    /// Decoded text not yet sent (held back while it could be the start of
    /// a stop string).
    pending: String,
    next_index: u32,
    first_token_us: Option<u64>,
    last_token_us: Option<u64>,
    queue_us: u64,
    moves: u32,
}

enum Outcome {
    Finished(FinishReason),
    Failed(ServeError),
    Cancelled,
}

impl Relay {
    async fn run(mut self) {
        let outcome = self.pump().await;
        let inner = &self.manager.inner;
        let now = clock::now_us();
        let journal_outcome = match &outcome {
            Outcome::Finished(FinishReason::Length) => JournalOutcome::Length,
            Outcome::Finished(FinishReason::Stop) => JournalOutcome::Stop,
            Outcome::Cancelled => JournalOutcome::Cancelled,
            Outcome::Failed(_) => JournalOutcome::Failed,
        };
        match outcome {
            Outcome::Finished(reason) => {
                let tail = self.pending.clone() + &self.decoder.finish();
                if !tail.is_empty() {
                    let _ = self.client.send(GenerateEvent::Tokens(TokenChunk {
                        index: self.next_index,
                        ids: Vec::new(),
                        text: tail,
                    }));
                }
                let arrival = self.meta.arrival_us;
                let record = FinishRecord {
                    request_id: self.meta.id,
                    reason,
                    prompt_tokens: self.meta.prompt_tokens,
                    completion_tokens: self.next_index,
                    queue_us: self.queue_us,
                    ttft_us: self.first_token_us.map_or(0, |t| t - arrival),
                    total_us: now - arrival,
                    instance: self.instance,
                    moves: self.moves,
                };
                inner.metrics.request_finished(reason.as_str());
                inner.metrics.observe_e2e(record.total_us as f64 / 1e6);
                inner.metrics.observe_queue(record.queue_us as f64 / 1e6);
                inner.metrics.observe_tokens(
                    u64::from(record.prompt_tokens),
                    u64::from(record.completion_tokens),
                );
                let _ = self.client.send(GenerateEvent::Finished(record));
            }
            Outcome::Failed(e) => {
                inner.metrics.request_finished("failed");
                let _ = self.client.send(GenerateEvent::Error(e));
            }
            Outcome::Cancelled => inner.metrics.request_finished("cancelled"),
        }
        self.manager.journal(
            self.meta.id,
            JournalEvent::Finished {
                at_us: now,
                completion_tokens: self.next_index,
                outcome: journal_outcome,
            },
        );
        inner.routes.forget(self.meta.id);
        inner.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    async fn pump(&mut self) -> Outcome {
        loop {
            let event = tokio::select! {
                biased;
                _ = self.client.closed() => return Outcome::Cancelled,
                _ = &mut self.cancel => return Outcome::Cancelled,
                e = self.events.recv() => e,
            };
            match event {
                Some(InstanceEvent::Token { index, id }) => {
                    if index < self.next_index {
                        continue; // already delivered (from an earlier placement)
                    }
                    if index > self.next_index {
                        return Outcome::Failed(ServeError::new(
                            ErrorCode::Internal,
                            format!(
                                "instance {} skipped output tokens {}..{index}",
                                self.instance, self.next_index
                            ),
                        ));
                    }
                    if let Some(reason) = self.token(id) {
                        return Outcome::Finished(reason);
                    }
                }
                // Only a joined instance's assignment stream carries it;
                // the manager's stream handler parks the channel.
                Some(InstanceEvent::MovedAway) => {}
                Some(InstanceEvent::Moved { instance }) => {
                    self.instance = instance;
                    self.moves += 1;
                    self.manager.journal(
                        self.meta.id,
                        JournalEvent::Dispatched {
                            at_us: clock::now_us(),
                            instance,
                            decided_by: "migration".into(),
                        },
                    );
                }
                Some(InstanceEvent::Finished {
                    reason, queue_us, ..
                }) => {
                    self.queue_us = queue_us;
                    return Outcome::Finished(reason);
                }
                Some(InstanceEvent::Failed(e)) if e.code != ErrorCode::Unavailable => {
                    return Outcome::Failed(e)
                }
                Some(InstanceEvent::Failed(_)) | None => {
                    // The instance is gone. A request whose last token was
                    // its last is done; any other is placed again, from its
                    // prompt and the tokens it already produced.
                    if self.next_index >= self.job.max_tokens {
                        return Outcome::Finished(FinishReason::Length);
                    }
                    if self
                        .job
                        .generated
                        .last()
                        .is_some_and(|t| self.job.stop_token_ids.contains(t))
                    {
                        return Outcome::Finished(FinishReason::Stop);
                    }
                    if let Err(e) = self.replace() {
                        return Outcome::Failed(e);
                    }
                }
            }
        }
    }

    /// Handles output token `next_index`; `Some` when a stop string ends
    /// the request here.
    fn token(&mut self, id: u32) -> Option<FinishReason> {
        let inner = &self.manager.inner;
        let now = clock::now_us();
        match self.last_token_us {
            None => {
                self.first_token_us = Some(now);
                inner
                    .metrics
                    .observe_ttft((now - self.meta.arrival_us) as f64 / 1e6);
            }
            Some(last) => inner.metrics.observe_inter_token((now - last) as f64 / 1e6),
        }
        self.last_token_us = Some(now);
        let index = self.next_index;
        self.next_index += 1;
        self.job.generated.push(id);
        let text = inner.codec.push(&mut self.decoder, id);
        self.pending.push_str(&text);
        let mut finished = None;
        let mut emit_to = self.pending.len();
        if !self.stop.is_empty() {
            if let Some(at) = self
                .stop
                .iter()
                .filter_map(|s| self.pending.find(s.as_str()))
                .min()
            {
                emit_to = at;
                finished = Some(FinishReason::Stop);
            } else {
                // Hold back what could still become a stop string.
                let keep = self.stop.iter().map(|s| s.len() - 1).max().unwrap_or(0);
                emit_to = self.pending.len().saturating_sub(keep);
                while !self.pending.is_char_boundary(emit_to) {
                    emit_to -= 1;
                }
            }
        }
        let text: String = self.pending.drain(..emit_to).collect();
        if finished.is_some() {
            self.pending.clear();
        }
        let _ = self.client.send(GenerateEvent::Tokens(TokenChunk {
            index,
            ids: vec![id],
            text,
        }));
        finished
    }

    fn replace(&mut self) -> Result<(), ServeError> {
        self.moves += 1;
        if self.moves > self.manager.inner.config.max_moves {
            return Err(ServeError::new(
                ErrorCode::Unavailable,
                format!("request lost its instance {} times", self.moves),
            ));
        }
        self.manager.inner.metrics.redispatched(1);
        tracing::warn!(
            request = self.meta.id,
            lost = self.instance,
            tokens = self.next_index,
            "instance lost; placing the request again"
        );
        let (instance, events, decided_by) = self.manager.place(&self.meta, &self.job)?;
        self.manager.journal(
            self.meta.id,
            JournalEvent::Dispatched {
                at_us: clock::now_us(),
                instance,
                decided_by,
            },
        );
        self.instance = instance;
        self.events = events;
        Ok(())
    }
}
