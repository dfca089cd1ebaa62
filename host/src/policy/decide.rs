//! The fleet core's [`Decide`] over the policy runtime: the one way the
//! [`Controller`](llumen_fleet::Controller) asks the Wasm policies, in the
//! server and in the simulator alike.
//!
//! **Owns**: counting the calls the active version did not answer (a
//! fallback did), remembering which version answered the last dispatch
//! (for the request journal), and feeding the answers to shadow candidates
//! when there are any. **Never touches**: the decisions themselves (the
//! runtime validates them, the controller acts on them).

use llumen_fleet::Decide;
use llumen_policy_logic::{
    InstanceId, InstanceLoad, MigrationCandidate, MigrationPair, PriorityAssignment, RequestId,
    RequestMeta, ScalingDecision,
};

use super::{Answer, Decision, DecisionSource, PolicyKind, PolicyRuntime, Question};
use crate::control::shadow::Shadows;

/// Asks `runtime` for the controller. Cheap: build one per round or request.
pub struct RuntimeDecide<'a> {
    runtime: &'a PolicyRuntime,
    shadows: Option<&'a Shadows>,
    /// Calls the active version did not answer (a fallback did).
    pub failures: u64,
    /// The first of them, in words.
    pub first_failure: Option<String>,
    /// Which version answered the last dispatch call.
    pub dispatched_by: Option<DecisionSource>,
}

impl<'a> RuntimeDecide<'a> {
    pub fn new(runtime: &'a PolicyRuntime) -> Self {
        Self {
            runtime,
            shadows: None,
            failures: 0,
            first_failure: None,
            dispatched_by: None,
        }
    }

    /// Also feeds every dispatch, priority, plan and scaling answer to the
    /// shadow candidates running on live inputs.
    pub fn with_shadows(mut self, shadows: &'a Shadows) -> Self {
        self.shadows = Some(shadows);
        self
    }

    fn note<T>(&mut self, d: &Decision<T>) {
        if let Some(f) = &d.failure {
            self.failures += 1;
            if self.first_failure.is_none() {
                self.first_failure = Some(format!("{:?}: {f}", d.source));
            }
        }
    }

    fn shadow(&self, kind: PolicyKind, question: Question, answer: Answer) {
        if let Some(s) = self.shadows {
            s.feed(kind, question, answer, || self.runtime.fleet());
        }
    }
}

impl Decide for RuntimeDecide<'_> {
    fn observe(&mut self, load: InstanceLoad) {
        self.runtime.observe(load);
    }

    fn remove_instance(&mut self, instance: InstanceId) {
        self.runtime.remove_instance(instance);
    }

    fn assign_priority(&mut self, request: &RequestMeta) -> PriorityAssignment {
        let d = self.runtime.assign_priority(request);
        self.note(&d);
        self.shadow(
            PolicyKind::Priority,
            Question::Priority(*request),
            Answer::Priority(d.value),
        );
        d.value
    }

    fn dispatch(&mut self, request: &RequestMeta) -> Option<InstanceId> {
        let d = self.runtime.dispatch(request);
        self.note(&d);
        self.shadow(
            PolicyKind::Dispatch,
            Question::Dispatch(*request),
            Answer::Dispatch(d.value),
        );
        self.dispatched_by = Some(d.source);
        d.value
    }

    fn plan_migration(&mut self) -> Vec<MigrationPair> {
        let d = self.runtime.plan_migration();
        self.note(&d);
        if self.shadows.is_some() {
            self.shadow(
                PolicyKind::Migration,
                Question::Plan,
                Answer::Plan(d.value.clone()),
            );
        }
        d.value
    }

    fn choose_migrations(
        &mut self,
        pair: MigrationPair,
        candidates: &[MigrationCandidate],
    ) -> Vec<RequestId> {
        let d = self.runtime.choose_migrations(pair, candidates);
        self.note(&d);
        d.value
    }

    fn decide_scaling(&mut self) -> ScalingDecision {
        let d = self.runtime.decide_scaling();
        self.note(&d);
        self.shadow(
            PolicyKind::Scaling,
            Question::Scaling,
            Answer::Scaling(d.value),
        );
        d.value
    }
}
