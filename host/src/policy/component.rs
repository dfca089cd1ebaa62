//! Compiling policy components and running calls into them under a deadline
//! and a memory cap.
//!
//! [`PolicyEngine`] owns the wasmtime engine, the linker (whose only import is
//! `llumen:policy/history`; a component importing anything else, WASI above
//! all, is refused by name at compile time) and the epoch ticker that
//! enforces deadlines (its epoch follows wall-clock time, catching up after
//! an oversleep).
//! [`CompiledPolicy`] is one compiled, pre-instantiated component with the
//! parameters its instances are configured with.
//! [`LiveInstance`] is one instantiation of it in its own store, with the
//! typed handles of the interfaces the runtime calls.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, InstancePre, Linker};
use wasmtime::{Config, Engine, Store, Trap};

use llumen_policy_logic as logic;

use super::bindings::{
    self, dispatch, fleet, migration, params, priority, scaling, wit, GuestState, MemoryCap,
};
use super::history::SnapshotHistory;
use super::{CallFailure, PolicyError, PolicyKind, RuntimeConfig};

/// Most bytes of a policy's own refusal message kept in the error.
const MAX_REFUSAL_BYTES: usize = 1024;

/// Hex sha256 of a component's bytes: the identity of a policy version.
pub type PolicySha = Arc<str>;

const COMPONENT_VERSION: [u8; 4] = [0x0d, 0x00, 0x01, 0x00];
const CORE_VERSION: [u8; 4] = [0x01, 0x00, 0x00, 0x00];

/// Interfaces a policy may import: `llumen:policy/history` (and the types it
/// uses). Anything else, WASI above all, is refused by name at compile time.
const ALLOWED_IMPORT_PREFIX: &str = "llumen:policy/";

/// Turns a core module built with wit-bindgen (which embeds its WIT world in
/// a custom section) into a component; a component is returned unchanged.
pub fn componentize(bytes: &[u8]) -> Result<Vec<u8>, PolicyError> {
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(PolicyError::NotWasm);
    }
    match <[u8; 4]>::try_from(&bytes[4..8]).expect("4 bytes") {
        COMPONENT_VERSION => Ok(bytes.to_vec()),
        CORE_VERSION => wit_component::ComponentEncoder::default()
            .validate(true)
            .module(bytes)
            .and_then(|mut e| e.encode())
            .map_err(|e| match wasi_imports_of_core_module(bytes) {
                imports if !imports.is_empty() => PolicyError::Sandbox { imports },
                _ => PolicyError::Componentize(e),
            }),
        _ => Err(PolicyError::NotWasm),
    }
}

/// The WASI imports (`module::name`) of a core module that could not be
/// made a component, e.g. one built for wasm32-wasip1 (whose std reads the
/// clock and files through `wasi_snapshot_preview1`). Only on that error
/// path: it compiles the module to read its imports.
fn wasi_imports_of_core_module(bytes: &[u8]) -> Vec<String> {
    let Ok(module) = wasmtime::Module::new(&Engine::default(), bytes) else {
        return Vec::new();
    };
    module
        .imports()
        .filter(|i| i.module().starts_with("wasi"))
        .map(|i| format!("{}::{}", i.module(), i.name()))
        .collect()
}

/// Refuses a component that imports anything but `llumen:policy/*`.
fn check_imports(engine: &Engine, component: &Component) -> Result<(), PolicyError> {
    let imports: Vec<String> = component
        .component_type()
        .imports(engine)
        .map(|(name, _)| name)
        .filter(|name| !name.starts_with(ALLOWED_IMPORT_PREFIX))
        .map(str::to_owned)
        .collect();
    if imports.is_empty() {
        Ok(())
    } else {
        Err(PolicyError::Sandbox { imports })
    }
}

/// The wasmtime engine, linker and epoch ticker shared by all policies.
pub struct PolicyEngine {
    engine: Engine,
    linker: Linker<GuestState>,
    config: RuntimeConfig,
    history: Arc<dyn SnapshotHistory>,
    ticker_stop: Arc<AtomicBool>,
    ticker: Option<JoinHandle<()>>,
}

impl PolicyEngine {
    /// An engine with epoch interruption on and a ticker thread advancing the
    /// epoch every `config.epoch_tick`.
    pub fn new(
        config: RuntimeConfig,
        history: Arc<dyn SnapshotHistory>,
    ) -> Result<Self, PolicyError> {
        let mut wasm_config = Config::new();
        wasm_config
            .wasm_component_model(true)
            .epoch_interruption(true);
        let engine = Engine::new(&wasm_config).map_err(PolicyError::Compile)?;
        let mut linker = Linker::new(&engine);
        bindings::add_imports(&mut linker).map_err(PolicyError::Link)?;
        let ticker_stop = Arc::new(AtomicBool::new(false));
        let ticker = {
            let engine = engine.clone();
            let stop = ticker_stop.clone();
            let tick = config.epoch_tick;
            std::thread::Builder::new()
                .name("llumen-policy-epoch".into())
                .spawn(move || {
                    // The epoch counts ticks of wall-clock time since the
                    // start, not sleeps: a sleep that overshoots (a loaded
                    // host) is caught up, so a deadline of n ticks lasts
                    // n ticks of real time, not n oversleeps.
                    let started = std::time::Instant::now();
                    let tick_ns = tick.as_nanos().max(1);
                    let mut epoch = 0u128;
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(tick);
                        let due = started.elapsed().as_nanos() / tick_ns;
                        while epoch < due {
                            engine.increment_epoch();
                            epoch += 1;
                        }
                    }
                })
                .expect("spawning the epoch ticker thread")
        };
        Ok(Self {
            engine,
            linker,
            config,
            history,
            ticker_stop,
            ticker: Some(ticker),
        })
    }

    /// The runtime configuration this engine enforces.
    pub fn config(&self) -> &RuntimeConfig {
        &self.config
    }

    /// Compiles `bytes` (a component, or a core module with an embedded WIT
    /// world) and links it against the host's imports. Type-checking against
    /// a kind's world happens when it is instantiated for that kind.
    pub fn compile(&self, bytes: &[u8]) -> Result<Arc<CompiledPolicy>, PolicyError> {
        let component_bytes = componentize(bytes)?;
        let sha256: PolicySha = hex::encode(Sha256::digest(&component_bytes)).into();
        let component =
            Component::new(&self.engine, &component_bytes).map_err(PolicyError::Compile)?;
        check_imports(&self.engine, &component)?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(PolicyError::Link)?;
        let fleet = fleet::GuestIndices::new(&pre).map_err(|e| PolicyError::WrongWorld {
            kind: PolicyKind::Dispatch,
            source: e,
        })?;
        let kinds = PolicyKind::ALL
            .into_iter()
            .filter(|kind| match kind {
                PolicyKind::Dispatch => dispatch::GuestIndices::new(&pre).is_ok(),
                PolicyKind::Migration => migration::GuestIndices::new(&pre).is_ok(),
                PolicyKind::Priority => priority::GuestIndices::new(&pre).is_ok(),
                PolicyKind::Scaling => scaling::GuestIndices::new(&pre).is_ok(),
            })
            .collect();
        let params = params::GuestIndices::new(&pre).ok();
        let mut compiled = CompiledPolicy {
            label: String::new(),
            sha256,
            name: "".into(),
            version: String::new(),
            kinds,
            component_bytes,
            params: Arc::from(Vec::new()),
            pre,
            fleet,
            params_iface: params,
        };
        // Ask the policy its name (also proves it instantiates and answers).
        let kind = compiled
            .kinds
            .first()
            .copied()
            .unwrap_or(PolicyKind::Dispatch);
        let mut live = self.instantiate(&Arc::new(compiled.clone()), kind)?;
        let info = live
            .info()
            .map_err(|failure| PolicyError::Trial { kind, failure })?;
        compiled.label = labelled(&info.name, &compiled.sha256, &[]);
        compiled.name = info.name.into();
        compiled.version = info.version;
        Ok(Arc::new(compiled))
    }

    /// `policy` with `params` set: a new version (its label names them),
    /// checked by a fresh instance's `params.configure` (a policy without
    /// the `params` interface takes none). No parameters: `policy` itself.
    pub fn configure(
        &self,
        policy: &Arc<CompiledPolicy>,
        params: &[logic::Param],
    ) -> Result<Arc<CompiledPolicy>, PolicyError> {
        if params.is_empty() && policy.params.is_empty() {
            return Ok(policy.clone());
        }
        let mut configured = (**policy).clone();
        configured.params = Arc::from(params.to_vec());
        configured.label = labelled(&policy.name, &policy.sha256, params);
        let configured = Arc::new(configured);
        let kind = configured
            .kinds
            .first()
            .copied()
            .unwrap_or(PolicyKind::Dispatch);
        self.instantiate(&configured, kind)?;
        Ok(configured)
    }

    /// The parameters `policy` takes, with their defaults (none without the
    /// `params` interface).
    pub fn describe(
        &self,
        policy: &Arc<CompiledPolicy>,
    ) -> Result<Vec<logic::ParamSpec>, PolicyError> {
        let Some(indices) = &policy.params_iface else {
            return Ok(Vec::new());
        };
        let kind = policy
            .kinds
            .first()
            .copied()
            .unwrap_or(PolicyKind::Dispatch);
        let (mut store, instance) = self.store_and_instance(policy)?;
        let guest = indices
            .load(&mut store, &instance)
            .map_err(|e| PolicyError::WrongWorld { kind, source: e })?;
        let specs = guarded(&mut store, self.deadline_ticks(), |s| {
            guest.call_describe(s)
        })
        .map_err(|failure| PolicyError::Trial { kind, failure })?;
        Ok(specs
            .into_iter()
            .map(|s| logic::ParamSpec {
                name: s.name,
                default_value: s.default_value,
                description: s.description,
            })
            .collect())
    }

    /// A fresh instance of `policy` for calls of `kind`, type-checked against
    /// that kind's interface.
    pub fn instantiate(
        &self,
        policy: &Arc<CompiledPolicy>,
        kind: PolicyKind,
    ) -> Result<LiveInstance, PolicyError> {
        if !policy.kinds.contains(&kind) {
            let missing =
                wasmtime::format_err!("no exported instance named `llumen:policy/{kind}@0.1.x`");
            return Err(PolicyError::WrongWorld {
                kind,
                source: missing,
            });
        }
        let (mut store, instance) = self.store_and_instance(policy)?;
        let wrong_world = |source| PolicyError::WrongWorld { kind, source };
        if !policy.params.is_empty() {
            // The policy writes the message: keep it to a readable size.
            let refused = |message: String| PolicyError::Params {
                policy: policy.name.to_string(),
                message: if message.len() > MAX_REFUSAL_BYTES {
                    let cut = (0..=MAX_REFUSAL_BYTES)
                        .rev()
                        .find(|&i| message.is_char_boundary(i))
                        .unwrap_or(0);
                    format!("{}… ({} bytes)", &message[..cut], message.len())
                } else {
                    message
                },
            };
            let Some(indices) = &policy.params_iface else {
                return Err(refused(
                    "it takes no parameters (it does not export llumen:policy/params)".into(),
                ));
            };
            let guest = indices.load(&mut store, &instance).map_err(wrong_world)?;
            let values: Vec<params::Param> = policy
                .params
                .iter()
                .map(|p| params::Param {
                    name: p.name.clone(),
                    value: p.value.clone(),
                })
                .collect();
            guarded(&mut store, self.deadline_ticks(), |s| {
                guest.call_configure(s, &values)
            })
            .map_err(|failure| PolicyError::Trial { kind, failure })?
            .map_err(refused)?;
        }
        let fleet = policy
            .fleet
            .load(&mut store, &instance)
            .map_err(wrong_world)?;
        let calls = match kind {
            PolicyKind::Dispatch => KindCalls::Dispatch(
                dispatch::GuestIndices::new(&policy.pre)
                    .and_then(|i| i.load(&mut store, &instance))
                    .map_err(wrong_world)?,
            ),
            PolicyKind::Migration => KindCalls::Migration(
                migration::GuestIndices::new(&policy.pre)
                    .and_then(|i| i.load(&mut store, &instance))
                    .map_err(wrong_world)?,
            ),
            PolicyKind::Priority => KindCalls::Priority(
                priority::GuestIndices::new(&policy.pre)
                    .and_then(|i| i.load(&mut store, &instance))
                    .map_err(wrong_world)?,
            ),
            PolicyKind::Scaling => KindCalls::Scaling(
                scaling::GuestIndices::new(&policy.pre)
                    .and_then(|i| i.load(&mut store, &instance))
                    .map_err(wrong_world)?,
            ),
        };
        Ok(LiveInstance {
            policy: policy.clone(),
            store,
            fleet,
            calls,
            deadline_ticks: self.deadline_ticks(),
            synced_seq: 0,
        })
    }

    /// A fresh store (memory cap, deadline, history) and an instance of
    /// `policy` in it.
    fn store_and_instance(
        &self,
        policy: &CompiledPolicy,
    ) -> Result<(Store<GuestState>, wasmtime::component::Instance), PolicyError> {
        let mut store = Store::new(
            &self.engine,
            GuestState {
                limits: MemoryCap {
                    max_memory_bytes: self.config.memory_limit_bytes,
                    max_table_elements: 100_000,
                    exceeded: false,
                },
                history: self.history.clone(),
                history_max: self.config.history_max,
            },
        );
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(self.deadline_ticks());
        let instance = policy
            .pre
            .instantiate(&mut store)
            .map_err(PolicyError::Instantiate)?;
        Ok((store, instance))
    }

    fn deadline_ticks(&self) -> u64 {
        let tick = self.config.epoch_tick.as_nanos().max(1);
        // +2: the current tick may be about to end, and the epoch lags the
        // wall clock by up to a tick between two wake-ups of the ticker. A
        // call gets at least the deadline and at most two ticks more (plus
        // however long the ticker waits for a core on a loaded host).
        (self.config.call_deadline.as_nanos().div_ceil(tick) as u64).max(1) + 2
    }
}

impl Drop for PolicyEngine {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.ticker.take() {
            let _ = t.join();
        }
    }
}

/// One compiled, linked, pre-instantiated policy component.
#[derive(Clone)]
pub struct CompiledPolicy {
    /// Hex sha256 of `component_bytes`.
    pub sha256: PolicySha,
    /// The name the policy gives itself (`fleet.info`).
    pub name: Arc<str>,
    /// `<name>@<first 12 hex digits of sha256>`, followed by
    /// `[name=value,…]` when parameters are set: for logs, stats and the
    /// journal (two parameter sets of one component are two versions).
    pub label: String,
    /// The version the policy gives itself.
    pub version: String,
    /// The kinds of decision it implements.
    pub kinds: Vec<PolicyKind>,
    /// The component, as stored in the registry.
    pub component_bytes: Vec<u8>,
    /// Parameters every instance is configured with (`params.configure`).
    pub params: Arc<[logic::Param]>,
    pre: InstancePre<GuestState>,
    fleet: fleet::GuestIndices,
    /// The `params` export, when the component has it.
    params_iface: Option<params::GuestIndices>,
}

/// A version's label: `name@sha12`, then `[k=v,…]` with parameters.
fn labelled(name: &str, sha256: &str, params: &[logic::Param]) -> String {
    let mut label = format!("{name}@{}", &sha256[..12]);
    if !params.is_empty() {
        let list: Vec<String> = params.iter().map(ToString::to_string).collect();
        label.push_str(&format!("[{}]", list.join(",")));
    }
    label
}

impl std::fmt::Debug for CompiledPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledPolicy")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("sha256", &self.sha256)
            .field("kinds", &self.kinds)
            .field("params", &self.params)
            .finish()
    }
}

enum KindCalls {
    Dispatch(dispatch::Guest),
    Migration(migration::Guest),
    Priority(priority::Guest),
    Scaling(scaling::Guest),
}

/// One instance of a policy in its own store, serving one kind of call.
///
/// After any trap the instance must not be called again (component state may
/// be torn); the runtime drops it and instantiates a fresh one.
pub struct LiveInstance {
    pub(crate) policy: Arc<CompiledPolicy>,
    store: Store<GuestState>,
    fleet: fleet::Guest,
    calls: KindCalls,
    deadline_ticks: u64,
    /// The fleet-table sequence number this instance's view is synced to.
    pub(crate) synced_seq: u64,
}

impl LiveInstance {
    pub fn info(&mut self) -> Result<wit::PolicyInfo, CallFailure> {
        guarded(&mut self.store, self.deadline_ticks, |s| {
            self.fleet.call_info(s)
        })
    }

    pub fn reset(&mut self, loads: &[wit::InstanceLoad]) -> Result<(), CallFailure> {
        guarded(&mut self.store, self.deadline_ticks, |s| {
            self.fleet.call_reset(s, loads)
        })
    }

    pub fn upsert(&mut self, loads: &[wit::InstanceLoad]) -> Result<(), CallFailure> {
        guarded(&mut self.store, self.deadline_ticks, |s| {
            self.fleet.call_upsert(s, loads)
        })
    }

    pub fn remove(&mut self, instance: u32) -> Result<(), CallFailure> {
        guarded(&mut self.store, self.deadline_ticks, |s| {
            self.fleet.call_remove(s, instance)
        })
    }

    pub fn dispatch(&mut self, request: wit::RequestMeta) -> Result<u32, CallFailure> {
        let KindCalls::Dispatch(g) = &self.calls else {
            return Err(CallFailure::wrong_kind());
        };
        guarded(&mut self.store, self.deadline_ticks, |s| {
            g.call_dispatch(s, request)
        })
    }

    pub fn plan(&mut self) -> Result<Vec<wit::MigrationPair>, CallFailure> {
        let KindCalls::Migration(g) = &self.calls else {
            return Err(CallFailure::wrong_kind());
        };
        guarded(&mut self.store, self.deadline_ticks, |s| g.call_plan(s))
    }

    pub fn choose(
        &mut self,
        pair: wit::MigrationPair,
        candidates: &[wit::MigrationCandidate],
    ) -> Result<Vec<u64>, CallFailure> {
        let KindCalls::Migration(g) = &self.calls else {
            return Err(CallFailure::wrong_kind());
        };
        guarded(&mut self.store, self.deadline_ticks, |s| {
            g.call_choose(s, pair, candidates)
        })
    }

    pub fn assign(
        &mut self,
        request: wit::RequestMeta,
    ) -> Result<wit::PriorityAssignment, CallFailure> {
        let KindCalls::Priority(g) = &self.calls else {
            return Err(CallFailure::wrong_kind());
        };
        guarded(&mut self.store, self.deadline_ticks, |s| {
            g.call_assign(s, request)
        })
    }

    pub fn decide(&mut self) -> Result<wit::ScalingDecision, CallFailure> {
        let KindCalls::Scaling(g) = &self.calls else {
            return Err(CallFailure::wrong_kind());
        };
        guarded(&mut self.store, self.deadline_ticks, |s| g.call_decide(s))
    }
}

/// Runs one guest call under the deadline, classifying failures.
fn guarded<R>(
    store: &mut Store<GuestState>,
    deadline_ticks: u64,
    call: impl FnOnce(&mut Store<GuestState>) -> wasmtime::Result<R>,
) -> Result<R, CallFailure> {
    store.set_epoch_deadline(deadline_ticks);
    store.data_mut().limits.exceeded = false;
    call(store).map_err(|err| {
        if store.data().limits.exceeded {
            CallFailure::MemoryLimit
        } else if matches!(err.downcast_ref::<Trap>(), Some(Trap::Interrupt)) {
            CallFailure::Timeout
        } else {
            CallFailure::Trap(format!("{err:#}"))
        }
    })
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            call_deadline: Duration::from_millis(50),
            epoch_tick: Duration::from_millis(1),
            memory_limit_bytes: 32 << 20,
            history_max: 256,
            max_consecutive_failures: 3,
            max_failures_in_window: 8,
            failure_window: 16,
            retry_backoff: Duration::from_secs(1),
            max_retry_backoff: Duration::from_secs(300),
            probation_calls: 32,
            clock: super::Clock::system(),
            max_scale_up: 64,
            eager_sync: true,
        }
    }
}
