//! The serving API every front end speaks: what a generate request is, what
//! comes back, and the typed errors. The QUIC front end
//! ([`crate::transport::protocol`] frames), the OpenAI HTTP front end
//! ([`crate::front::http`]) and the Rust client ([`crate::front::client`])
//! all translate to and from these types; the manager
//! ([`crate::control::manager`]) serves them.
//!
//! Owns only plain data and the [`Serving`] trait. Must never touch sockets,
//! the engine or policies.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Highest priority a client may ask for (0 = normal, higher = more urgent).
pub const MAX_PRIORITY: u8 = 3;
/// Largest `max_tokens` the server accepts in one request.
pub const MAX_TOKENS_LIMIT: u32 = 32_768;
/// Largest number of stop strings / stop token ids in one request.
pub const MAX_STOPS: usize = 16;

/// One chat message (OpenAI `role` + `content`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatTurn {
    pub role: String,
    pub content: String,
}

/// What to generate from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PromptInput {
    /// Plain text, tokenized by the server (no chat template).
    Text(String),
    /// Token ids in the model's vocabulary.
    Tokens(Vec<u32>),
    /// Chat messages, rendered with the model's chat template.
    Chat(Vec<ChatTurn>),
}

/// A generate request as the manager receives it from any front end.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GenerateRequest {
    pub input: PromptInput,
    /// Most tokens to generate (1 ..= [`MAX_TOKENS_LIMIT`], and the prompt
    /// plus this must fit the model's context).
    pub max_tokens: u32,
    /// 0 = greedy.
    pub temperature: f32,
    /// Nucleus mass in (0, 1].
    pub top_p: f32,
    pub seed: u64,
    /// Requested priority 0 ..= [`MAX_PRIORITY`] (the priority policy maps it).
    pub priority: u8,
    /// Generation stops when the text contains one of these (the stop string
    /// is not included in the output).
    pub stop: Vec<String>,
    /// Generation stops after one of these tokens (included).
    pub stop_token_ids: Vec<u32>,
    /// Do not stop at the model's end-of-sequence token.
    pub ignore_eos: bool,
}

impl GenerateRequest {
    /// Greedy decoding of `max_tokens` tokens from a text prompt, priority 0.
    pub fn text(prompt: impl Into<String>, max_tokens: u32) -> Self {
        Self {
            input: PromptInput::Text(prompt.into()),
            max_tokens,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            priority: 0,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
        }
    }

    /// Checks what can be checked without the model (ranges, counts).
    pub fn validate(&self) -> Result<(), ServeError> {
        let invalid = |m: String| Err(ServeError::new(ErrorCode::InvalidParameter, m));
        if self.max_tokens == 0 {
            return invalid("max_tokens must be at least 1".into());
        }
        if self.max_tokens > MAX_TOKENS_LIMIT {
            return invalid(format!(
                "max_tokens {} is above the limit of {MAX_TOKENS_LIMIT}",
                self.max_tokens
            ));
        }
        if !(self.temperature.is_finite() && (0.0..=100.0).contains(&self.temperature)) {
            return invalid(format!(
                "temperature {} must be in [0, 100]",
                self.temperature
            ));
        }
        if !(self.top_p.is_finite() && self.top_p > 0.0 && self.top_p <= 1.0) {
            return invalid(format!("top_p {} must be in (0, 1]", self.top_p));
        }
        if self.priority > MAX_PRIORITY {
            return invalid(format!(
                "priority {} must be in 0..={MAX_PRIORITY}",
                self.priority
            ));
        }
        if self.stop.len() > MAX_STOPS || self.stop_token_ids.len() > MAX_STOPS {
            return invalid(format!(
                "at most {MAX_STOPS} stop strings and {MAX_STOPS} stop token ids"
            ));
        }
        if self.stop.iter().any(|s| s.is_empty()) {
            return invalid("stop strings must not be empty".into());
        }
        match &self.input {
            PromptInput::Tokens(t) if t.is_empty() => invalid("the prompt has no tokens".into()),
            PromptInput::Chat(m) if m.is_empty() => invalid("the chat has no messages".into()),
            _ => Ok(()),
        }
    }
}

/// Why generation stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// `max_tokens` reached.
    Length,
    /// A stop token, the model's end of sequence or a stop string.
    Stop,
}

impl FinishReason {
    /// The OpenAI `finish_reason` string.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Stop => "stop",
        }
    }
}

/// Tokens generated since the last chunk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenChunk {
    /// Output index of `ids[0]` (0 = first generated token).
    pub index: u32,
    pub ids: Vec<u32>,
    /// The text these tokens complete (may be empty while a UTF-8
    /// character is split across tokens).
    pub text: String,
}

/// The last thing a request's stream carries when it succeeds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinishRecord {
    pub request_id: u64,
    pub reason: FinishReason,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Arrival to first scheduled step (queueing), microseconds.
    pub queue_us: u64,
    /// Arrival to first token.
    pub ttft_us: u64,
    /// Arrival to the last token.
    pub total_us: u64,
    /// Instance that produced the last token.
    pub instance: u32,
    /// How many times the request moved (re-dispatch after an instance was
    /// lost, migrations).
    pub moves: u32,
}

/// One event on a request's stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum GenerateEvent {
    Tokens(TokenChunk),
    Finished(FinishRecord),
    /// The request failed; nothing follows.
    Error(ServeError),
}

/// The kind of a [`ServeError`]; stable numbers on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[repr(u16)]
pub enum ErrorCode {
    /// A frame or body that could not be parsed.
    Malformed = 1,
    /// A frame of a protocol version this server does not speak.
    UnsupportedVersion = 2,
    /// A parameter out of range.
    InvalidParameter = 3,
    /// The prompt (plus max_tokens) does not fit the model or the instance.
    PromptTooLong = 4,
    /// A frame or body larger than the limit.
    TooLarge = 5,
    /// Missing or wrong admin token.
    Unauthorized = 6,
    /// No instance can take the request now.
    Unavailable = 7,
    /// The request was cancelled.
    Cancelled = 8,
    /// A policy component was refused (not a component, wrong world, trial failed).
    PolicyRejected = 9,
    /// Something named does not exist (policy sha, instance, kind).
    NotFound = 10,
    /// A failure inside the server.
    Internal = 11,
    /// The peer was too slow: e.g. a stream whose first frame did not
    /// arrive in time (slow-loris).
    Timeout = 12,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 12] = [
        ErrorCode::Malformed,
        ErrorCode::UnsupportedVersion,
        ErrorCode::InvalidParameter,
        ErrorCode::PromptTooLong,
        ErrorCode::TooLarge,
        ErrorCode::Unauthorized,
        ErrorCode::Unavailable,
        ErrorCode::Cancelled,
        ErrorCode::PolicyRejected,
        ErrorCode::NotFound,
        ErrorCode::Internal,
        ErrorCode::Timeout,
    ];

    pub fn from_u16(v: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|c| *c as u16 == v)
    }

    /// snake_case name, as in JSON and the OpenAI error `code`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Malformed => "malformed",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::InvalidParameter => "invalid_parameter",
            ErrorCode::PromptTooLong => "prompt_too_long",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::PolicyRejected => "policy_rejected",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Internal => "internal",
            ErrorCode::Timeout => "timeout",
        }
    }

    /// The HTTP status an OpenAI-style front end answers with.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::Malformed
            | ErrorCode::UnsupportedVersion
            | ErrorCode::InvalidParameter
            | ErrorCode::PromptTooLong
            | ErrorCode::PolicyRejected => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::NotFound => 404,
            ErrorCode::TooLarge => 413,
            ErrorCode::Cancelled => 499,
            ErrorCode::Unavailable => 503,
            ErrorCode::Internal => 500,
            ErrorCode::Timeout => 408,
        }
    }
}

/// A typed error with a message for humans.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub struct ServeError {
    pub code: ErrorCode,
    pub message: String,
}

impl ServeError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for ServeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

/// A request in flight: its events, in order, ending with `Finished` or
/// `Error`. Dropping it cancels the request (its KV blocks are freed).
pub struct Generation {
    pub request_id: u64,
    pub events: tokio::sync::mpsc::UnboundedReceiver<GenerateEvent>,
    /// Cancels the request when dropped, unless it already finished.
    pub cancel: CancelOnDrop,
}

/// Runs a cancellation callback when dropped.
pub struct CancelOnDrop(Option<Box<dyn FnOnce() + Send + Sync>>);

impl CancelOnDrop {
    pub fn new(f: impl FnOnce() + Send + Sync + 'static) -> Self {
        Self(Some(Box::new(f)))
    }
    /// Never cancel (the request finished).
    pub fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f()
        }
    }
}

/// What the front ends need from the manager to serve requests. The HTTP
/// front end reaches the manager only through it; the QUIC endpoint and the
/// admin API also hold the `Manager` itself (see [`crate::front`]).
pub trait Serving: Send + Sync + 'static {
    /// Validates, tokenizes, prioritises and dispatches a request.
    fn submit(&self, request: GenerateRequest) -> Result<Generation, ServeError>;
    /// The served model's name (as `/v1/models` lists it).
    fn model_name(&self) -> String;
    /// Prometheus text exposition of every metric.
    fn metrics_text(&self) -> String;
}
