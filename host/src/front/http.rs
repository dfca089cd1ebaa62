//! The OpenAI-compatible HTTP front end (axum, HTTP/1.1).
//!
//! Routes:
//! - `POST /v1/completions`: `prompt` is a string, an array of token ids, or
//!   an array holding one of those (batches of several prompts are refused);
//!   `max_tokens` (default 16, as OpenAI), `temperature` (default 1.0, as
//!   OpenAI; 0 = greedy), `top_p` (default 1), `seed` (default: random),
//!   `stop` (string or array of strings), `stream`,
//!   `stream_options.include_usage`, and the extensions `priority` (integer
//!   0 ..= [`MAX_PRIORITY`](crate::front::api::MAX_PRIORITY)), `ignore_eos` and
//!   `stop_token_ids` (as vLLM).
//! - `POST /v1/chat/completions`: `messages` (`[{role, content}]`, content a
//!   string or an array of `{"type": "text", "text"}` parts), rendered with
//!   the model's chat template; `max_completion_tokens` or `max_tokens`
//!   (default [`DEFAULT_CHAT_MAX_TOKENS`]); the same sampling fields and
//!   extensions.
//! - `GET /v1/models` (the one served model) and `GET /v1/models/{model}`.
//! - `GET /metrics`: Prometheus text (`text/plain; version=0.0.4`).
//! - `GET /health`: `200 ok`.
//!
//! `n` / `best_of` above 1, `echo` and `logprobs` are refused with a 400;
//! other OpenAI fields this server has no use for (`user`, penalties, …)
//! are ignored, and so is `model` (the server serves one model, named in
//! every response).
//!
//! Responses follow OpenAI's shapes (`cmpl-<request id>` /
//! `chatcmpl-<request id>`, `usage`). Streaming answers are server-sent
//! events, `data: {chunk}` per chunk, a last chunk with the
//! `finish_reason`, an optional usage chunk (`stream_options.include_usage`)
//! and `data: [DONE]`. The first event is awaited before the response
//! starts, so a request refused at once gets a plain HTTP error; an error
//! after the stream started is sent as `data: {"error": {...}}` and ends the
//! stream. Errors are `{"error": {"message", "type", "code", "param"}}`
//! with the status of [`ErrorCode::http_status`]; unknown routes, malformed
//! bodies and bodies over [`BODY_LIMIT`] get the same shape.
//!
//! The response (or the SSE body) owns the [`Generation`]: a client that
//! disconnects drops it, which cancels the request.
//!
//! Owns only the translation between HTTP/JSON and [`crate::front::api`];
//! it must never schedule, tokenize or touch an engine.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, Method, StatusCode, Uri};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::front::api::{
    ChatTurn, ErrorCode, FinishRecord, GenerateEvent, GenerateRequest, Generation, PromptInput,
    ServeError, Serving,
};

/// Largest request body accepted (bigger ones get a 413).
pub const BODY_LIMIT: usize = 4 << 20;
/// `max_tokens` of a completion that names none (OpenAI's default).
pub const DEFAULT_COMPLETION_MAX_TOKENS: u32 = 16;
/// `max_tokens` of a chat completion that names none (OpenAI lets the
/// answer run to the end of the context; this server has to pick a number).
pub const DEFAULT_CHAT_MAX_TOKENS: u32 = 512;
/// Content type of `GET /metrics`.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves the HTTP API on `listener` until `shutdown` resolves, then stops
/// accepting and waits for the requests in flight (a stream in flight ends
/// when its request does).
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    serving: Arc<dyn Serving>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = listener.tap_io(|tcp| {
        // Tokens are small writes that must leave at once.
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router(serving))
        .with_graceful_shutdown(shutdown)
        .await
}

/// The routes, for [`serve_http`] or for embedding in another router.
pub fn router(serving: Arc<dyn Serving>) -> Router {
    let state = AppState {
        serving,
        started: unix_now(),
    };
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{*model}", get(get_model))
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

#[derive(Clone)]
struct AppState {
    serving: Arc<dyn Serving>,
    /// Unix seconds at start (the model's `created`).
    started: u64,
}

// ---------------------------------------------------------------- errors

/// An error answered in OpenAI's shape.
#[derive(Debug)]
struct HttpError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl HttpError {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ServeError::new(code, message).into()
    }

    fn body(&self) -> Value {
        let kind = if self.status.is_server_error() {
            "server_error"
        } else {
            "invalid_request_error"
        };
        json!({
            "error": {
                "message": self.message,
                "type": kind,
                "code": self.code,
                "param": null,
            }
        })
    }
}

impl From<ServeError> for HttpError {
    fn from(e: ServeError) -> Self {
        Self {
            status: StatusCode::from_u16(e.code.http_status())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            code: e.code.as_str(),
            message: e.message,
        }
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(code = self.code, message = %self.message, "http request failed");
        } else {
            tracing::debug!(code = self.code, message = %self.message, "http request refused");
        }
        (self.status, Json(self.body())).into_response()
    }
}

fn invalid(message: impl Into<String>) -> HttpError {
    HttpError::new(ErrorCode::InvalidParameter, message)
}

fn ended_without_result() -> ServeError {
    ServeError::new(ErrorCode::Internal, "the request ended without a result")
}

async fn not_found(method: Method, uri: Uri) -> HttpError {
    HttpError::new(
        ErrorCode::NotFound,
        format!("no route for {method} {}", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> HttpError {
    HttpError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        code: "method_not_allowed",
        message: format!("{} does not accept {method}", uri.path()),
    }
}

/// The body as JSON of type `T`, or an error in OpenAI's shape.
fn parse_body<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, HttpError> {
    let bytes = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            HttpError::new(
                ErrorCode::TooLarge,
                format!("the body is larger than the limit of {BODY_LIMIT} bytes"),
            )
        } else {
            HttpError::new(ErrorCode::Malformed, r.body_text())
        }
    })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(HttpError::new(
            ErrorCode::Malformed,
            "the body is empty; expected a JSON object",
        ));
    }
    serde_json::from_slice(&bytes).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => invalid(format!("invalid request: {e}")),
        _ => HttpError::new(ErrorCode::Malformed, format!("invalid JSON: {e}")),
    })
}

// ---------------------------------------------------------------- requests

/// The fields of both generate endpoints (each reads its own).
#[derive(Debug, Default, Deserialize)]
struct Body {
    prompt: Option<Value>,
    messages: Option<Value>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<serde_json::Number>,
    stop: Option<Value>,
    stop_token_ids: Option<Vec<u32>>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    priority: Option<i64>,
    ignore_eos: Option<bool>,
    n: Option<u32>,
    best_of: Option<u32>,
    echo: Option<bool>,
    logprobs: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

impl Body {
    fn streaming(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    fn include_usage(&self) -> bool {
        self.streaming()
            && self
                .stream_options
                .as_ref()
                .and_then(|o| o.include_usage)
                .unwrap_or(false)
    }

    /// The request, with `input` and the default `max_tokens` of the
    /// endpoint.
    fn request(&self, input: PromptInput, max_tokens: u32) -> Result<GenerateRequest, HttpError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(invalid("n must be 1 (one choice per request)"));
        }
        if self.best_of.is_some_and(|n| n != 1) {
            return Err(invalid("best_of must be 1"));
        }
        if self.echo == Some(true) {
            return Err(invalid("echo is not supported"));
        }
        if !matches!(
            self.logprobs,
            None | Some(Value::Null) | Some(Value::Bool(false))
        ) {
            return Err(invalid("logprobs are not supported"));
        }
        let seed = match &self.seed {
            None => random_seed(),
            Some(n) => match (n.as_u64(), n.as_i64()) {
                (Some(v), _) => v,
                // A negative seed keeps its bits.
                (None, Some(v)) => v as u64,
                _ => return Err(invalid("seed must be an integer")),
            },
        };
        let priority = match self.priority {
            None => 0,
            Some(p) => u8::try_from(p).map_err(|_| {
                invalid(format!(
                    "priority {p} must be in 0..={}",
                    crate::front::api::MAX_PRIORITY
                ))
            })?,
        };
        Ok(GenerateRequest {
            input,
            max_tokens,
            temperature: self.temperature.unwrap_or(1.0),
            top_p: self.top_p.unwrap_or(1.0),
            seed,
            priority,
            stop: parse_stop(self.stop.as_ref())?,
            stop_token_ids: self.stop_token_ids.clone().unwrap_or_default(),
            ignore_eos: self.ignore_eos.unwrap_or(false),
        })
    }
}

/// A seed for a request that names none (OpenAI samples differently each
/// time then).
fn random_seed() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

fn parse_stop(stop: Option<&Value>) -> Result<Vec<String>, HttpError> {
    match stop {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                _ => Err(invalid("stop must be a string or an array of strings")),
            })
            .collect(),
        Some(_) => Err(invalid("stop must be a string or an array of strings")),
    }
}

/// `prompt`: a string, token ids, or an array of one of those.
fn parse_prompt(prompt: Option<&Value>) -> Result<PromptInput, HttpError> {
    const BATCH: &str =
        "batch prompts are not supported: send one prompt per request (a string or an array of token ids)";
    const SHAPE: &str = "prompt must be a string or an array of token ids";
    fn token_ids(items: &[Value]) -> Result<Vec<u32>, HttpError> {
        items
            .iter()
            .map(|v| {
                v.as_u64()
                    .and_then(|t| u32::try_from(t).ok())
                    .ok_or_else(|| invalid("token ids must be integers in 0..2^32"))
            })
            .collect()
    }
    match prompt {
        None | Some(Value::Null) => Err(invalid(
            "prompt is required (chat messages go to /v1/chat/completions)",
        )),
        Some(Value::String(s)) => Ok(PromptInput::Text(s.clone())),
        Some(Value::Array(items)) => match items.first() {
            None => Ok(PromptInput::Tokens(Vec::new())),
            Some(Value::Number(_)) => Ok(PromptInput::Tokens(token_ids(items)?)),
            Some(Value::String(s)) if items.len() == 1 => Ok(PromptInput::Text(s.clone())),
            Some(Value::Array(ids)) if items.len() == 1 => Ok(PromptInput::Tokens(token_ids(ids)?)),
            Some(Value::String(_) | Value::Array(_)) => Err(invalid(BATCH)),
            Some(_) => Err(invalid(SHAPE)),
        },
        Some(_) => Err(invalid(SHAPE)),
    }
}

/// `messages`: `[{role, content}]`, content a string, null, or text parts.
fn parse_messages(messages: Option<&Value>) -> Result<Vec<ChatTurn>, HttpError> {
    let Some(Value::Array(items)) = messages else {
        return Err(invalid(
            "messages is required: an array of {role, content} objects",
        ));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid(format!("messages[{i}].role must be a string")))?;
            let content = match m.get("content") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for part in parts {
                        match (
                            part.get("type").and_then(Value::as_str),
                            part.get("text").and_then(Value::as_str),
                        ) {
                            (Some("text"), Some(t)) => text.push_str(t),
                            _ => {
                                return Err(invalid(format!(
                                    "messages[{i}].content: only text parts are supported"
                                )))
                            }
                        }
                    }
                    text
                }
                Some(_) => {
                    return Err(invalid(format!(
                        "messages[{i}].content must be a string or an array of text parts"
                    )))
                }
            };
            Ok(ChatTurn {
                role: role.to_string(),
                content,
            })
        })
        .collect()
}

// ---------------------------------------------------------------- handlers

/// Which endpoint a response is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Api {
    Completion,
    Chat,
}

async fn completions(State(app): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    let result = async {
        let body: Body = parse_body(body)?;
        let input = parse_prompt(body.prompt.as_ref())?;
        let max_tokens = body.max_tokens.unwrap_or(DEFAULT_COMPLETION_MAX_TOKENS);
        let request = body.request(input, max_tokens)?;
        generate(&app, Api::Completion, &body, request).await
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn chat_completions(
    State(app): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let body: Body = parse_body(body)?;
        let input = PromptInput::Chat(parse_messages(body.messages.as_ref())?);
        let max_tokens = body
            .max_completion_tokens
            .or(body.max_tokens)
            .unwrap_or(DEFAULT_CHAT_MAX_TOKENS);
        let request = body.request(input, max_tokens)?;
        generate(&app, Api::Chat, &body, request).await
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn generate(
    app: &AppState,
    api: Api,
    body: &Body,
    request: GenerateRequest,
) -> Result<Response, HttpError> {
    let mut generation = app.serving.submit(request)?;
    let meta = Meta {
        api,
        id: match api {
            Api::Completion => format!("cmpl-{}", generation.request_id),
            Api::Chat => format!("chatcmpl-{}", generation.request_id),
        },
        created: unix_now(),
        model: app.serving.model_name(),
    };
    if body.streaming() {
        // Wait for the first event so that a request refused at once gets
        // a plain HTTP error rather than a stream.
        let first = match generation.events.recv().await {
            Some(GenerateEvent::Error(e)) => {
                generation.cancel.disarm();
                return Err(e.into());
            }
            Some(event) => event,
            None => return Err(ended_without_result().into()),
        };
        let stream = ChunkStream::new(meta, generation, first, body.include_usage());
        Ok(Sse::new(stream.into_stream())
            .keep_alive(KeepAlive::default())
            .into_response())
    } else {
        let (text, finish) = collect(&mut generation).await?;
        Ok(Json(meta.full_response(&text, &finish)).into_response())
    }
}

/// Every token up to the end of the request.
async fn collect(generation: &mut Generation) -> Result<(String, FinishRecord), ServeError> {
    let mut text = String::new();
    while let Some(event) = generation.events.recv().await {
        match event {
            GenerateEvent::Tokens(chunk) => text.push_str(&chunk.text),
            GenerateEvent::Finished(finish) => {
                generation.cancel.disarm();
                return Ok((text, finish));
            }
            GenerateEvent::Error(e) => {
                generation.cancel.disarm();
                return Err(e);
            }
        }
    }
    Err(ended_without_result())
}

/// What every response of one request repeats.
struct Meta {
    api: Api,
    id: String,
    created: u64,
    model: String,
}

fn usage(finish: &FinishRecord) -> Value {
    json!({
        "prompt_tokens": finish.prompt_tokens,
        "completion_tokens": finish.completion_tokens,
        "total_tokens": u64::from(finish.prompt_tokens) + u64::from(finish.completion_tokens),
    })
}

impl Meta {
    fn object(&self, streaming: bool) -> &'static str {
        match (self.api, streaming) {
            (Api::Completion, _) => "text_completion",
            (Api::Chat, false) => "chat.completion",
            (Api::Chat, true) => "chat.completion.chunk",
        }
    }

    fn full_response(&self, text: &str, finish: &FinishRecord) -> Value {
        let choice = match self.api {
            Api::Completion => json!({
                "index": 0,
                "text": text,
                "logprobs": null,
                "finish_reason": finish.reason.as_str(),
            }),
            Api::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": finish.reason.as_str(),
            }),
        };
        json!({
            "id": self.id,
            "object": self.object(false),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage(finish),
        })
    }

    /// A streaming chunk with one choice.
    fn chunk(&self, choice: Value, include_usage: bool) -> Value {
        let mut chunk = json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        });
        if include_usage {
            chunk["usage"] = Value::Null;
        }
        chunk
    }

    /// The choice of a chunk carrying `text` (and the role, first, in chat).
    fn text_choice(&self, text: &str, role: bool, finish_reason: Option<&str>) -> Value {
        match self.api {
            Api::Completion => json!({
                "index": 0,
                "text": text,
                "logprobs": null,
                "finish_reason": finish_reason,
            }),
            Api::Chat => {
                let delta = match (role, finish_reason) {
                    (true, _) => json!({"role": "assistant", "content": text}),
                    (false, Some(_)) if text.is_empty() => json!({}),
                    _ => json!({"content": text}),
                };
                json!({
                    "index": 0,
                    "delta": delta,
                    "logprobs": null,
                    "finish_reason": finish_reason,
                })
            }
        }
    }
}

/// The SSE events of one streaming request. Owns the [`Generation`]: when
/// the client goes away the body, this stream and the generation are
/// dropped, which cancels the request.
struct ChunkStream {
    meta: Meta,
    generation: Generation,
    first: Option<GenerateEvent>,
    include_usage: bool,
    pending: VecDeque<Event>,
    done: bool,
}

impl ChunkStream {
    fn new(meta: Meta, generation: Generation, first: GenerateEvent, include_usage: bool) -> Self {
        let mut stream = Self {
            meta,
            generation,
            first: Some(first),
            include_usage,
            pending: VecDeque::new(),
            done: false,
        };
        if stream.meta.api == Api::Chat {
            let choice = stream.meta.text_choice("", true, None);
            stream.push_chunk(choice);
        }
        stream
    }

    fn into_stream(self) -> impl futures_util::Stream<Item = Result<Event, Infallible>> + Send {
        futures_util::stream::unfold(self, |mut s| async move {
            loop {
                if let Some(event) = s.pending.pop_front() {
                    return Some((Ok(event), s));
                }
                if s.done {
                    return None;
                }
                let next = match s.first.take() {
                    Some(event) => Some(event),
                    None => s.generation.events.recv().await,
                };
                s.on_event(next);
            }
        })
    }

    fn push_json(&mut self, value: &Value) {
        self.pending
            .push_back(Event::default().data(value.to_string()));
    }

    fn push_chunk(&mut self, choice: Value) {
        let chunk = self.meta.chunk(choice, self.include_usage);
        self.push_json(&chunk);
    }

    fn on_event(&mut self, event: Option<GenerateEvent>) {
        match event {
            Some(GenerateEvent::Tokens(chunk)) => {
                // A chunk ending inside a UTF-8 character has no text yet.
                if !chunk.text.is_empty() {
                    let choice = self.meta.text_choice(&chunk.text, false, None);
                    self.push_chunk(choice);
                }
            }
            Some(GenerateEvent::Finished(finish)) => {
                self.generation.cancel.disarm();
                let choice = self
                    .meta
                    .text_choice("", false, Some(finish.reason.as_str()));
                self.push_chunk(choice);
                if self.include_usage {
                    let chunk = json!({
                        "id": self.meta.id,
                        "object": self.meta.object(true),
                        "created": self.meta.created,
                        "model": self.meta.model,
                        "choices": [],
                        "usage": usage(&finish),
                    });
                    self.push_json(&chunk);
                }
                self.pending.push_back(Event::default().data("[DONE]"));
                self.done = true;
            }
            Some(GenerateEvent::Error(e)) => {
                self.generation.cancel.disarm();
                self.push_error(e);
            }
            None => self.push_error(ended_without_result()),
        }
    }

    fn push_error(&mut self, e: ServeError) {
        let error = HttpError::from(e);
        tracing::debug!(code = error.code, message = %error.message, "stream ended by an error");
        self.push_json(&error.body());
        self.done = true;
    }
}

async fn list_models(State(app): State<AppState>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [model_object(&app)],
    }))
}

async fn get_model(
    State(app): State<AppState>,
    Path(model): Path<String>,
) -> Result<Json<Value>, HttpError> {
    if model == app.serving.model_name() {
        Ok(Json(model_object(&app)))
    } else {
        Err(HttpError::new(
            ErrorCode::NotFound,
            format!("the model `{model}` does not exist"),
        ))
    }
}

fn model_object(app: &AppState) -> Value {
    json!({
        "id": app.serving.model_name(),
        "object": "model",
        "created": app.started,
        "owned_by": "llumen",
    })
}

async fn metrics(State(app): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)],
        app.serving.metrics_text(),
    )
        .into_response()
}

async fn health() -> &'static str {
    "ok"
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use std::sync::Mutex;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::mpsc::{self, UnboundedSender};

    use super::*;
    use crate::front::api::{CancelOnDrop, FinishReason, TokenChunk};

    const MODEL: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";
    const WORDS: [&str; 4] = ["Hello", " world", "", "!"];

    /// Answers from a script chosen by the prompt's text; records what it
    /// was asked.
    #[derive(Default)]
    struct Fake {
        requests: Mutex<Vec<GenerateRequest>>,
        next_id: AtomicU64,
        cancelled: Arc<AtomicUsize>,
        /// Senders of requests left open (`hang`).
        open: Mutex<Vec<UnboundedSender<GenerateEvent>>>,
    }

    fn prompt_text(input: &PromptInput) -> String {
        match input {
            PromptInput::Text(t) => t.clone(),
            PromptInput::Tokens(_) => String::new(),
            PromptInput::Chat(turns) => turns.last().map(|t| t.content.clone()).unwrap_or_default(),
        }
    }

    impl Serving for Fake {
        fn submit(&self, request: GenerateRequest) -> Result<Generation, ServeError> {
            request.validate()?;
            self.requests.lock().unwrap().push(request.clone());
            let id = 40 + self.next_id.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = mpsc::unbounded_channel();
            let tokens = |n: usize| {
                (0..n).map(|i| {
                    GenerateEvent::Tokens(TokenChunk {
                        index: i as u32,
                        ids: vec![100 + i as u32],
                        text: WORDS[i % WORDS.len()].to_string(),
                    })
                })
            };
            let finish = |n: u32, reason| {
                GenerateEvent::Finished(FinishRecord {
                    request_id: id,
                    reason,
                    prompt_tokens: 3,
                    completion_tokens: n,
                    queue_us: 1,
                    ttft_us: 2,
                    total_us: 3,
                    instance: 0,
                    moves: 0,
                })
            };
            match prompt_text(&request.input).as_str() {
                "refuse" => {
                    return Err(ServeError::new(ErrorCode::PromptTooLong, "too long"));
                }
                "fail-first" => {
                    let _ = tx.send(GenerateEvent::Error(ServeError::new(
                        ErrorCode::Unavailable,
                        "no instance can take it",
                    )));
                }
                "fail-midway" => {
                    tokens(2).for_each(|e| drop(tx.send(e)));
                    let _ = tx.send(GenerateEvent::Error(ServeError::new(
                        ErrorCode::Internal,
                        "instance lost",
                    )));
                }
                "vanish" => tokens(1).for_each(|e| drop(tx.send(e))),
                "hang" => {
                    tokens(1).for_each(|e| drop(tx.send(e)));
                    self.open.lock().unwrap().push(tx.clone());
                }
                "hang-silent" => self.open.lock().unwrap().push(tx.clone()),
                _ => {
                    // Up to 4 chunks (one without text); `length` when
                    // max_tokens stops it.
                    let n = (request.max_tokens as usize).min(WORDS.len());
                    tokens(n).for_each(|e| drop(tx.send(e)));
                    let reason = if n == request.max_tokens as usize {
                        FinishReason::Length
                    } else {
                        FinishReason::Stop
                    };
                    let _ = tx.send(finish(n as u32, reason));
                }
            }
            let cancelled = self.cancelled.clone();
            Ok(Generation {
                request_id: id,
                events: rx,
                cancel: CancelOnDrop::new(move || {
                    cancelled.fetch_add(1, Ordering::SeqCst);
                }),
            })
        }

        fn model_name(&self) -> String {
            MODEL.into()
        }

        fn metrics_text(&self) -> String {
            "# HELP up Up.\n# TYPE up gauge\nup 1\n".into()
        }
    }

    impl Fake {
        fn last_request(&self) -> GenerateRequest {
            self.requests
                .lock()
                .unwrap()
                .last()
                .cloned()
                .expect("a request")
        }
    }

    struct Server {
        addr: std::net::SocketAddr,
        fake: Arc<Fake>,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        task: tokio::task::JoinHandle<std::io::Result<()>>,
    }

    impl Server {
        async fn start() -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let fake = Arc::new(Fake::default());
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let serving: Arc<dyn Serving> = fake.clone();
            let task = tokio::spawn(serve_http(listener, serving, async move {
                let _ = stopped.await;
            }));
            Self {
                addr,
                fake,
                stop: Some(stop),
                task,
            }
        }

        async fn shutdown(mut self) {
            let _ = self.stop.take().unwrap().send(());
            tokio::time::timeout(Duration::from_secs(10), self.task)
                .await
                .expect("the server stops")
                .unwrap()
                .unwrap();
        }

        async fn request(&self, method: &str, path: &str, body: Option<&str>) -> Reply {
            let mut head = format!(
                "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
                self.addr
            );
            if let Some(b) = body {
                head.push_str(&format!(
                    "Content-Type: application/json\r\nContent-Length: {}\r\n",
                    b.len()
                ));
            }
            head.push_str("\r\n");
            head.push_str(body.unwrap_or(""));
            self.raw(head.as_bytes()).await
        }

        async fn raw(&self, bytes: &[u8]) -> Reply {
            let mut tcp = TcpStream::connect(self.addr).await.unwrap();
            tcp.write_all(bytes).await.unwrap();
            let mut out = Vec::new();
            tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut out))
                .await
                .expect("the reply ends")
                .unwrap();
            Reply::parse(&out)
        }

        async fn post(&self, path: &str, body: &Value) -> Reply {
            self.request("POST", path, Some(&body.to_string())).await
        }
    }

    #[derive(Debug)]
    struct Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    }

    impl Reply {
        fn parse(raw: &[u8]) -> Self {
            let text = String::from_utf8(raw.to_vec()).expect("utf-8 reply");
            let (head, rest) = text.split_once("\r\n\r\n").expect("a head");
            let mut lines = head.split("\r\n");
            let status = lines
                .next()
                .unwrap()
                .split(' ')
                .nth(1)
                .unwrap()
                .parse()
                .unwrap();
            let headers: Vec<(String, String)> = lines
                .map(|l| {
                    let (k, v) = l.split_once(':').unwrap();
                    (k.trim().to_ascii_lowercase(), v.trim().to_string())
                })
                .collect();
            let chunked = headers
                .iter()
                .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
            let body = if chunked {
                let mut body = String::new();
                let mut rest = rest;
                loop {
                    let (size, after) = rest.split_once("\r\n").expect("chunk size");
                    let size = usize::from_str_radix(size.trim(), 16).unwrap();
                    if size == 0 {
                        break;
                    }
                    body.push_str(&after[..size]);
                    rest = &after[size + 2..];
                }
                body
            } else {
                rest.to_string()
            };
            Self {
                status,
                headers,
                body,
            }
        }

        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        }

        fn json(&self) -> Value {
            serde_json::from_str(&self.body)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
        }

        /// The `data:` payloads of an SSE body.
        fn events(&self) -> Vec<String> {
            assert_eq!(self.header("content-type"), Some("text/event-stream"));
            self.body
                .split("\n\n")
                .filter(|e| !e.trim().is_empty())
                .filter(|e| !e.starts_with(':'))
                .map(|e| {
                    e.strip_prefix("data: ")
                        .unwrap_or_else(|| panic!("not a data event: {e:?}"))
                        .to_string()
                })
                .collect()
        }

        fn assert_error(&self, status: u16, code: &str) -> Value {
            assert_eq!(self.status, status, "{self:?}");
            assert!(
                self.header("content-type")
                    .unwrap()
                    .starts_with("application/json"),
                "{self:?}"
            );
            let v = self.json();
            let e = &v["error"];
            assert_eq!(e["code"], code, "{v}");
            assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
            let kind = if status >= 500 {
                "server_error"
            } else {
                "invalid_request_error"
            };
            assert_eq!(e["type"], kind, "{v}");
            assert!(e.get("param").is_some_and(Value::is_null), "{v}");
            v
        }
    }

    #[tokio::test]
    async fn http_completion_non_streaming() {
        let s = Server::start().await;
        let r = s
            .post(
                "/v1/completions",
                &json!({"model": "x", "prompt": "hi", "max_tokens": 2, "temperature": 0,
                        "stop": "\n", "priority": 2, "ignore_eos": true, "seed": 7}),
            )
            .await;
        assert_eq!(r.status, 200, "{r:?}");
        assert!(r
            .header("content-type")
            .unwrap()
            .starts_with("application/json"));
        let v = r.json();
        assert_eq!(v["id"], "cmpl-40");
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["model"], MODEL);
        assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
        assert_eq!(v["choices"][0]["index"], 0);
        assert_eq!(v["choices"][0]["text"], "Hello world");
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(
            v["usage"],
            json!({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})
        );
        let req = s.fake.last_request();
        assert_eq!(req.input, PromptInput::Text("hi".into()));
        assert_eq!(req.max_tokens, 2);
        assert_eq!(req.temperature, 0.0);
        assert_eq!(req.top_p, 1.0);
        assert_eq!(req.seed, 7);
        assert_eq!(req.stop, vec!["\n".to_string()]);
        assert_eq!(req.priority, 2);
        assert!(req.ignore_eos);
        // Finished requests are not cancelled.
        assert_eq!(s.fake.cancelled.load(Ordering::SeqCst), 0);
        s.shutdown().await;
    }

    #[tokio::test]
    async fn http_completion_defaults_and_prompt_forms() {
        let s = Server::start().await;
        let r = s
            .post("/v1/completions", &json!({"prompt": [1, 2, 3]}))
            .await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.json()["choices"][0]["finish_reason"], "stop");
        let req = s.fake.last_request();
        assert_eq!(req.input, PromptInput::Tokens(vec![1, 2, 3]));
        assert_eq!(req.max_tokens, DEFAULT_COMPLETION_MAX_TOKENS);
        assert_eq!(req.temperature, 1.0);
        assert_eq!(req.top_p, 1.0);
        assert_eq!(req.priority, 0);
        assert!(req.stop.is_empty() && !req.ignore_eos);

        let r = s
            .post(
                "/v1/completions",
                &json!({"prompt": ["one"], "stop": ["a", "b"], "top_p": 0.5,
                        "stop_token_ids": [7], "seed": -1, "n": 1, "logprobs": null}),
            )
            .await;
        assert_eq!(r.status, 200, "{r:?}");
        let req = s.fake.last_request();
        assert_eq!(req.input, PromptInput::Text("one".into()));
        assert_eq!(req.stop, vec!["a".to_string(), "b".to_string()]);
        assert_eq!(req.stop_token_ids, vec![7]);
        assert_eq!(req.top_p, 0.5);
        assert_eq!(req.seed, u64::MAX);

        let r = s
            .post("/v1/completions", &json!({"prompt": [[5, 6]]}))
            .await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(s.fake.last_request().input, PromptInput::Tokens(vec![5, 6]));

        for (body, needle) in [
            (json!({"prompt": ["a", "b"]}), "batch"),
            (json!({"prompt": [[1], [2]]}), "batch"),
            (json!({"prompt": [1, "x"]}), "token ids"),
            (json!({"prompt": [-1]}), "token ids"),
            (json!({"prompt": 5}), "prompt"),
            (json!({"messages": []}), "prompt is required"),
            (json!({"prompt": "x", "n": 2}), "n must be 1"),
            (json!({"prompt": "x", "best_of": 3}), "best_of"),
            (json!({"prompt": "x", "echo": true}), "echo"),
            (json!({"prompt": "x", "logprobs": 2}), "logprobs"),
            (json!({"prompt": "x", "stop": 3}), "stop"),
            (json!({"prompt": "x", "priority": -1}), "priority"),
            (json!({"prompt": "x", "priority": 9}), "priority"),
            (json!({"prompt": "x", "temperature": 101}), "temperature"),
            (json!({"prompt": "x", "stop": [""]}), "stop"),
            (json!({"prompt": []}), "no tokens"),
        ] {
            let r = s.post("/v1/completions", &body).await;
            let v = r.assert_error(400, "invalid_parameter");
            let msg = v["error"]["message"].as_str().unwrap();
            assert!(msg.contains(needle), "{body}: {msg}");
        }
        s.shutdown().await;
    }

    #[tokio::test]
    async fn http_completion_streaming() {
        let s = Server::start().await;
        let r = s
            .post(
                "/v1/completions",
                &json!({"prompt": "hi", "max_tokens": 10, "stream": true}),
            )
            .await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.header("cache-control"), Some("no-cache"));
        let events = r.events();
        assert_eq!(events.last().unwrap(), "[DONE]", "{events:?}");
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        // Three chunks with text (the empty one is skipped), then the end.
        assert_eq!(chunks.len(), 4, "{chunks:?}");
        let mut text = String::new();
        for c in &chunks {
            assert_eq!(c["id"], "cmpl-40");
            assert_eq!(c["object"], "text_completion");
            assert_eq!(c["model"], MODEL);
            assert!(c.get("usage").is_none());
            text.push_str(c["choices"][0]["text"].as_str().unwrap());
        }
        assert_eq!(text, "Hello world!");
        assert!(chunks[..3]
            .iter()
            .all(|c| c["choices"][0]["finish_reason"].is_null()));
        assert_eq!(chunks[3]["choices"][0]["finish_reason"], "stop");

        // With usage: a last chunk without choices.
        let r = s
            .post(
                "/v1/completions",
                &json!({"prompt": "hi", "max_tokens": 1, "stream": true,
                        "stream_options": {"include_usage": true}}),
            )
            .await;
        let events = r.events();
        assert_eq!(events.len(), 4, "{events:?}");
        assert_eq!(events[3], "[DONE]");
        let first: Value = serde_json::from_str(&events[0]).unwrap();
        assert_eq!(first["choices"][0]["text"], "Hello");
        assert!(first["usage"].is_null());
        let end: Value = serde_json::from_str(&events[1]).unwrap();
        assert_eq!(end["choices"][0]["finish_reason"], "length");
        let usage: Value = serde_json::from_str(&events[2]).unwrap();
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(
            usage["usage"],
            json!({"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4})
        );
        assert_eq!(s.fake.cancelled.load(Ordering::SeqCst), 0);
        s.shutdown().await;
    }

    #[tokio::test]
    async fn http_chat_streaming_and_not() {
        let s = Server::start().await;
        let r = s
            .post(
                "/v1/chat/completions",
                &json!({"model": MODEL, "stream": true, "max_tokens": 100,
                        "max_completion_tokens": 3,
                        "messages": [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": [{"type": "text", "text": "Hi "},
                                                                  {"type": "text", "text": "there"}]}]}),
            )
            .await;
        assert_eq!(r.status, 200, "{r:?}");
        let events = r.events();
        assert_eq!(events.last().unwrap(), "[DONE]");
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        assert_eq!(
            chunks[0]["choices"][0]["delta"],
            json!({"role": "assistant", "content": ""})
        );
        let mut text = String::new();
        for c in &chunks {
            assert_eq!(c["id"], "chatcmpl-40");
            assert_eq!(c["object"], "chat.completion.chunk");
            if let Some(t) = c["choices"][0]["delta"]["content"].as_str() {
                text.push_str(t);
            }
        }
        assert_eq!(text, "Hello world");
        let last = chunks.last().unwrap();
        assert_eq!(last["choices"][0]["finish_reason"], "length");
        assert_eq!(last["choices"][0]["delta"], json!({}));
        let req = s.fake.last_request();
        assert_eq!(req.max_tokens, 3, "max_completion_tokens wins");
        assert_eq!(
            req.input,
            PromptInput::Chat(vec![
                ChatTurn {
                    role: "system".into(),
                    content: "Be brief.".into()
                },
                ChatTurn {
                    role: "user".into(),
                    content: "Hi there".into()
                },
            ])
        );

        let r = s
            .post(
                "/v1/chat/completions",
                &json!({"messages": [{"role": "user", "content": "Hi"}], "temperature": 0}),
            )
            .await;
        assert_eq!(r.status, 200, "{r:?}");
        let v = r.json();
        assert_eq!(v["id"], "chatcmpl-41");
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(
            v["choices"][0]["message"],
            json!({"role": "assistant", "content": "Hello world!"})
        );
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert_eq!(v["usage"]["total_tokens"], 7);
        assert_eq!(s.fake.last_request().max_tokens, DEFAULT_CHAT_MAX_TOKENS);

        for (body, needle) in [
            (
                json!({"messages": [{"role": "user", "content": "Hi"}], "n": 2}),
                "n must be 1",
            ),
            (json!({"prompt": "Hi"}), "messages is required"),
            (json!({"messages": [{"content": "Hi"}]}), "messages[0].role"),
            (
                json!({"messages": [{"role": "user", "content": 1}]}),
                "messages[0].content",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
                "only text",
            ),
            (json!({"messages": []}), "no messages"),
        ] {
            let r = s.post("/v1/chat/completions", &body).await;
            let v = r.assert_error(400, "invalid_parameter");
            let msg = v["error"]["message"].as_str().unwrap();
            assert!(msg.contains(needle), "{body}: {msg}");
        }
        s.shutdown().await;
    }

    #[tokio::test]
    async fn http_errors_have_openai_shape() {
        let s = Server::start().await;
        let r = s
            .request("POST", "/v1/completions", Some("{not json"))
            .await;
        r.assert_error(400, "malformed");
        let r = s.request("POST", "/v1/completions", Some("")).await;
        r.assert_error(400, "malformed");
        let r = s
            .request(
                "POST",
                "/v1/completions",
                Some(r#"{"prompt": "x", "max_tokens": "8"}"#),
            )
            .await;
        r.assert_error(400, "invalid_parameter");
        let r = s
            .request("POST", "/v1/chat/completions", Some(r#"[1, 2]"#))
            .await;
        r.assert_error(400, "invalid_parameter");
        let r = s
            .post("/v1/completions", &json!({"prompt": "x", "max_tokens": 0}))
            .await;
        let v = r.assert_error(400, "invalid_parameter");
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_tokens"));
        let r = s
            .post(
                "/v1/completions",
                &json!({"prompt": "refuse", "stream": true}),
            )
            .await;
        r.assert_error(400, "prompt_too_long");
        // Refused by the first event: a plain HTTP error, not a stream.
        let r = s
            .post(
                "/v1/completions",
                &json!({"prompt": "fail-first", "stream": true}),
            )
            .await;
        r.assert_error(503, "unavailable");
        let r = s
            .post("/v1/completions", &json!({"prompt": "fail-first"}))
            .await;
        r.assert_error(503, "unavailable");
        let r = s
            .post("/v1/completions", &json!({"prompt": "vanish"}))
            .await;
        r.assert_error(500, "internal");

        let r = s.request("GET", "/v2/nothing", None).await;
        let v = r.assert_error(404, "not_found");
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/v2/nothing"));
        let r = s.request("GET", "/v1/completions", None).await;
        r.assert_error(405, "method_not_allowed");

        // Larger than the limit: 413. The server answers before reading
        // the whole body, so write and read at once and accept a reset
        // after the answer.
        for chunked in [false, true] {
            let big = format!(r#"{{"prompt": "{}"}}"#, "a".repeat(BODY_LIMIT));
            let mut req =
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".to_vec();
            if chunked {
                req.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
                req.extend_from_slice(format!("{:x}\r\n", big.len()).as_bytes());
                req.extend_from_slice(big.as_bytes());
                req.extend_from_slice(b"\r\n0\r\n\r\n");
            } else {
                req.extend_from_slice(format!("Content-Length: {}\r\n\r\n", big.len()).as_bytes());
                req.extend_from_slice(big.as_bytes());
            }
            let (mut rd, mut wr) = TcpStream::connect(s.addr).await.unwrap().into_split();
            let writer = tokio::spawn(async move {
                let _ = wr.write_all(&req).await;
                wr
            });
            let mut out = Vec::new();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match tokio::time::timeout(Duration::from_secs(10), rd.read(&mut buf))
                    .await
                    .expect("the reply ends")
                {
                    Ok(0) | Err(_) => break,
                    Ok(n) => out.extend_from_slice(&buf[..n]),
                }
            }
            drop(writer.await);
            Reply::parse(&out).assert_error(413, "too_large");
        }
        // Just under the limit is fine.
        let ok = format!(r#"{{"prompt": "{}"}}"#, "a".repeat(BODY_LIMIT - 20));
        let r = s.request("POST", "/v1/completions", Some(&ok)).await;
        assert_eq!(r.status, 200);
        s.shutdown().await;
    }

    #[tokio::test]
    async fn http_error_after_stream_start_is_an_event() {
        let s = Server::start().await;
        let r = s
            .post(
                "/v1/chat/completions",
                &json!({"messages": [{"role": "user", "content": "fail-midway"}], "stream": true}),
            )
            .await;
        assert_eq!(r.status, 200);
        let events = r.events();
        assert!(!events.contains(&"[DONE]".to_string()), "{events:?}");
        let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
        assert_eq!(last["error"]["code"], "internal");
        assert_eq!(last["error"]["type"], "server_error");
        assert_eq!(last["error"]["message"], "instance lost");
        let text: String = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str::<Value>(e).unwrap())
            .filter_map(|c| {
                c["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(String::from)
            })
            .collect();
        assert_eq!(text, "Hello world");
        // A stream whose request vanishes ends with an internal error.
        let r = s
            .post(
                "/v1/completions",
                &json!({"prompt": "vanish", "stream": true}),
            )
            .await;
        let events = r.events();
        let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
        assert_eq!(last["error"]["code"], "internal");
        s.shutdown().await;
    }

    async fn wait_cancelled(fake: &Fake, n: usize) {
        for _ in 0..500 {
            if fake.cancelled.load(Ordering::SeqCst) >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "expected {n} cancellations, saw {}",
            fake.cancelled.load(Ordering::SeqCst)
        );
    }

    #[tokio::test]
    async fn http_client_disconnect_cancels_the_request() {
        let s = Server::start().await;
        // Mid-stream: read the first token, then go away.
        let body = json!({"prompt": "hang", "stream": true}).to_string();
        let req = format!(
            "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut tcp = TcpStream::connect(s.addr).await.unwrap();
        tcp.write_all(req.as_bytes()).await.unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains("Hello") {
            let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "closed early");
            seen.extend_from_slice(&buf[..n]);
        }
        assert_eq!(s.fake.cancelled.load(Ordering::SeqCst), 0);
        drop(tcp);
        wait_cancelled(&s.fake, 1).await;

        // Before the first event (streaming) and while waiting for the
        // whole answer (not streaming).
        for stream in [true, false] {
            let body = json!({"prompt": "hang-silent", "stream": stream}).to_string();
            let req = format!(
                "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let before = s.fake.requests.lock().unwrap().len();
            let mut tcp = TcpStream::connect(s.addr).await.unwrap();
            tcp.write_all(req.as_bytes()).await.unwrap();
            while s.fake.requests.lock().unwrap().len() == before {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let n = s.fake.cancelled.load(Ordering::SeqCst);
            drop(tcp);
            wait_cancelled(&s.fake, n + 1).await;
        }
        s.fake.open.lock().unwrap().clear();
        s.shutdown().await;
    }

    #[tokio::test]
    async fn http_models_metrics_health() {
        let s = Server::start().await;
        let r = s.request("GET", "/v1/models", None).await;
        assert_eq!(r.status, 200);
        let v = r.json();
        assert_eq!(v["object"], "list");
        assert_eq!(v["data"].as_array().unwrap().len(), 1);
        assert_eq!(v["data"][0]["id"], MODEL);
        assert_eq!(v["data"][0]["object"], "model");
        assert_eq!(v["data"][0]["owned_by"], "llumen");
        assert!(v["data"][0]["created"].as_u64().unwrap() > 1_600_000_000);
        let r = s.request("GET", &format!("/v1/models/{MODEL}"), None).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.json()["id"], MODEL);
        s.request("GET", "/v1/models/other", None)
            .await
            .assert_error(404, "not_found");

        let r = s.request("GET", "/metrics", None).await;
        assert_eq!(r.status, 200);
        assert!(r
            .header("content-type")
            .unwrap()
            .starts_with("text/plain; version=0.0.4"));
        assert!(r.body.contains("up 1\n"));

        let r = s.request("GET", "/health", None).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body, "ok");
        s.shutdown().await;
    }

    /// The real `openai` Python client against this front end (with the
    /// fake behind it). Runs when LLUMEN_OPENAI_PYTHON names a python with
    /// `openai` installed (scripts/setup-python-openai.sh prints one).
    #[tokio::test]
    async fn http_openai_python_client() {
        let Ok(python) = std::env::var("LLUMEN_OPENAI_PYTHON") else {
            eprintln!("skipped: LLUMEN_OPENAI_PYTHON is not set");
            return;
        };
        let s = Server::start().await;
        let base = format!("http://{}/v1", s.addr);
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_client.py");
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new(python)
                .arg(script)
                .env("LLUMEN_HTTP_BASE", base)
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprintln!("{stdout}{stderr}");
        assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
        let summary: Value = serde_json::from_str(stdout.trim().lines().last().unwrap()).unwrap();
        assert_eq!(summary["ok"], true, "{summary}");
        s.shutdown().await;
    }
}
