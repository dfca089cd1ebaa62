//! The Prometheus registry of the serving path, rendered in the text
//! exposition format (version 0.0.4) that `GET /metrics` serves.
//!
//! No external crate: counters and histograms are atomics, labelled counters
//! and the per-instance gauges sit behind short mutexes. The manager updates
//! them as requests and instance loads go by; [`Metrics::render`] adds the
//! policy runtime's counters from its [`SlotStatus`] list.
//!
//! # Metric families
//!
//! Request latencies (histograms, seconds, fixed buckets from 1 ms to 60 s,
//! see [`LATENCY_BUCKETS`]):
//! - `llumen_request_ttft_seconds`: arrival to the first token.
//! - `llumen_request_inter_token_latency_seconds`: between two tokens of a
//!   request.
//! - `llumen_request_e2e_seconds`: arrival to the last token.
//! - `llumen_request_queue_seconds`: arrival to the first scheduled step.
//!
//! Request counters:
//! - `llumen_requests_accepted_total`
//! - `llumen_requests_rejected_total{code}`: `code` is
//!   [`ErrorCode::as_str`] (every code is listed, zeros included).
//! - `llumen_requests_finished_total{outcome}`: `length`, `stop`,
//!   `cancelled`, `failed`.
//! - `llumen_prompt_tokens_total`, `llumen_generation_tokens_total`
//! - `llumen_migrations_total{outcome}`: `planned`, `completed`, `aborted`.
//! - `llumen_requests_redispatched_total`: requests sent to another instance
//!   after theirs was lost.
//! - `llumen_scaling_events_total{action}`: `scale_up`, `drain`, `stopped`.
//!
//! Per-instance gauges (label `instance`, from the latest
//! [`InstanceLoad`] of each instance):
//! - `llumen_instance_requests_running`, `llumen_instance_requests_waiting`
//! - `llumen_instance_kv_usage_ratio`: used / total KV blocks (0 ..= 1).
//! - `llumen_instance_kv_blocks_used`, `llumen_instance_kv_blocks_total`
//! - `llumen_instance_draining`: 1 while the instance drains.
//! - `llumen_instance_step_latency_seconds`: the last engine step.
//!
//! Fleet gauges: `llumen_instances` (instances reporting) and
//! `llumen_queue_depth` (waiting requests summed over the fleet).
//!
//! vLLM-style aliases that existing dashboards know (label `instance`, the
//! cache usage as a 0 ..= 1 fraction as vLLM reports it):
//! `vllm:num_requests_running`, `vllm:num_requests_waiting`,
//! `vllm:gpu_cache_usage_perc`.
//!
//! Policy runtime (labels `kind` = dispatch | migration | priority |
//! scaling, `version` = the stats label, `<name>@<sha256 prefix>` or
//! `builtin:<name>`):
//! - `llumen_policy_calls_total{kind,version}`
//! - `llumen_policy_failures_total{kind,version,reason}`: `reason` is
//!   `timeout`, `memory_limit`, `trap`, `invalid_answer` or `unavailable`.
//! - `llumen_policy_fallback_answers_total{kind,version}`: calls this version
//!   answered as a stand-in for a failed active one.
//! - `llumen_policy_call_duration_seconds` (summary without quantiles:
//!   `_sum` and `_count` over the sampled calls, one in
//!   [`crate::policy::LATENCY_SAMPLE_EVERY`]) and the gauge
//!   `llumen_policy_call_duration_seconds_max` (slowest sampled call).
//! - `llumen_policy_active{kind,version}`: 1 for the version that answers
//!   the slot's calls now (the builtin when no Wasm version is active), 0 for
//!   the others.
//! - `llumen_policy_demotions_total{kind,version}`: times the version was
//!   demoted after repeated failures; `llumen_policy_retries_total{kind,version}`:
//!   times it was re-activated on probation after its back-off.
//! - `llumen_policy_decision_duration_seconds{kind}` (summary, quantiles
//!   0.5, 0.99 and 0.999, `_sum`, `_count`): whole decisions, the fallback
//!   chain included, estimated from the runtime's weighted sample (see
//!   [`crate::policy`]: every decision while a slot is unsettled, one in
//!   [`crate::policy::LATENCY_SAMPLE_EVERY`] otherwise).
//!
//! Owns only counting and formatting; must never block on anything but its
//! own short locks (it is called on the token path).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use llumen_policy_logic::InstanceLoad;

use crate::front::api::ErrorCode;
use crate::policy::SlotStatus;

/// Upper bounds (seconds) of the latency histograms' buckets; `+Inf` is
/// added when rendering.
pub const LATENCY_BUCKETS: [f64; 22] = [
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0,
];

const FINISH_OUTCOMES: [&str; 4] = ["length", "stop", "cancelled", "failed"];
const MIGRATION_OUTCOMES: [&str; 3] = ["planned", "completed", "aborted"];
const SCALING_ACTIONS: [&str; 3] = ["scale_up", "drain", "stopped"];

/// The serving path's metrics. `Send + Sync`; share it as `Arc<Metrics>`.
pub struct Metrics {
    accepted: AtomicU64,
    /// Indexed like [`ErrorCode::ALL`].
    rejected: [AtomicU64; ErrorCode::ALL.len()],
    finished: LabeledCounter,
    ttft: Histogram,
    inter_token: Histogram,
    e2e: Histogram,
    queue: Histogram,
    prompt_tokens: AtomicU64,
    generation_tokens: AtomicU64,
    migrations: LabeledCounter,
    redispatched: AtomicU64,
    scaling: LabeledCounter,
    instances: Mutex<BTreeMap<u32, InstanceLoad>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self {
            accepted: AtomicU64::new(0),
            rejected: std::array::from_fn(|_| AtomicU64::new(0)),
            finished: LabeledCounter::new(&FINISH_OUTCOMES),
            ttft: Histogram::new(),
            inter_token: Histogram::new(),
            e2e: Histogram::new(),
            queue: Histogram::new(),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            migrations: LabeledCounter::new(&MIGRATION_OUTCOMES),
            redispatched: AtomicU64::new(0),
            scaling: LabeledCounter::new(&SCALING_ACTIONS),
            instances: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn request_accepted(&self) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
    }

    pub fn request_rejected(&self, code: ErrorCode) {
        if let Some(i) = ErrorCode::ALL.iter().position(|c| *c == code) {
            self.rejected[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `outcome`: `length`, `stop`, `cancelled` or `failed` (any other
    /// string is counted under its own label).
    pub fn request_finished(&self, outcome: &str) {
        self.finished.add(outcome, 1);
    }

    pub fn observe_ttft(&self, seconds: f64) {
        self.ttft.observe(seconds);
    }

    pub fn observe_inter_token(&self, seconds: f64) {
        self.inter_token.observe(seconds);
    }

    pub fn observe_e2e(&self, seconds: f64) {
        self.e2e.observe(seconds);
    }

    pub fn observe_queue(&self, seconds: f64) {
        self.queue.observe(seconds);
    }

    pub fn observe_tokens(&self, prompt: u64, completion: u64) {
        self.prompt_tokens.fetch_add(prompt, Ordering::Relaxed);
        self.generation_tokens
            .fetch_add(completion, Ordering::Relaxed);
    }

    /// Records the latest load of `load.instance` (replacing the previous).
    pub fn set_instance_load(&self, load: &InstanceLoad) {
        lock(&self.instances).insert(load.instance, *load);
    }

    /// Forgets an instance (its gauges disappear from the output).
    pub fn remove_instance(&self, instance: u32) {
        lock(&self.instances).remove(&instance);
    }

    /// `outcome`: `planned`, `completed` or `aborted`.
    pub fn migrations(&self, outcome: &str, n: u64) {
        self.migrations.add(outcome, n);
    }

    pub fn redispatched(&self, n: u64) {
        self.redispatched.fetch_add(n, Ordering::Relaxed);
    }

    /// `action`: `scale_up`, `drain` or `stopped`.
    pub fn scaling(&self, action: &str) {
        self.scaling.add(action, 1);
    }

    /// Every metric in the Prometheus text exposition format (0.0.4), the
    /// policy families taken from `policies`.
    pub fn render(&self, policies: &[SlotStatus]) -> String {
        let mut out = Out::default();

        // Requests.
        out.family(
            "llumen_requests_accepted_total",
            "counter",
            "Requests accepted for generation.",
        );
        out.sample("llumen_requests_accepted_total", &[], load(&self.accepted));
        out.family(
            "llumen_requests_rejected_total",
            "counter",
            "Requests refused before generation, by error code.",
        );
        for (code, n) in ErrorCode::ALL.iter().zip(&self.rejected) {
            out.sample(
                "llumen_requests_rejected_total",
                &[("code", code.as_str())],
                load(n),
            );
        }
        out.family(
            "llumen_requests_finished_total",
            "counter",
            "Requests that ended, by outcome (length, stop, cancelled, failed).",
        );
        for (outcome, n) in self.finished.snapshot() {
            out.sample(
                "llumen_requests_finished_total",
                &[("outcome", &outcome)],
                n,
            );
        }
        out.family(
            "llumen_prompt_tokens_total",
            "counter",
            "Prompt tokens of the requests served.",
        );
        out.sample("llumen_prompt_tokens_total", &[], load(&self.prompt_tokens));
        out.family(
            "llumen_generation_tokens_total",
            "counter",
            "Tokens generated.",
        );
        out.sample(
            "llumen_generation_tokens_total",
            &[],
            load(&self.generation_tokens),
        );
        out.family(
            "llumen_migrations_total",
            "counter",
            "Live request migrations, by outcome (planned, completed, aborted).",
        );
        for (outcome, n) in self.migrations.snapshot() {
            out.sample("llumen_migrations_total", &[("outcome", &outcome)], n);
        }
        out.family(
            "llumen_requests_redispatched_total",
            "counter",
            "Requests sent to another instance after theirs was lost.",
        );
        out.sample(
            "llumen_requests_redispatched_total",
            &[],
            load(&self.redispatched),
        );
        out.family(
            "llumen_scaling_events_total",
            "counter",
            "Scaling actions, by action (scale_up, drain, stopped).",
        );
        for (action, n) in self.scaling.snapshot() {
            out.sample("llumen_scaling_events_total", &[("action", &action)], n);
        }

        // Latencies.
        self.ttft.render(
            &mut out,
            "llumen_request_ttft_seconds",
            "Time from a request's arrival to its first token.",
        );
        self.inter_token.render(
            &mut out,
            "llumen_request_inter_token_latency_seconds",
            "Time between two consecutive tokens of a request.",
        );
        self.e2e.render(
            &mut out,
            "llumen_request_e2e_seconds",
            "Time from a request's arrival to its last token.",
        );
        self.queue.render(
            &mut out,
            "llumen_request_queue_seconds",
            "Time from a request's arrival to its first scheduled step.",
        );

        // Instances.
        let loads: Vec<InstanceLoad> = lock(&self.instances).values().copied().collect();
        let ids: Vec<String> = loads.iter().map(|l| l.instance.to_string()).collect();
        let per_instance = |out: &mut Out,
                            name: &str,
                            kind: &str,
                            help: &str,
                            value: &dyn Fn(&InstanceLoad) -> f64| {
            out.family(name, kind, help);
            for (l, id) in loads.iter().zip(&ids) {
                out.sample(name, &[("instance", id)], value(l));
            }
        };
        let usage = |l: &InstanceLoad| {
            if l.total_blocks == 0 {
                0.0
            } else {
                f64::from(l.used_blocks) / f64::from(l.total_blocks)
            }
        };
        per_instance(
            &mut out,
            "llumen_instance_requests_running",
            "gauge",
            "Requests running on the instance.",
            &|l| f64::from(l.running),
        );
        per_instance(
            &mut out,
            "llumen_instance_requests_waiting",
            "gauge",
            "Requests waiting on the instance.",
            &|l| f64::from(l.waiting),
        );
        per_instance(
            &mut out,
            "llumen_instance_kv_usage_ratio",
            "gauge",
            "Used KV-cache blocks over total blocks (0 to 1).",
            &usage,
        );
        per_instance(
            &mut out,
            "llumen_instance_kv_blocks_used",
            "gauge",
            "KV-cache blocks in use.",
            &|l| f64::from(l.used_blocks),
        );
        per_instance(
            &mut out,
            "llumen_instance_kv_blocks_total",
            "gauge",
            "KV-cache blocks of the instance.",
            &|l| f64::from(l.total_blocks),
        );
        per_instance(
            &mut out,
            "llumen_instance_draining",
            "gauge",
            "1 while the instance drains (takes no new requests).",
            &|l| if l.draining { 1.0 } else { 0.0 },
        );
        per_instance(
            &mut out,
            "llumen_instance_step_latency_seconds",
            "gauge",
            "Duration of the instance's last engine step.",
            &|l| f64::from(l.step_latency_us) / 1e6,
        );
        out.family(
            "llumen_instances",
            "gauge",
            "Instances reporting their load.",
        );
        out.sample("llumen_instances", &[], loads.len() as f64);
        out.family(
            "llumen_queue_depth",
            "gauge",
            "Requests waiting, summed over the fleet.",
        );
        out.sample(
            "llumen_queue_depth",
            &[],
            loads.iter().map(|l| u64::from(l.waiting)).sum::<u64>(),
        );
        per_instance(
            &mut out,
            "vllm:num_requests_running",
            "gauge",
            "Requests running on the instance (vLLM name).",
            &|l| f64::from(l.running),
        );
        per_instance(
            &mut out,
            "vllm:num_requests_waiting",
            "gauge",
            "Requests waiting on the instance (vLLM name).",
            &|l| f64::from(l.waiting),
        );
        per_instance(
            &mut out,
            "vllm:gpu_cache_usage_perc",
            "gauge",
            "KV-cache usage of the instance, 0 to 1 (vLLM name).",
            &usage,
        );

        render_policies(&mut out, policies);
        out.text
    }
}

/// The policy runtime's families, from its slot statuses.
fn render_policies(out: &mut Out, policies: &[SlotStatus]) {
    struct Row<'a> {
        kind: &'static str,
        version: &'a str,
        active: bool,
        stats: &'a crate::policy::VersionStats,
    }
    let mut rows = Vec::new();
    for slot in policies {
        let active = active_label(slot);
        for (version, stats) in &slot.stats {
            rows.push(Row {
                kind: slot.kind.as_str(),
                version,
                active: active.as_deref() == Some(version.as_str()),
                stats,
            });
        }
    }
    fn labels<'a>(r: &Row<'a>) -> [(&'static str, &'a str); 2] {
        [("kind", r.kind), ("version", r.version)]
    }

    out.family(
        "llumen_policy_calls_total",
        "counter",
        "Calls into a policy version.",
    );
    for r in &rows {
        out.sample("llumen_policy_calls_total", &labels(r), r.stats.calls);
    }
    out.family(
        "llumen_policy_failures_total",
        "counter",
        "Failed calls into a policy version, by reason.",
    );
    for r in &rows {
        let s = r.stats;
        for (reason, n) in [
            ("timeout", s.timeouts),
            ("memory_limit", s.memory_limits),
            ("trap", s.traps),
            ("invalid_answer", s.invalid_answers),
            ("unavailable", s.unavailable),
        ] {
            out.sample(
                "llumen_policy_failures_total",
                &[("kind", r.kind), ("version", r.version), ("reason", reason)],
                n,
            );
        }
    }
    out.family(
        "llumen_policy_fallback_answers_total",
        "counter",
        "Calls a policy version answered in place of a failed active version.",
    );
    for r in &rows {
        out.sample(
            "llumen_policy_fallback_answers_total",
            &labels(r),
            r.stats.answered_as_fallback,
        );
    }
    out.family(
        "llumen_policy_call_duration_seconds",
        "summary",
        "Duration of the sampled calls into a policy version.",
    );
    for r in &rows {
        out.sample(
            "llumen_policy_call_duration_seconds_sum",
            &labels(r),
            r.stats.sampled_call_ns_total as f64 / 1e9,
        );
        out.sample(
            "llumen_policy_call_duration_seconds_count",
            &labels(r),
            r.stats.sampled_calls,
        );
    }
    out.family(
        "llumen_policy_call_duration_seconds_max",
        "gauge",
        "Slowest sampled call into a policy version.",
    );
    for r in &rows {
        out.sample(
            "llumen_policy_call_duration_seconds_max",
            &labels(r),
            r.stats.max_sampled_call_ns as f64 / 1e9,
        );
    }
    out.family(
        "llumen_policy_active",
        "gauge",
        "1 for the policy version that answers the slot's calls now.",
    );
    for r in &rows {
        out.sample("llumen_policy_active", &labels(r), u64::from(r.active));
    }
    out.family(
        "llumen_policy_demotions_total",
        "counter",
        "Times a policy version was demoted after repeated failures.",
    );
    for r in &rows {
        out.sample(
            "llumen_policy_demotions_total",
            &labels(r),
            r.stats.demotions,
        );
    }
    out.family(
        "llumen_policy_retries_total",
        "counter",
        "Times a demoted policy version was retried on probation after its back-off.",
    );
    for r in &rows {
        out.sample("llumen_policy_retries_total", &labels(r), r.stats.retries);
    }
    out.family(
        "llumen_policy_decision_duration_seconds",
        "summary",
        "Duration of whole policy decisions, fallbacks included.",
    );
    for slot in policies {
        let kind = slot.kind.as_str();
        let l = &slot.decision_latency;
        for (q, ns) in [("0.5", l.p50_ns), ("0.99", l.p99_ns), ("0.999", l.p999_ns)] {
            out.sample(
                "llumen_policy_decision_duration_seconds",
                &[("kind", kind), ("quantile", q)],
                ns as f64 / 1e9,
            );
        }
        out.sample(
            "llumen_policy_decision_duration_seconds_sum",
            &[("kind", kind)],
            l.sum_ns as f64 / 1e9,
        );
        out.sample(
            "llumen_policy_decision_duration_seconds_count",
            &[("kind", kind)],
            l.count,
        );
    }
}

/// The stats label of the version that answers `slot`'s calls: the active
/// Wasm version (`<name>@<sha256 prefix>`), else `builtin:<name>`.
fn active_label(slot: &SlotStatus) -> Option<String> {
    let Some(active) = &slot.active else {
        return Some(format!("builtin:{}", slot.builtin));
    };
    let prefix = format!("{}@", active.name);
    slot.stats
        .keys()
        .find(|k| {
            k.strip_prefix(&prefix)
                .is_some_and(|sha| !sha.is_empty() && active.sha256.starts_with(sha))
        })
        .cloned()
}

/// A counter with one free-form label; the expected label values are
/// listed (as zeros) from the start.
struct LabeledCounter(Mutex<BTreeMap<String, u64>>);

impl LabeledCounter {
    fn new(known: &[&str]) -> Self {
        Self(Mutex::new(
            known.iter().map(|k| (k.to_string(), 0)).collect(),
        ))
    }

    fn add(&self, label: &str, n: u64) {
        let mut map = lock(&self.0);
        match map.get_mut(label) {
            Some(v) => *v += n,
            None => {
                map.insert(label.to_string(), n);
            }
        }
    }

    fn snapshot(&self) -> Vec<(String, u64)> {
        lock(&self.0).iter().map(|(k, v)| (k.clone(), *v)).collect()
    }
}

/// A latency histogram over [`LATENCY_BUCKETS`].
struct Histogram {
    /// Per-bucket (not cumulative) counts; the last one is above the
    /// highest bound.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    /// f64 bits.
    sum: AtomicU64,
}

impl Histogram {
    fn new() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum: AtomicU64::new(0f64.to_bits()),
        }
    }

    fn observe(&self, seconds: f64) {
        if seconds.is_nan() {
            return;
        }
        let v = seconds.max(0.0);
        let i = LATENCY_BUCKETS
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        if v.is_finite() {
            let _ = self
                .sum
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                    Some((f64::from_bits(bits) + v).to_bits())
                });
        }
    }

    fn render(&self, out: &mut Out, name: &str, help: &str) {
        out.family(name, "histogram", help);
        let bucket = format!("{name}_bucket");
        let mut cumulative = 0u64;
        for (i, n) in self.buckets.iter().enumerate() {
            cumulative += load(n);
            let le = match LATENCY_BUCKETS.get(i) {
                Some(b) => fmt_f64(*b),
                None => "+Inf".to_string(),
            };
            out.sample(&bucket, &[("le", &le)], cumulative);
        }
        out.sample(
            &format!("{name}_sum"),
            &[],
            f64::from_bits(self.sum.load(Ordering::Relaxed)),
        );
        // The count is the +Inf bucket by construction.
        out.sample(&format!("{name}_count"), &[], cumulative);
    }
}

/// A value printed in a sample line.
trait SampleValue {
    fn write(&self, s: &mut String);
}

impl SampleValue for u64 {
    fn write(&self, s: &mut String) {
        let _ = write!(s, "{self}");
    }
}

impl SampleValue for f64 {
    fn write(&self, s: &mut String) {
        s.push_str(&fmt_f64(*self));
    }
}

/// The text being rendered.
#[derive(Default)]
struct Out {
    text: String,
}

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl SampleValue) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                self.text.push_str(k);
                self.text.push_str("=\"");
                escape_label_into(&mut self.text, v);
                self.text.push('"');
            }
            self.text.push('}');
        }
        self.text.push(' ');
        value.write(&mut self.text);
        self.text.push('\n');
    }
}

/// A label value escaped for the text format (`\\`, `\"`, `\n`).
fn escape_label_into(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// HELP text escaped for the text format (`\\`, `\n`).
fn escape_help(h: &str) -> String {
    h.replace('\\', "\\\\").replace('\n', "\\n")
}

/// A float as the text format writes it (`+Inf`, `-Inf`, `NaN`).
fn fmt_f64(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        format!("{v}")
    }
}

fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};
    use std::sync::Arc;

    use super::*;
    use crate::policy::{LatencySummary, PolicyKind, VersionInfo, VersionStats};

    /// One parsed sample line.
    #[derive(Debug, Clone)]
    struct Sample {
        name: String,
        labels: BTreeMap<String, String>,
        value: f64,
    }

    /// A strict parser of the text format: every non-comment line must be
    /// `name{labels} value`; families are declared once, before their
    /// samples.
    fn parse(text: &str) -> (Vec<Sample>, HashMap<String, String>) {
        let mut samples = Vec::new();
        let mut types: HashMap<String, String> = HashMap::new();
        let mut helps: HashMap<String, usize> = HashMap::new();
        let is_name = |s: &str| {
            !s.is_empty()
                && s.chars().enumerate().all(|(i, c)| {
                    c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
                })
        };
        assert!(text.ends_with('\n'), "the output ends with a newline");
        for line in text.lines() {
            assert!(!line.is_empty(), "no blank lines");
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap();
                assert!(is_name(name), "{line}");
                *helps.entry(name.to_string()).or_default() += 1;
                assert_eq!(helps[name], 1, "HELP twice for {name}");
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split(' ');
                let name = parts.next().unwrap();
                let kind = parts.next().unwrap();
                assert!(parts.next().is_none(), "{line}");
                assert!(is_name(name), "{line}");
                assert!(
                    ["counter", "gauge", "histogram", "summary"].contains(&kind),
                    "{line}"
                );
                assert!(
                    types.insert(name.to_string(), kind.to_string()).is_none(),
                    "TYPE twice for {name}"
                );
                assert_eq!(helps.get(name), Some(&1), "HELP before TYPE: {line}");
                continue;
            }
            assert!(!line.starts_with('#'), "unexpected comment {line}");
            // name
            let name_end = line.find(['{', ' ']).expect(line);
            let name = &line[..name_end];
            assert!(is_name(name), "bad name in {line}");
            let mut rest = &line[name_end..];
            let mut labels = BTreeMap::new();
            if let Some(r) = rest.strip_prefix('{') {
                let mut chars = r.char_indices().peekable();
                let end;
                loop {
                    let (i, c) = chars.next().expect("unterminated labels");
                    if c == '}' {
                        end = i;
                        break;
                    }
                    // label name up to '='
                    let mut lname = String::from(c);
                    loop {
                        let (_, c) = chars.next().expect("label name");
                        if c == '=' {
                            break;
                        }
                        lname.push(c);
                    }
                    assert!(is_name(&lname) && !lname.contains(':'), "label {lname}");
                    assert_eq!(chars.next().map(|x| x.1), Some('"'), "{line}");
                    let mut value = String::new();
                    loop {
                        let (_, c) = chars.next().expect("label value");
                        match c {
                            '"' => break,
                            '\\' => match chars.next().expect("escape").1 {
                                '\\' => value.push('\\'),
                                '"' => value.push('"'),
                                'n' => value.push('\n'),
                                o => panic!("bad escape \\{o} in {line}"),
                            },
                            '\n' => panic!("raw newline"),
                            c => value.push(c),
                        }
                    }
                    assert!(labels.insert(lname, value).is_none(), "dup label in {line}");
                    match chars.peek().map(|x| x.1) {
                        Some(',') => {
                            chars.next();
                        }
                        Some('}') => {}
                        o => panic!("unexpected {o:?} in {line}"),
                    }
                }
                rest = &r[end + 1..];
            }
            let value = rest.strip_prefix(' ').expect(line);
            assert!(!value.contains(' '), "timestamps are not written: {line}");
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                "NaN" => f64::NAN,
                v => v.parse().unwrap_or_else(|_| panic!("bad value in {line}")),
            };
            // The sample belongs to a declared family.
            let family = [
                name.to_string(),
                name.trim_end_matches("_bucket").to_string(),
                name.trim_end_matches("_sum").to_string(),
                name.trim_end_matches("_count").to_string(),
            ];
            assert!(
                family.iter().any(|f| types.contains_key(f)),
                "sample {name} without TYPE"
            );
            samples.push(Sample {
                name: name.to_string(),
                labels,
                value,
            });
        }
        (samples, types)
    }

    fn find<'a>(samples: &'a [Sample], name: &str, labels: &[(&str, &str)]) -> Option<&'a Sample> {
        samples.iter().find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
        find(samples, name, labels)
            .unwrap_or_else(|| panic!("no sample {name} {labels:?}"))
            .value
    }

    fn stats(calls: u64) -> VersionStats {
        VersionStats {
            calls,
            timeouts: 1,
            memory_limits: 2,
            traps: 3,
            invalid_answers: 4,
            unavailable: 5,
            answered_as_fallback: 6,
            demotions: 7,
            retries: 8,
            sampled_calls: 4,
            sampled_call_ns_total: 2_000_000,
            max_sampled_call_ns: 900_000,
        }
    }

    fn slots() -> Vec<SlotStatus> {
        let sha: Arc<str> = "1a2b3c4d5e6f77889900aabbccddeeff".into();
        vec![
            SlotStatus {
                kind: PolicyKind::Dispatch,
                active: Some(VersionInfo {
                    name: "llumnix".into(),
                    version: "0.1.0".into(),
                    sha256: sha,
                    params: Vec::new(),
                }),
                previous: vec![],
                builtin: "llumnix".into(),
                stats: BTreeMap::from([
                    ("llumnix@1a2b3c4d5e6f".to_string(), stats(100)),
                    ("builtin:llumnix".to_string(), stats(7)),
                    // A hostile name: escaped, not breaking the format.
                    ("we\"ird\\na\nme@00".to_string(), stats(1)),
                ]),
                demotions: 7,
                retries: 8,
                probation: None,
                pending_retry: None,
                decision_latency: LatencySummary {
                    count: 200,
                    timed: 40,
                    sum_ns: 4_000_000,
                    max_ns: 30_000_000,
                    p50_ns: 1_000,
                    p90_ns: 2_000,
                    p99_ns: 25_000_000,
                    p999_ns: 30_000_000,
                    buckets: vec![],
                },
            },
            SlotStatus {
                kind: PolicyKind::Scaling,
                active: None,
                previous: vec![],
                builtin: "threshold".into(),
                stats: BTreeMap::from([("builtin:threshold".to_string(), stats(3))]),
                demotions: 0,
                retries: 0,
                probation: None,
                pending_retry: None,
                decision_latency: LatencySummary::default(),
            },
        ]
    }

    fn loaded() -> Metrics {
        let m = Metrics::new();
        m.request_accepted();
        m.request_accepted();
        m.request_rejected(ErrorCode::PromptTooLong);
        m.request_finished("length");
        m.request_finished("stop");
        m.request_finished("stop");
        for s in [
            0.0005,
            0.001,
            0.003,
            0.2,
            59.0,
            61.0,
            1e9,
            f64::INFINITY,
            -1.0,
        ] {
            m.observe_ttft(s);
        }
        m.observe_ttft(f64::NAN);
        m.observe_inter_token(0.02);
        m.observe_e2e(1.5);
        m.observe_queue(0.004);
        m.observe_tokens(10, 5);
        m.observe_tokens(3, 2);
        m.set_instance_load(&InstanceLoad {
            instance: 0,
            total_blocks: 100,
            used_blocks: 25,
            running: 3,
            waiting: 2,
            step_latency_us: 12_500,
            ..Default::default()
        });
        m.set_instance_load(&InstanceLoad {
            instance: 7,
            total_blocks: 0,
            used_blocks: 0,
            running: 0,
            waiting: 4,
            draining: true,
            ..Default::default()
        });
        m.set_instance_load(&InstanceLoad {
            instance: 9,
            waiting: 100,
            ..Default::default()
        });
        m.remove_instance(9);
        m.migrations("planned", 3);
        m.migrations("completed", 2);
        m.redispatched(4);
        m.scaling("scale_up");
        m.scaling("drain");
        m.scaling("drain");
        m
    }

    #[test]
    fn metrics_render_parses_and_declares_each_family_once() {
        let text = loaded().render(&slots());
        let (samples, types) = parse(&text);
        assert!(samples.len() > 50, "{text}");
        for (name, kind) in [
            ("llumen_request_ttft_seconds", "histogram"),
            ("llumen_request_inter_token_latency_seconds", "histogram"),
            ("llumen_request_e2e_seconds", "histogram"),
            ("llumen_request_queue_seconds", "histogram"),
            ("llumen_requests_accepted_total", "counter"),
            ("llumen_requests_rejected_total", "counter"),
            ("llumen_requests_finished_total", "counter"),
            ("llumen_prompt_tokens_total", "counter"),
            ("llumen_generation_tokens_total", "counter"),
            ("llumen_migrations_total", "counter"),
            ("llumen_requests_redispatched_total", "counter"),
            ("llumen_scaling_events_total", "counter"),
            ("llumen_instance_requests_running", "gauge"),
            ("llumen_instance_requests_waiting", "gauge"),
            ("llumen_instance_kv_usage_ratio", "gauge"),
            ("llumen_instance_kv_blocks_used", "gauge"),
            ("llumen_instance_kv_blocks_total", "gauge"),
            ("llumen_instance_draining", "gauge"),
            ("llumen_instance_step_latency_seconds", "gauge"),
            ("llumen_instances", "gauge"),
            ("llumen_queue_depth", "gauge"),
            ("vllm:num_requests_running", "gauge"),
            ("vllm:num_requests_waiting", "gauge"),
            ("vllm:gpu_cache_usage_perc", "gauge"),
            ("llumen_policy_calls_total", "counter"),
            ("llumen_policy_failures_total", "counter"),
            ("llumen_policy_fallback_answers_total", "counter"),
            ("llumen_policy_call_duration_seconds", "summary"),
            ("llumen_policy_call_duration_seconds_max", "gauge"),
            ("llumen_policy_active", "gauge"),
            ("llumen_policy_demotions_total", "counter"),
            ("llumen_policy_retries_total", "counter"),
            ("llumen_policy_decision_duration_seconds", "summary"),
        ] {
            assert_eq!(types.get(name).map(String::as_str), Some(kind), "{name}");
        }
        // An empty registry renders and parses too.
        let (samples, _) = parse(&Metrics::new().render(&[]));
        assert_eq!(value(&samples, "llumen_instances", &[]), 0.0);
        assert_eq!(
            value(
                &samples,
                "llumen_requests_finished_total",
                &[("outcome", "cancelled")]
            ),
            0.0
        );
    }

    #[test]
    fn metrics_histograms_are_cumulative_with_inf_equal_to_count() {
        let m = loaded();
        let (samples, _) = parse(&m.render(&[]));
        for name in [
            "llumen_request_ttft_seconds",
            "llumen_request_inter_token_latency_seconds",
            "llumen_request_e2e_seconds",
            "llumen_request_queue_seconds",
        ] {
            let buckets: Vec<&Sample> = samples
                .iter()
                .filter(|s| s.name == format!("{name}_bucket"))
                .collect();
            assert_eq!(buckets.len(), LATENCY_BUCKETS.len() + 1, "{name}");
            let mut prev_le = f64::NEG_INFINITY;
            let mut prev = 0.0;
            for b in &buckets {
                let le: f64 = match b.labels["le"].as_str() {
                    "+Inf" => f64::INFINITY,
                    v => v.parse().unwrap(),
                };
                assert!(le > prev_le, "{name}: bounds increase");
                assert!(b.value >= prev, "{name}: cumulative");
                prev_le = le;
                prev = b.value;
            }
            assert_eq!(buckets[0].labels["le"], "0.001");
            assert_eq!(buckets[buckets.len() - 2].labels["le"], "60");
            assert_eq!(buckets.last().unwrap().labels["le"], "+Inf");
            assert_eq!(
                prev,
                value(&samples, &format!("{name}_count"), &[]),
                "{name}"
            );
        }
        // ttft: 0.0005, 0.001, 0.003, 0.2, 59, 61, 1e9, inf, -1 (-> 0); NaN ignored.
        let b = |le: &str| {
            value(
                &samples,
                "llumen_request_ttft_seconds_bucket",
                &[("le", le)],
            )
        };
        assert_eq!(b("0.001"), 3.0);
        assert_eq!(b("0.005"), 4.0);
        assert_eq!(b("0.25"), 5.0);
        assert_eq!(b("60"), 6.0);
        assert_eq!(b("+Inf"), 9.0);
        let sum = value(&samples, "llumen_request_ttft_seconds_sum", &[]);
        assert!((sum - (0.0005 + 0.001 + 0.003 + 0.2 + 59.0 + 61.0 + 1e9)).abs() < 1e-3);
        assert_eq!(
            value(&samples, "llumen_request_e2e_seconds_count", &[]),
            1.0
        );
        assert_eq!(value(&samples, "llumen_request_e2e_seconds_sum", &[]), 1.5);
    }

    #[test]
    fn metrics_counters_and_gauges_have_their_values() {
        let (s, _) = parse(&loaded().render(&[]));
        assert_eq!(value(&s, "llumen_requests_accepted_total", &[]), 2.0);
        assert_eq!(
            value(
                &s,
                "llumen_requests_rejected_total",
                &[("code", "prompt_too_long")]
            ),
            1.0
        );
        assert_eq!(
            value(
                &s,
                "llumen_requests_rejected_total",
                &[("code", "unavailable")]
            ),
            0.0
        );
        assert_eq!(
            s.iter()
                .filter(|x| x.name == "llumen_requests_rejected_total")
                .count(),
            ErrorCode::ALL.len()
        );
        assert_eq!(
            value(&s, "llumen_requests_finished_total", &[("outcome", "stop")]),
            2.0
        );
        assert_eq!(value(&s, "llumen_prompt_tokens_total", &[]), 13.0);
        assert_eq!(value(&s, "llumen_generation_tokens_total", &[]), 7.0);
        assert_eq!(
            value(&s, "llumen_migrations_total", &[("outcome", "planned")]),
            3.0
        );
        assert_eq!(
            value(&s, "llumen_migrations_total", &[("outcome", "aborted")]),
            0.0
        );
        assert_eq!(value(&s, "llumen_requests_redispatched_total", &[]), 4.0);
        assert_eq!(
            value(&s, "llumen_scaling_events_total", &[("action", "drain")]),
            2.0
        );
        assert_eq!(
            value(&s, "llumen_scaling_events_total", &[("action", "stopped")]),
            0.0
        );

        let i0 = [("instance", "0")];
        let i7 = [("instance", "7")];
        assert_eq!(value(&s, "llumen_instance_requests_running", &i0), 3.0);
        assert_eq!(value(&s, "llumen_instance_requests_waiting", &i7), 4.0);
        assert_eq!(value(&s, "llumen_instance_kv_usage_ratio", &i0), 0.25);
        assert_eq!(value(&s, "llumen_instance_kv_usage_ratio", &i7), 0.0);
        assert_eq!(value(&s, "llumen_instance_kv_blocks_used", &i0), 25.0);
        assert_eq!(value(&s, "llumen_instance_kv_blocks_total", &i0), 100.0);
        assert_eq!(value(&s, "llumen_instance_draining", &i0), 0.0);
        assert_eq!(value(&s, "llumen_instance_draining", &i7), 1.0);
        assert_eq!(
            value(&s, "llumen_instance_step_latency_seconds", &i0),
            0.0125
        );
        assert!(find(&s, "llumen_instance_requests_waiting", &[("instance", "9")]).is_none());
        assert_eq!(value(&s, "llumen_instances", &[]), 2.0);
        assert_eq!(value(&s, "llumen_queue_depth", &[]), 6.0);
        assert_eq!(value(&s, "vllm:num_requests_running", &i0), 3.0);
        assert_eq!(value(&s, "vllm:num_requests_waiting", &i0), 2.0);
        assert_eq!(value(&s, "vllm:gpu_cache_usage_perc", &i0), 0.25);
    }

    #[test]
    fn metrics_policy_families_come_from_slot_status() {
        let (s, _) = parse(&loaded().render(&slots()));
        let active = [("kind", "dispatch"), ("version", "llumnix@1a2b3c4d5e6f")];
        let builtin = [("kind", "dispatch"), ("version", "builtin:llumnix")];
        let weird = [("kind", "dispatch"), ("version", "we\"ird\\na\nme@00")];
        let scaling = [("kind", "scaling"), ("version", "builtin:threshold")];
        assert_eq!(value(&s, "llumen_policy_calls_total", &active), 100.0);
        assert_eq!(value(&s, "llumen_policy_calls_total", &builtin), 7.0);
        assert_eq!(value(&s, "llumen_policy_calls_total", &weird), 1.0);
        assert_eq!(value(&s, "llumen_policy_calls_total", &scaling), 3.0);
        for (reason, n) in [
            ("timeout", 1.0),
            ("memory_limit", 2.0),
            ("trap", 3.0),
            ("invalid_answer", 4.0),
            ("unavailable", 5.0),
        ] {
            let mut l = active.to_vec();
            l.push(("reason", reason));
            assert_eq!(value(&s, "llumen_policy_failures_total", &l), n);
        }
        assert_eq!(
            value(&s, "llumen_policy_fallback_answers_total", &builtin),
            6.0
        );
        assert_eq!(
            value(&s, "llumen_policy_call_duration_seconds_sum", &active),
            0.002
        );
        assert_eq!(
            value(&s, "llumen_policy_call_duration_seconds_count", &active),
            4.0
        );
        assert_eq!(
            value(&s, "llumen_policy_call_duration_seconds_max", &active),
            0.0009
        );
        assert_eq!(value(&s, "llumen_policy_active", &active), 1.0);
        assert_eq!(value(&s, "llumen_policy_active", &builtin), 0.0);
        assert_eq!(value(&s, "llumen_policy_active", &weird), 0.0);
        // No Wasm version: the builtin is the active one.
        assert_eq!(value(&s, "llumen_policy_active", &scaling), 1.0);
        assert_eq!(value(&s, "llumen_policy_demotions_total", &active), 7.0);
        assert_eq!(value(&s, "llumen_policy_retries_total", &builtin), 8.0);
        let d = [("kind", "dispatch")];
        let q = |q| [("kind", "dispatch"), ("quantile", q)];
        assert_eq!(
            value(&s, "llumen_policy_decision_duration_seconds", &q("0.5")),
            1e-6
        );
        assert_eq!(
            value(&s, "llumen_policy_decision_duration_seconds", &q("0.99")),
            0.025
        );
        assert_eq!(
            value(&s, "llumen_policy_decision_duration_seconds", &q("0.999")),
            0.03
        );
        assert_eq!(
            value(&s, "llumen_policy_decision_duration_seconds_sum", &d),
            0.004
        );
        assert_eq!(
            value(&s, "llumen_policy_decision_duration_seconds_count", &d),
            200.0
        );
        assert_eq!(
            value(
                &s,
                "llumen_policy_decision_duration_seconds_count",
                &[("kind", "scaling")]
            ),
            0.0
        );
    }

    #[test]
    fn metrics_unknown_labels_are_counted_and_escaped() {
        let m = Metrics::new();
        m.request_finished("we\"ird\\\n");
        m.scaling("scale_up");
        let text = m.render(&[]);
        assert!(
            text.contains(r#"llumen_requests_finished_total{outcome="we\"ird\\\n"} 1"#),
            "{text}"
        );
        let (s, _) = parse(&text);
        assert_eq!(
            value(
                &s,
                "llumen_requests_finished_total",
                &[("outcome", "we\"ird\\\n")]
            ),
            1.0
        );
    }

    #[test]
    fn metrics_are_shared_across_threads() {
        let m = Arc::new(Metrics::new());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for i in 0..1000 {
                        m.observe_inter_token(f64::from(i) * 1e-4);
                        m.request_accepted();
                        m.migrations("completed", 1);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let (s, _) = parse(&m.render(&[]));
        assert_eq!(value(&s, "llumen_requests_accepted_total", &[]), 4000.0);
        assert_eq!(
            value(&s, "llumen_request_inter_token_latency_seconds_count", &[]),
            4000.0
        );
        assert_eq!(
            value(&s, "llumen_migrations_total", &[("outcome", "completed")]),
            4000.0
        );
        let expected_sum: f64 = 4.0 * (0..1000).map(|i| f64::from(i) * 1e-4).sum::<f64>();
        let sum = value(&s, "llumen_request_inter_token_latency_seconds_sum", &[]);
        assert!((sum - expected_sum).abs() < 1e-6, "{sum} vs {expected_sum}");
    }
}
