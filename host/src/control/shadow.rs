//! Shadow policies: a candidate version runs beside the active one on the
//! same live inputs, on a thread of its own, and every disagreement is
//! recorded. The candidate never decides anything.
//!
//! Owns the shadow threads and their reports. Must never delay a live
//! decision: inputs go through a bounded queue and are dropped (counted as
//! skipped) when the shadow falls behind.

use std::collections::{BTreeMap, VecDeque};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use llumen_policy_logic::Fleet;
use serde::Serialize;

use crate::policy::{Answer, CompiledPolicy, PolicyError, PolicyKind, PolicyRuntime, Question};

/// What the active version was asked (alias kept for readability at call sites).
pub type ShadowInput = Question;
/// What the active version answered.
pub type ShadowAnswer = Answer;

/// Disagreements kept per shadow.
const EXAMPLES: usize = 20;
/// Inputs queued for a shadow before new ones are skipped.
const QUEUE: usize = 1024;

/// One recorded disagreement.
#[derive(Clone, Debug, Serialize)]
pub struct Disagreement {
    pub question: String,
    pub active: String,
    pub shadow: String,
}

/// Counters of one shadow.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ShadowReport {
    pub kind: String,
    pub policy: String,
    pub sha256: String,
    pub compared: u64,
    pub agreed: u64,
    pub disagreed: u64,
    /// Calls the shadow failed (trap, timeout, invalid answer).
    pub failed: u64,
    /// Inputs dropped because the shadow fell behind.
    pub skipped: u64,
    /// The latest disagreements, oldest first.
    pub examples: VecDeque<Disagreement>,
}

struct Slot {
    tx: SyncSender<(Fleet, Question, Answer)>,
    report: Arc<Mutex<ShadowReport>>,
}

/// The shadows of every kind.
pub struct Shadows {
    runtime: Arc<PolicyRuntime>,
    slots: Mutex<BTreeMap<PolicyKind, Slot>>,
    any: std::sync::atomic::AtomicBool,
}

impl Shadows {
    pub fn new(runtime: Arc<PolicyRuntime>) -> Self {
        Self {
            runtime,
            slots: Mutex::new(BTreeMap::new()),
            any: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Starts shadowing `kind` with `policy` (replacing an earlier shadow).
    pub fn start(&self, kind: PolicyKind, policy: Arc<CompiledPolicy>) -> Result<(), PolicyError> {
        let mut live = self.runtime.instantiate(&policy, kind)?;
        let (tx, rx) = mpsc::sync_channel::<(Fleet, Question, Answer)>(QUEUE);
        let report = Arc::new(Mutex::new(ShadowReport {
            kind: kind.to_string(),
            policy: policy.name.to_string(),
            sha256: policy.sha256.to_string(),
            ..Default::default()
        }));
        let runtime = self.runtime.clone();
        let shared = report.clone();
        std::thread::Builder::new()
            .name(format!("shadow-{kind}"))
            .spawn(move || {
                for (fleet, question, active) in rx {
                    let result = runtime.ask(&mut live, &fleet, &question);
                    let mut r = shared.lock().unwrap_or_else(|e| e.into_inner());
                    match result {
                        Ok(answer) => {
                            r.compared += 1;
                            if answer == active {
                                r.agreed += 1;
                            } else {
                                r.disagreed += 1;
                                if r.examples.len() == EXAMPLES {
                                    r.examples.pop_front();
                                }
                                r.examples.push_back(Disagreement {
                                    question: format!("{question:?}"),
                                    active: format!("{active:?}"),
                                    shadow: format!("{answer:?}"),
                                });
                            }
                        }
                        Err(failure) => {
                            r.failed += 1;
                            drop(r);
                            tracing::warn!(%kind, %failure, "shadow policy failed a call");
                            match runtime.instantiate(&policy, kind) {
                                Ok(fresh) => live = fresh,
                                Err(_) => return,
                            }
                        }
                    }
                }
            })
            .map_err(|e| PolicyError::Unavailable(format!("starting the shadow thread: {e}")))?;
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(kind, Slot { tx, report });
        self.any.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Stops shadowing `kind`; its last report.
    pub fn stop(&self, kind: PolicyKind) -> Option<ShadowReport> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let slot = slots.remove(&kind)?;
        self.any
            .store(!slots.is_empty(), std::sync::atomic::Ordering::Relaxed);
        let report = slot
            .report
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        Some(report)
    }

    /// Hands a shadow of `question.kind()` the question the active version
    /// answered with `active`. `fleet` is called only when a shadow runs.
    pub fn feed(
        &self,
        kind: PolicyKind,
        question: Question,
        active: Answer,
        fleet: impl FnOnce() -> Fleet,
    ) {
        if !self.any.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let Some(slot) = slots.get(&kind) else { return };
        match slot.tx.try_send((fleet(), question, active)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                slot.report
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .skipped += 1;
            }
        }
    }

    /// Reports of every running shadow.
    pub fn reports(&self) -> Vec<ShadowReport> {
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|s| s.report.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .collect()
    }
}
