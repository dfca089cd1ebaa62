//! Which policy makes each kind of decision in a simulation, and the
//! [`PolicyRuntime`] that runs them.
//!
//! **Owns**: naming policies (a component under the policy directory, a
//! `.wasm` path, or `builtin:NAME` for the native logic) and their
//! parameters, compiling, configuring and swapping the components into a
//! runtime configured for virtual time.
//! **Never touches**: the decisions themselves (the runtime and the
//! components make them), the simulated fleet.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use llumen_host::policy::{CompiledPolicy, PolicyKind, PolicyRuntime, RuntimeConfig};
use llumen_policy_logic::Param;

/// Where one kind's decisions come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicySource {
    /// A Wasm component (what the server runs).
    Component(PathBuf),
    /// The host's native copy of a first-party policy's logic (the runtime's
    /// fallback): same decisions, no sandbox. For comparisons only.
    Builtin(String),
}

impl PolicySource {
    /// `builtin:NAME`, a path (containing `/` or ending in `.wasm`), or a
    /// name: `dir/NAME.wasm`.
    pub fn parse(spec: &str, dir: &Path) -> Self {
        if let Some(name) = spec.strip_prefix("builtin:") {
            PolicySource::Builtin(name.to_string())
        } else if spec.contains('/') || spec.ends_with(".wasm") {
            PolicySource::Component(PathBuf::from(spec))
        } else {
            PolicySource::Component(dir.join(format!("{spec}.wasm")))
        }
    }
}

impl fmt::Display for PolicySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicySource::Component(p) => {
                let stem = p.file_stem().map(|s| s.to_string_lossy());
                write!(f, "{}", stem.as_deref().unwrap_or("?"))
            }
            PolicySource::Builtin(n) => write!(f, "builtin:{n}"),
        }
    }
}

/// The policy behind each kind of decision, and the parameters every one
/// of them is configured with (`llumen:policy/params`; a policy that does
/// not take one refuses the whole set, so a run never goes on under rules
/// it was not asked for).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicySet {
    pub dispatch: PolicySource,
    pub migration: PolicySource,
    pub priority: PolicySource,
    pub scaling: PolicySource,
    pub params: Vec<Param>,
}

impl PolicySet {
    /// The same source for all four kinds.
    pub fn all(source: PolicySource) -> Self {
        Self {
            dispatch: source.clone(),
            migration: source.clone(),
            priority: source.clone(),
            scaling: source,
            params: Vec::new(),
        }
    }

    /// This set with `params` (`name=value` each) added.
    pub fn with_params<'a>(mut self, params: impl IntoIterator<Item = &'a str>) -> Result<Self> {
        let parsed = llumen_policy_logic::params::parse_list(params)
            .map_err(|e| anyhow!("policy parameters: {e}"))?;
        self.params.extend(parsed);
        Ok(self)
    }

    /// `spec` (see [`PolicySource::parse`]) for all four kinds.
    pub fn named(spec: &str, dir: &Path) -> Self {
        Self::all(PolicySource::parse(spec, dir))
    }

    pub fn get(&self, kind: PolicyKind) -> &PolicySource {
        match kind {
            PolicyKind::Dispatch => &self.dispatch,
            PolicyKind::Migration => &self.migration,
            PolicyKind::Priority => &self.priority,
            PolicyKind::Scaling => &self.scaling,
        }
    }

    pub fn get_mut(&mut self, kind: PolicyKind) -> &mut PolicySource {
        match kind {
            PolicyKind::Dispatch => &mut self.dispatch,
            PolicyKind::Migration => &mut self.migration,
            PolicyKind::Priority => &mut self.priority,
            PolicyKind::Scaling => &mut self.scaling,
        }
    }

    /// `llumnix`, or `dispatch=a,migration=b,…` when the kinds differ;
    /// then `[name=value,…]` with parameters.
    pub fn label(&self) -> String {
        let first = self.dispatch.to_string();
        let mut label = if PolicyKind::ALL
            .iter()
            .all(|&k| self.get(k).to_string() == first)
        {
            first
        } else {
            PolicyKind::ALL
                .iter()
                .map(|&k| format!("{k}={}", self.get(k)))
                .collect::<Vec<_>>()
                .join(",")
        };
        if !self.params.is_empty() {
            let list: Vec<String> = self.params.iter().map(ToString::to_string).collect();
            label.push_str(&format!("[{}]", list.join(",")));
        }
        label
    }
}

/// The runtime configuration of a simulation: the decisions must not depend
/// on how fast the host runs, so the wall-clock deadline of a call is far
/// above any honest decision (10 s; the server's is 50 ms) and a coarse
/// epoch tick keeps the ticker thread quiet. `eager_sync` is off: each
/// decision call first sends the guest the loads that changed since its
/// last call (the same view the eager push would have given it), instead of
/// pushing every snapshot into four guests as it arrives. A call that still
/// fails is answered by the fallback and counted
/// ([`super::SimStats::policy_failures`]).
pub fn runtime_config() -> RuntimeConfig {
    RuntimeConfig {
        call_deadline: Duration::from_secs(10),
        epoch_tick: Duration::from_millis(10),
        eager_sync: false,
        ..RuntimeConfig::default()
    }
}

/// A runtime with `set`'s components swapped into their slots. Builtin
/// sources must all name the same policy (the runtime has one builtin per
/// slot, set at creation or by the component swapped in).
pub fn build_runtime(set: &PolicySet) -> Result<PolicyRuntime> {
    let mut builtin: Option<&str> = None;
    for kind in PolicyKind::ALL {
        if let PolicySource::Builtin(name) = set.get(kind) {
            if llumen_policy_logic::by_name(name).is_none() {
                bail!(
                    "no builtin policy named {name:?} (known: {})",
                    llumen_policy_logic::POLICY_NAMES.join(", ")
                );
            }
            match builtin {
                Some(b) if b != name => {
                    bail!("builtin policies differ across kinds ({b} and {name}): use one builtin, or components")
                }
                _ => builtin = Some(name),
            }
        }
    }
    let runtime = PolicyRuntime::new(runtime_config(), builtin.unwrap_or("llumnix"))
        .context("creating the policy runtime")?;
    if builtin.is_some() {
        runtime
            .configure_builtin(&set.params)
            .context("configuring the builtin policy")?;
    }
    let mut compiled: Vec<(PathBuf, Arc<CompiledPolicy>)> = Vec::new();
    for kind in PolicyKind::ALL {
        let PolicySource::Component(path) = set.get(kind) else {
            continue;
        };
        let policy = match compiled.iter().find(|(p, _)| p == path) {
            Some((_, c)) => c.clone(),
            None => {
                if !path.is_file() {
                    bail!(
                        "{}: no such policy component; build them with scripts/build-policies.sh \
                         (or point --policy-dir / LLUMEN_POLICY_DIR at them)",
                        path.display()
                    );
                }
                let c = runtime
                    .compile_file(path)
                    .with_context(|| format!("compiling {}", path.display()))?;
                let c = runtime
                    .configure(&c, &set.params)
                    .with_context(|| format!("configuring {}", path.display()))?;
                compiled.push((path.clone(), c.clone()));
                c
            }
        };
        if !policy.kinds.contains(&kind) {
            bail!(
                "{} does not implement {kind} decisions (it implements {:?}); name another policy for that kind",
                path.display(),
                policy.kinds
            );
        }
        runtime
            .swap(kind, policy)
            .with_context(|| format!("swapping {} into the {kind} slot", path.display()))?;
    }
    Ok(runtime)
}
