//! The admin API: policy registry operations (list, install, swap,
//! rollback, shadow, replay) and status, as JSON commands carried in
//! `Admin` frames (the component bytes ride in the frame's blob).
//!
//! Owns the meaning of admin commands and keeping the running policies and
//! the sled registry in step: a swap is compiled, type-checked and trial-
//! called by the runtime, then recorded as active in sled (durable) and only
//! then answered. Restores the active versions at start. Must never parse
//! frames (the server does) nor decide anything a policy decides.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use llumen_policy_logic::{params, Fleet, Param, RequestMeta};
use llumen_store::{JournalEvent, PolicyMeta, Store};
use serde::{Deserialize, Serialize};

use crate::control::manager::Manager;
use crate::front::api::{ErrorCode, ServeError};
use crate::policy::{Answer, CompiledPolicy, PolicyError, PolicyKind, PolicyRuntime, Question};
use crate::process::clock;

/// One admin command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum AdminCommand {
    Status,
    PolicyList,
    /// Registers the component in the blob (does not activate it).
    PolicyInstall,
    /// Makes a version active for `kind`: the blob's component, or the
    /// registered one whose sha256 starts with `sha256`, configured with
    /// `params` (`name=value` each; none: the policy's defaults).
    PolicySwap {
        kind: String,
        sha256: Option<String>,
        #[serde(default)]
        params: Vec<String>,
    },
    PolicyRollback {
        kind: String,
    },
    /// Shadows `kind` with a candidate (blob or sha256); `stop` ends it and
    /// returns the report.
    PolicyShadow {
        kind: String,
        sha256: Option<String>,
        #[serde(default)]
        stop: bool,
        #[serde(default)]
        params: Vec<String>,
    },
    /// Runs a candidate over recorded snapshots and dispatch decisions
    /// between `from_us` and `to_us`.
    PolicyReplay {
        kind: String,
        sha256: Option<String>,
        #[serde(default)]
        params: Vec<String>,
        from_us: u64,
        to_us: u64,
        /// Most decisions listed in the reply (all are counted).
        #[serde(default = "default_replay_limit")]
        limit: usize,
    },
    /// Live-migrates one running request from `source` to `destination`
    /// now (`request`, or the migration policy's pick).
    Migrate {
        source: u32,
        destination: u32,
        request: Option<u64>,
    },
}

/// An admin frame's gate: the token must match `expected` (constant-time
/// comparison), then `command_json` must parse as an [`AdminCommand`].
/// Pure (no I/O), so the fuzzer drives exactly what the server runs.
pub fn authorize(
    expected: &str,
    token: &str,
    command_json: &str,
) -> Result<AdminCommand, ServeError> {
    if !crate::transport::tls::token_matches(expected, token) {
        return Err(ServeError::new(
            ErrorCode::Unauthorized,
            "wrong or missing admin token",
        ));
    }
    serde_json::from_str::<AdminCommand>(command_json)
        .map_err(|e| ServeError::new(ErrorCode::Malformed, format!("admin command: {e}")))
}

fn default_replay_limit() -> usize {
    50
}

/// Where the default components live: `$LLUMEN_POLICY_DIR`, then
/// `policies/` next to the binary's directory (`target/policies` for
/// `target/<profile>/llumen`), then `target/policies` under the current
/// directory.
pub fn default_policy_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("LLUMEN_POLICY_DIR") {
        dirs.push(PathBuf::from(d));
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Some(profile_dir) = exe.parent() {
            if let Some(target) = profile_dir.parent() {
                dirs.push(target.join("policies"));
            }
        }
    }
    dirs.push(PathBuf::from("target/policies"));
    dirs
}

/// The components `scripts/build-policies.sh` built in this source tree,
/// for tests and benchmarks: `$LLUMEN_POLICY_DIR`, else the workspace's
/// `target/policies`. Panics, saying how to build them, when it holds no
/// `llumnix.wasm`.
pub fn built_policy_dir() -> PathBuf {
    let dir = std::env::var_os("LLUMEN_POLICY_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/policies"));
    assert!(
        dir.join("llumnix.wasm").is_file(),
        "{} has no policy components: run scripts/build-policies.sh (scripts/test.sh does)",
        dir.display()
    );
    dir
}

/// The admin API over a manager and its store.
pub struct Admin {
    manager: Manager,
    /// Compiled versions by sha256 (compiling takes ~0.1–1 s).
    compiled: Mutex<BTreeMap<String, Arc<CompiledPolicy>>>,
}

fn rejected(e: PolicyError) -> ServeError {
    ServeError::new(ErrorCode::PolicyRejected, e.to_string())
}

fn internal(e: impl std::fmt::Display) -> ServeError {
    ServeError::new(ErrorCode::Internal, e.to_string())
}

/// The registry's name of a version: the component's sha256, then `?` and
/// its parameters ([`params::encode_list`]) when it has any.
fn version_id(policy: &CompiledPolicy) -> String {
    if policy.params.is_empty() {
        policy.sha256.to_string()
    } else {
        format!("{}?{}", policy.sha256, params::encode_list(&policy.params))
    }
}

/// `name=value` settings, as given on a command line or in a config file.
fn parse_params(params: &[String]) -> Result<Vec<Param>, ServeError> {
    params::parse_list(params.iter().map(String::as_str))
        .map_err(|e| ServeError::new(ErrorCode::InvalidParameter, e.to_string()))
}

fn parse_kind(kind: &str) -> Result<PolicyKind, ServeError> {
    kind.parse()
        .map_err(|e: String| ServeError::new(ErrorCode::InvalidParameter, e))
}

impl Admin {
    pub fn new(manager: Manager) -> Self {
        Self {
            manager,
            compiled: Mutex::new(BTreeMap::new()),
        }
    }

    fn runtime(&self) -> &Arc<PolicyRuntime> {
        self.manager.runtime()
    }
    fn store(&self) -> &Arc<Store> {
        self.manager.store()
    }

    /// Compiles `bytes` and registers them in sled.
    fn install(&self, bytes: &[u8]) -> Result<Arc<CompiledPolicy>, ServeError> {
        let policy = self.runtime().compile(bytes).map_err(rejected)?;
        let meta = PolicyMeta {
            name: policy.name.to_string(),
            version: policy.version.clone(),
            kinds: policy.kinds.iter().map(|k| k.to_string()).collect(),
            installed_at_us: clock::now_us(),
        };
        if self
            .store()
            .policy_meta(&policy.sha256)
            .map_err(internal)?
            .is_none()
        {
            self.store()
                .put_policy(&policy.sha256, &policy.component_bytes, &meta)
                .map_err(internal)?;
        }
        self.compiled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(policy.sha256.to_string(), policy.clone());
        Ok(policy)
    }

    /// A registered version by (a prefix of) its sha256.
    fn registered(&self, prefix: &str) -> Result<Arc<CompiledPolicy>, ServeError> {
        let prefix = prefix.to_ascii_lowercase();
        let matches: Vec<String> = self
            .store()
            .list_policies()
            .map_err(internal)?
            .into_iter()
            .map(|(sha, _)| sha)
            .filter(|sha| sha.starts_with(&prefix))
            .collect();
        let sha = match matches.as_slice() {
            [one] => one.clone(),
            [] => {
                return Err(ServeError::new(
                    ErrorCode::NotFound,
                    format!("no installed policy has a sha256 starting with {prefix:?}"),
                ))
            }
            _ => {
                return Err(ServeError::new(
                    ErrorCode::InvalidParameter,
                    format!(
                        "{} installed policies match {prefix:?}: give more digits",
                        matches.len()
                    ),
                ))
            }
        };
        if let Some(p) = self
            .compiled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&sha)
        {
            return Ok(p.clone());
        }
        let stored = self
            .store()
            .get_policy(&sha)
            .map_err(internal)?
            .ok_or_else(|| {
                ServeError::new(ErrorCode::NotFound, format!("policy {sha} vanished"))
            })?;
        self.install(&stored.wasm)
    }

    fn candidate(
        &self,
        sha: &Option<String>,
        blob: &[u8],
        params: &[String],
    ) -> Result<Arc<CompiledPolicy>, ServeError> {
        let component = match (sha, blob.is_empty()) {
            (_, false) => self.install(blob)?,
            (Some(sha), true) => self.registered(sha)?,
            (None, true) => {
                return Err(ServeError::new(
                    ErrorCode::InvalidParameter,
                    "give a component file or the sha256 of an installed one",
                ))
            }
        };
        let params = parse_params(params)?;
        self.runtime()
            .configure(&component, &params)
            .map_err(rejected)
    }

    /// A recorded version (see [`version_id`]): the registered component,
    /// configured with the parameters the record names.
    fn version(&self, id: &str) -> Result<Arc<CompiledPolicy>, ServeError> {
        let (sha, params) = id.split_once('?').unwrap_or((id, ""));
        let params = params::decode_list(params).map_err(|e| {
            ServeError::new(
                ErrorCode::InvalidParameter,
                format!("recorded version {id:?}: {e}"),
            )
        })?;
        let component = self.registered(sha)?;
        self.runtime()
            .configure(&component, &params)
            .map_err(rejected)
    }

    /// Makes `policy` active for `kind` in the runtime, then in sled.
    fn activate(&self, kind: PolicyKind, policy: Arc<CompiledPolicy>) -> Result<(), ServeError> {
        self.runtime()
            .swap(kind, policy.clone())
            .map_err(rejected)?;
        self.store()
            .set_active(kind.as_str(), &version_id(&policy))
            .map_err(internal)?;
        Ok(())
    }

    /// At start: the active versions recorded in sled (with the
    /// parameters they were configured with), or else the default
    /// `default_policy` component from the policy directories, configured
    /// with `params`, for every kind it implements. Kinds with neither stay
    /// on the builtin (configured with `params`). Parameters the default
    /// policy refuses are an error: the server must not start on rules its
    /// operator did not ask for.
    pub fn restore(
        &self,
        default_policy: &str,
        dirs: &[PathBuf],
        params: &[String],
    ) -> Result<Vec<String>, ServeError> {
        let parsed = parse_params(params)?;
        // A first-party default checks its parameters natively (and its
        // builtin twin takes them); another component checks its own when
        // it is configured below, its fallback keeping the builtin's defaults.
        match llumen_policy_logic::configured(default_policy, &parsed) {
            Err(e) => {
                return Err(ServeError::new(
                    ErrorCode::InvalidParameter,
                    format!("--policy-param for {default_policy}: {e}"),
                ))
            }
            Ok(Some(_)) => self
                .runtime()
                .configure_builtin(&parsed)
                .map_err(rejected)?,
            Ok(None) => {}
        }
        let mut notes = Vec::new();
        for kind in PolicyKind::ALL {
            let active = self.store().active(kind.as_str()).ok().flatten();
            if let Some(sha) = active {
                match self.version(&sha).and_then(|p| {
                    self.runtime()
                        .swap(kind, p.clone())
                        .map(|_| p)
                        .map_err(rejected)
                }) {
                    Ok(p) => {
                        notes.push(format!("{kind}: {} (restored from the registry)", p.label));
                        continue;
                    }
                    Err(e) => {
                        notes.push(format!("{kind}: stored version {sha} failed to load: {e}"))
                    }
                }
            }
            let file = dirs
                .iter()
                .map(|d| d.join(format!("{default_policy}.wasm")))
                .find(|p| p.is_file());
            let Some(file) = file else {
                notes.push(format!(
                    "{kind}: builtin {default_policy} (no {default_policy}.wasm in {})",
                    dirs.iter()
                        .map(|d| d.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
                continue;
            };
            let installed = std::fs::read(&file)
                .map_err(|e| internal(format!("reading {}: {e}", file.display())))
                .and_then(|bytes| self.install(&bytes));
            // Parameters the default component refuses stop the server.
            let installed = match installed {
                Ok(p) => Ok(self.runtime().configure(&p, &parsed).map_err(|e| {
                    ServeError::new(
                        ErrorCode::InvalidParameter,
                        format!("--policy-param for {}: {e}", file.display()),
                    )
                })?),
                Err(e) => Err(e),
            };
            match installed.and_then(|p| {
                if p.kinds.contains(&kind) {
                    self.activate(kind, p.clone()).map(|_| Some(p))
                } else {
                    Ok(None)
                }
            }) {
                Ok(Some(p)) => notes.push(format!("{kind}: {} from {}", p.label, file.display())),
                Ok(None) => notes.push(format!(
                    "{kind}: builtin ({} has no {kind})",
                    file.display()
                )),
                Err(e) => notes.push(format!("{kind}: builtin ({}: {e})", file.display())),
            }
        }
        Ok(notes)
    }

    /// Runs one command.
    pub fn handle(
        &self,
        command: AdminCommand,
        blob: &[u8],
    ) -> Result<serde_json::Value, ServeError> {
        let json = |v: serde_json::Result<serde_json::Value>| v.map_err(internal);
        match command {
            AdminCommand::Status => json(serde_json::to_value(self.manager.status())),
            AdminCommand::PolicyList => {
                let actives: BTreeMap<String, String> = self
                    .store()
                    .actives()
                    .map_err(internal)?
                    .into_iter()
                    .collect();
                let mut out = Vec::new();
                for (sha, meta) in self.store().list_policies().map_err(internal)? {
                    let active_for: Vec<&String> = actives
                        .iter()
                        .filter(|(_, s)| s.split('?').next() == Some(sha.as_str()))
                        .map(|(k, _)| k)
                        .collect();
                    out.push(serde_json::json!({
                        "sha256": sha,
                        "name": meta.name,
                        "version": meta.version,
                        "kinds": meta.kinds,
                        "installed_at_us": meta.installed_at_us,
                        "active_for": active_for,
                    }));
                }
                let history: BTreeMap<&str, Vec<String>> = PolicyKind::ALL
                    .iter()
                    .map(|k| {
                        (
                            k.as_str(),
                            self.store().history(k.as_str()).unwrap_or_default(),
                        )
                    })
                    .collect();
                Ok(serde_json::json!({ "policies": out, "active": actives, "history": history }))
            }
            AdminCommand::PolicyInstall => {
                if blob.is_empty() {
                    return Err(ServeError::new(
                        ErrorCode::InvalidParameter,
                        "no component given",
                    ));
                }
                let p = self.install(blob)?;
                Ok(serde_json::json!({
                    "sha256": &*p.sha256, "name": &*p.name, "version": p.version,
                    "kinds": p.kinds.iter().map(|k| k.as_str()).collect::<Vec<_>>(),
                }))
            }
            AdminCommand::PolicySwap {
                kind,
                sha256,
                params,
            } => {
                let kind = parse_kind(&kind)?;
                let p = self.candidate(&sha256, blob, &params)?;
                if !p.kinds.contains(&kind) {
                    return Err(ServeError::new(
                        ErrorCode::PolicyRejected,
                        format!(
                            "{} does not implement the {kind} world (it implements: {})",
                            p.label,
                            p.kinds
                                .iter()
                                .map(|k| k.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ));
                }
                let previous = self.store().active(kind.as_str()).map_err(internal)?;
                self.activate(kind, p.clone())?;
                Ok(serde_json::json!({
                    "kind": kind.as_str(), "active": &*p.sha256, "name": &*p.name,
                    "version": version_id(&p), "label": p.label,
                    "previous": previous,
                }))
            }
            AdminCommand::PolicyRollback { kind } => {
                let kind = parse_kind(&kind)?;
                let sha = self
                    .store()
                    .history(kind.as_str())
                    .map_err(internal)?
                    .pop()
                    .ok_or_else(|| {
                        ServeError::new(
                            ErrorCode::NotFound,
                            format!("no earlier {kind} policy to roll back to"),
                        )
                    })?;
                let p = self.version(&sha)?;
                self.runtime().swap(kind, p.clone()).map_err(rejected)?;
                self.store().rollback(kind.as_str()).map_err(internal)?;
                Ok(
                    serde_json::json!({ "kind": kind.as_str(), "active": &*p.sha256, "name": &*p.name }),
                )
            }
            AdminCommand::PolicyShadow {
                kind,
                sha256,
                stop,
                params,
            } => {
                let kind = parse_kind(&kind)?;
                if stop {
                    let report = self.manager.shadows().stop(kind).ok_or_else(|| {
                        ServeError::new(ErrorCode::NotFound, format!("no {kind} shadow is running"))
                    })?;
                    return json(serde_json::to_value(report));
                }
                let p = self.candidate(&sha256, blob, &params)?;
                self.manager
                    .shadows()
                    .start(kind, p.clone())
                    .map_err(rejected)?;
                Ok(
                    serde_json::json!({ "kind": kind.as_str(), "shadow": &*p.sha256, "name": &*p.name }),
                )
            }
            AdminCommand::Migrate {
                source,
                destination,
                request,
            } => {
                let manager = self.manager.clone();
                let started = tokio::runtime::Handle::current().block_on(async move {
                    manager.migrate_now(source, destination, request).await
                })?;
                Ok(
                    serde_json::json!({ "started": started, "source": source, "destination": destination }),
                )
            }
            AdminCommand::PolicyReplay {
                kind,
                sha256,
                params,
                from_us,
                to_us,
                limit,
            } => {
                let kind = parse_kind(&kind)?;
                if from_us > to_us {
                    return Err(ServeError::new(
                        ErrorCode::InvalidParameter,
                        "--from is after --to",
                    ));
                }
                let p = self.candidate(&sha256, blob, &params)?;
                self.manager.flush();
                let report = replay(
                    self.runtime(),
                    self.store(),
                    &p,
                    kind,
                    from_us,
                    to_us,
                    limit,
                )
                .map_err(|e| ServeError::new(ErrorCode::InvalidParameter, e))?;
                json(serde_json::to_value(report))
            }
        }
    }
}

/// One replayed decision.
#[derive(Clone, Debug, Serialize)]
pub struct ReplayedDecision {
    pub at_us: u64,
    pub request: Option<u64>,
    pub recorded: Option<String>,
    pub replayed: String,
    pub agrees: Option<bool>,
}

/// What a replay found.
#[derive(Clone, Debug, Serialize)]
pub struct ReplayReport {
    pub kind: String,
    pub policy: String,
    pub sha256: String,
    pub from_us: u64,
    pub to_us: u64,
    pub snapshots: usize,
    pub decisions: usize,
    pub agreed: usize,
    pub disagreed: usize,
    pub failed: usize,
    pub listed: Vec<ReplayedDecision>,
}

/// Runs `policy` over the snapshots recorded in `[from_us, to_us]`:
/// dispatch is asked again for every recorded dispatch (on the fleet as the
/// snapshots show it at that moment) and compared with what was decided;
/// the other kinds are asked at every distinct snapshot time.
pub fn replay(
    runtime: &PolicyRuntime,
    store: &Store,
    policy: &Arc<CompiledPolicy>,
    kind: PolicyKind,
    from_us: u64,
    to_us: u64,
    limit: usize,
) -> Result<ReplayReport, String> {
    if !policy.kinds.contains(&kind) {
        return Err(format!("{} does not implement {kind}", policy.label));
    }
    let mut live = runtime
        .instantiate(policy, kind)
        .map_err(|e| e.to_string())?;
    // Start from each instance's last snapshot before the window.
    let mut fleet = Fleet::new();
    for instance in store.instances().map_err(|e| e.to_string())? {
        let before = store
            .range(instance, 0, from_us.saturating_sub(1))
            .map_err(|e| e.to_string())?;
        if let Some(last) = before.last() {
            fleet.upsert([*last]);
        }
    }
    let mut snapshots = store.range_all(from_us, to_us).map_err(|e| e.to_string())?;
    snapshots.sort_by_key(|s| s.timestamp_us);
    let mut report = ReplayReport {
        kind: kind.to_string(),
        policy: policy.name.to_string(),
        sha256: policy.sha256.to_string(),
        from_us,
        to_us,
        snapshots: snapshots.len(),
        decisions: 0,
        agreed: 0,
        disagreed: 0,
        failed: 0,
        listed: Vec::new(),
    };
    // (time, question, recorded answer)
    let mut questions: Vec<(u64, Option<u64>, Question, Option<String>)> = Vec::new();
    match kind {
        PolicyKind::Dispatch | PolicyKind::Priority => {
            for d in store
                .dispatches_between(from_us, to_us)
                .map_err(|e| e.to_string())?
            {
                let accepted = store
                    .journal_events(d.request)
                    .map_err(|e| e.to_string())?
                    .into_iter()
                    .find_map(|e| match e {
                        JournalEvent::Accepted {
                            at_us,
                            prompt_tokens,
                            max_tokens,
                            priority,
                        } => Some((at_us, prompt_tokens, max_tokens, priority)),
                        _ => None,
                    });
                let Some((arrival_us, prompt_tokens, max_tokens, priority)) = accepted else {
                    continue;
                };
                let meta = RequestMeta {
                    id: d.request,
                    prompt_tokens,
                    max_tokens,
                    requested_priority: priority,
                    priority,
                    prefix_hash: 0,
                    arrival_us,
                };
                if kind == PolicyKind::Dispatch {
                    questions.push((
                        d.at_us,
                        Some(d.request),
                        Question::Dispatch(meta),
                        Some(format!("{} (by {})", d.instance, d.decided_by)),
                    ));
                } else {
                    questions.push((d.at_us, Some(d.request), Question::Priority(meta), None));
                }
            }
        }
        PolicyKind::Migration | PolicyKind::Scaling => {
            let mut last = None;
            for s in &snapshots {
                if last != Some(s.timestamp_us / 100_000) {
                    last = Some(s.timestamp_us / 100_000);
                    let q = if kind == PolicyKind::Migration {
                        Question::Plan
                    } else {
                        Question::Scaling
                    };
                    questions.push((s.timestamp_us, None, q, None));
                }
            }
        }
    }
    questions.sort_by_key(|q| q.0);
    let mut next = 0;
    for (at_us, request, question, recorded) in questions {
        while next < snapshots.len() && snapshots[next].timestamp_us <= at_us {
            fleet.upsert([snapshots[next]]);
            next += 1;
        }
        report.decisions += 1;
        let (replayed, agrees) = match runtime.ask(&mut live, &fleet, &question) {
            Ok(answer) => {
                let agrees = match (&answer, &recorded) {
                    (Answer::Dispatch(Some(i)), Some(r)) => {
                        Some(r.split(' ').next() == Some(i.to_string().as_str()))
                    }
                    _ => None,
                };
                match agrees {
                    Some(true) => report.agreed += 1,
                    Some(false) => report.disagreed += 1,
                    None => {}
                }
                (
                    match answer {
                        Answer::Dispatch(Some(i)) => i.to_string(),
                        other => format!("{other:?}"),
                    },
                    agrees,
                )
            }
            Err(f) => {
                report.failed += 1;
                live = runtime
                    .instantiate(policy, kind)
                    .map_err(|e| e.to_string())?;
                (format!("failed: {f}"), None)
            }
        };
        if report.listed.len() < limit {
            report.listed.push(ReplayedDecision {
                at_us,
                request,
                recorded,
                replayed,
                agrees,
            });
        }
    }
    Ok(report)
}

/// Reads a component file for the CLI.
pub fn read_component(path: &Path) -> anyhow::Result<Vec<u8>> {
    use anyhow::Context;
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}
