//! The `llumen/1` wire format: versioned, length-prefixed binary frames on
//! QUIC streams, and their codec. Pure: no I/O, no clock (the async shell
//! that moves frames over quinn streams is [`crate::transport::wire`]).
//!
//! A frame is `len: u32 BE | version: u8 | kind: u8 | payload`, where `len`
//! counts the version, kind and payload bytes. Integers are big-endian,
//! strings are `u32 length + UTF-8`, lists are `u32 count + items`.
//! Decoding is strict: truncated payloads, trailing bytes, unknown kinds,
//! another version, invalid UTF-8 and lengths over the limit are errors,
//! never panics (fuzzed in the tests).
//!
//! Streams and who speaks first:
//! - client request stream: client `Generate`, server `Tokens`* then
//!   `Finished` or `Error`. Resetting the stream cancels the request.
//! - admin stream: client `Admin`, server `AdminReply` or `Error`.
//! - instance control stream (a joining instance): instance `Join`, manager
//!   `Welcome`, then instance `Load`* for as long as it lives.
//! - assignment stream (manager → joined instance): manager `Assign`,
//!   instance `Tokens`* then `Finished` or `Error`.
//! - migration stream (source instance → the destination's endpoint):
//!   source `Migrate`, then both ways `MigrationChunk`s carrying the
//!   engine's migration messages (a message larger than one frame is split
//!   into chunks, the last one marked).
//!
//! Owns byte formats only; must never touch sockets, the engine or policies.

use crate::front::api::{
    ChatTurn, ErrorCode, FinishReason, FinishRecord, GenerateRequest, PromptInput, ServeError,
    TokenChunk,
};
use llumen_policy_logic::InstanceLoad;

/// The protocol version this build speaks.
pub const VERSION: u8 = 1;
/// Bytes of the length prefix.
pub const LEN_BYTES: usize = 4;
/// Default largest frame (version + kind + payload) on request streams.
pub const MAX_REQUEST_FRAME: usize = 1 << 20;
/// Largest frame on admin streams (policy components travel in them).
pub const MAX_ADMIN_FRAME: usize = 64 << 20;
/// Largest migration chunk (KV blocks travel in them).
pub const MAX_MIGRATION_CHUNK: usize = 8 << 20;

/// A sequence to run on a joined instance (manager → instance).
#[derive(Clone, Debug, PartialEq)]
pub struct Assignment {
    pub request_id: u64,
    pub prompt: Vec<u32>,
    /// Tokens already generated elsewhere (resuming after a lost instance):
    /// the instance recomputes them and continues at index `generated.len()`.
    pub generated: Vec<u32>,
    pub max_tokens: u32,
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
    pub stop_token_ids: Vec<u32>,
    pub priority: u8,
    pub headroom_blocks: u32,
}

/// An instance introducing itself to the manager.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinInfo {
    /// The admin token (joining is an admin act).
    pub token: String,
    pub model: String,
    pub block_size: u32,
    pub total_blocks: u32,
    pub max_model_len: u32,
    /// The instance's endpoint for incoming migrations ("" for none).
    pub migration_addr: String,
}

/// One frame.
#[derive(Clone, Debug, PartialEq)]
pub enum Frame {
    Generate(GenerateRequest),
    Tokens(TokenChunk),
    Finished(FinishRecord),
    Error(ServeError),
    /// An admin call: the token, the command as JSON, an optional blob
    /// (a policy component).
    Admin {
        token: String,
        command_json: String,
        blob: Vec<u8>,
    },
    /// The answer to an admin call, as JSON.
    AdminReply {
        json: String,
    },
    Join(JoinInfo),
    /// The manager's answer to `Join`: the instance's id.
    Welcome {
        instance: u32,
    },
    Load(InstanceLoad),
    Assign(Assignment),
    /// Opens a migration stream to instance `destination` (authenticated by
    /// the admin token, since it writes into an instance's KV cache).
    Migrate {
        token: String,
        destination: u32,
    },
    /// A piece of an encoded migration message; `last` ends the message.
    MigrationChunk {
        last: bool,
        bytes: Vec<u8>,
    },
    /// Manager → joined instance: migrate `request` out to instance
    /// `destination` at `addr`; answered by `AdminReply` with the report.
    MigrateOut {
        migration_id: u64,
        request: u64,
        destination: u32,
        addr: String,
    },
    /// Joined instance → manager: request `request`, migrated in to
    /// `instance`, continues its stream on this stream.
    Resume {
        token: String,
        request: u64,
        instance: u32,
    },
    /// On an assignment stream: the request migrated away to `instance`.
    Moved {
        instance: u32,
    },
    /// Manager → joined instance: which running requests could migrate?
    /// Answered by `AdminReply` with a JSON list of
    /// `[id, priority, blocks, prompt_tokens, output_tokens, arrival_us]`.
    Candidates,
}

impl Frame {
    fn kind(&self) -> u8 {
        match self {
            Frame::Generate(_) => 0x01,
            Frame::Tokens(_) => 0x02,
            Frame::Finished(_) => 0x03,
            Frame::Error(_) => 0x04,
            Frame::Admin { .. } => 0x10,
            Frame::AdminReply { .. } => 0x11,
            Frame::Join(_) => 0x20,
            Frame::Welcome { .. } => 0x21,
            Frame::Load(_) => 0x22,
            Frame::Assign(_) => 0x23,
            Frame::Migrate { .. } => 0x30,
            Frame::MigrationChunk { .. } => 0x31,
            Frame::MigrateOut { .. } => 0x32,
            Frame::Resume { .. } => 0x33,
            Frame::Moved { .. } => 0x34,
            Frame::Candidates => 0x35,
        }
    }

    /// A short name for errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Generate(_) => "generate",
            Frame::Tokens(_) => "tokens",
            Frame::Finished(_) => "finished",
            Frame::Error(_) => "error",
            Frame::Admin { .. } => "admin",
            Frame::AdminReply { .. } => "admin-reply",
            Frame::Join(_) => "join",
            Frame::Welcome { .. } => "welcome",
            Frame::Load(_) => "load",
            Frame::Assign(_) => "assign",
            Frame::Migrate { .. } => "migrate",
            Frame::MigrationChunk { .. } => "migration-chunk",
            Frame::MigrateOut { .. } => "migrate-out",
            Frame::Resume { .. } => "resume",
            Frame::Moved { .. } => "moved",
            Frame::Candidates => "candidates",
        }
    }
}

/// Why bytes are not a frame.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("frame of {len} bytes is over the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("protocol version {0} is not supported (this server speaks {VERSION})")]
    UnsupportedVersion(u8),
    #[error("unknown frame kind 0x{0:02x}")]
    UnknownKind(u8),
    #[error("frame truncated: {0}")]
    Truncated(&'static str),
    #[error("{0} trailing bytes after the frame's payload")]
    TrailingBytes(usize),
    #[error("invalid field: {0}")]
    Invalid(String),
    #[error("stream ended inside a frame ({0} bytes pending)")]
    UnexpectedEnd(usize),
}

impl DecodeError {
    /// The typed error a peer receives for these bytes.
    pub fn to_serve_error(&self) -> ServeError {
        let code = match self {
            DecodeError::TooLarge { .. } => ErrorCode::TooLarge,
            DecodeError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            _ => ErrorCode::Malformed,
        };
        ServeError::new(code, self.to_string())
    }
}

// ----- encoding -----

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn f32(&mut self, v: f32) {
        self.u32(v.to_bits());
    }
    fn bool(&mut self, v: bool) {
        self.u8(v as u8);
    }
    fn len(&mut self, n: usize) {
        self.u32(u32::try_from(n).expect("field longer than 4 GiB"));
    }
    fn bytes(&mut self, b: &[u8]) {
        self.len(b.len());
        self.0.extend_from_slice(b);
    }
    fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
    fn tokens(&mut self, t: &[u32]) {
        self.len(t.len());
        for &v in t {
            self.u32(v);
        }
    }
}

/// Encodes one frame, length prefix included.
pub fn encode(frame: &Frame) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(64));
    w.u32(0); // length, patched below
    w.u8(VERSION);
    w.u8(frame.kind());
    match frame {
        Frame::Generate(r) => {
            match &r.input {
                PromptInput::Text(t) => {
                    w.u8(0);
                    w.str(t);
                }
                PromptInput::Tokens(t) => {
                    w.u8(1);
                    w.tokens(t);
                }
                PromptInput::Chat(turns) => {
                    w.u8(2);
                    w.len(turns.len());
                    for t in turns {
                        w.str(&t.role);
                        w.str(&t.content);
                    }
                }
            }
            w.u32(r.max_tokens);
            w.f32(r.temperature);
            w.f32(r.top_p);
            w.u64(r.seed);
            w.u8(r.priority);
            w.len(r.stop.len());
            for s in &r.stop {
                w.str(s);
            }
            w.tokens(&r.stop_token_ids);
            w.bool(r.ignore_eos);
        }
        Frame::Tokens(c) => {
            w.u32(c.index);
            w.tokens(&c.ids);
            w.str(&c.text);
        }
        Frame::Finished(f) => {
            w.u64(f.request_id);
            w.u8(match f.reason {
                FinishReason::Length => 0,
                FinishReason::Stop => 1,
            });
            w.u32(f.prompt_tokens);
            w.u32(f.completion_tokens);
            w.u64(f.queue_us);
            w.u64(f.ttft_us);
            w.u64(f.total_us);
            w.u32(f.instance);
            w.u32(f.moves);
        }
        Frame::Error(e) => {
            w.u16(e.code as u16);
            w.str(&e.message);
        }
        Frame::Admin {
            token,
            command_json,
            blob,
        } => {
            w.str(token);
            w.str(command_json);
            w.bytes(blob);
        }
        Frame::AdminReply { json } => w.str(json),
        Frame::Join(j) => {
            w.str(&j.token);
            w.str(&j.model);
            w.u32(j.block_size);
            w.u32(j.total_blocks);
            w.u32(j.max_model_len);
            w.str(&j.migration_addr);
        }
        Frame::Welcome { instance } => w.u32(*instance),
        Frame::Load(l) => {
            w.0.extend_from_slice(&llumen_store::codec::encode_snapshot(l));
        }
        Frame::Assign(a) => {
            w.u64(a.request_id);
            w.tokens(&a.prompt);
            w.tokens(&a.generated);
            w.u32(a.max_tokens);
            w.f32(a.temperature);
            w.f32(a.top_p);
            w.u64(a.seed);
            w.tokens(&a.stop_token_ids);
            w.u8(a.priority);
            w.u32(a.headroom_blocks);
        }
        Frame::Migrate { token, destination } => {
            w.str(token);
            w.u32(*destination);
        }
        Frame::MigrationChunk { last, bytes } => {
            w.bool(*last);
            w.bytes(bytes);
        }
        Frame::MigrateOut {
            migration_id,
            request,
            destination,
            addr,
        } => {
            w.u64(*migration_id);
            w.u64(*request);
            w.u32(*destination);
            w.str(addr);
        }
        Frame::Resume {
            token,
            request,
            instance,
        } => {
            w.str(token);
            w.u64(*request);
            w.u32(*instance);
        }
        Frame::Moved { instance } => w.u32(*instance),
        Frame::Candidates => {}
    }
    let len = u32::try_from(w.0.len() - LEN_BYTES).expect("frame longer than 4 GiB");
    w.0[..LEN_BYTES].copy_from_slice(&len.to_be_bytes());
    w.0
}

// ----- decoding -----

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Truncated(what));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.take(2, what)?.try_into().unwrap()))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.take(8, what)?.try_into().unwrap()))
    }
    fn f32(&mut self, what: &'static str) -> Result<f32, DecodeError> {
        Ok(f32::from_bits(self.u32(what)?))
    }
    fn bool(&mut self, what: &'static str) -> Result<bool, DecodeError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(DecodeError::Invalid(format!("{what}: boolean byte {v}"))),
        }
    }
    /// A count of items of at least `item_bytes` each, checked against the
    /// bytes left before anything is allocated.
    fn count(&mut self, item_bytes: usize, what: &'static str) -> Result<usize, DecodeError> {
        let n = self.u32(what)? as usize;
        if n.saturating_mul(item_bytes.max(1)) > self.0.len() {
            return Err(DecodeError::Truncated(what));
        }
        Ok(n)
    }
    fn bytes(&mut self, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let n = self.count(1, what)?;
        self.take(n, what)
    }
    fn string(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let b = self.bytes(what)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| DecodeError::Invalid(format!("{what}: not UTF-8")))
    }
    fn tokens(&mut self, what: &'static str) -> Result<Vec<u32>, DecodeError> {
        let n = self.count(4, what)?;
        (0..n).map(|_| self.u32(what)).collect()
    }
    fn finish(self) -> Result<(), DecodeError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes(self.0.len()))
        }
    }
}

/// Decodes the body of one frame (the bytes after the length prefix).
pub fn decode_body(body: &[u8]) -> Result<Frame, DecodeError> {
    let mut r = Reader(body);
    let version = r.u8("version")?;
    if version != VERSION {
        return Err(DecodeError::UnsupportedVersion(version));
    }
    let kind = r.u8("kind")?;
    let frame = match kind {
        0x01 => {
            let input = match r.u8("prompt kind")? {
                0 => PromptInput::Text(r.string("prompt")?),
                1 => PromptInput::Tokens(r.tokens("prompt tokens")?),
                2 => {
                    let n = r.count(8, "chat turns")?;
                    let mut turns = Vec::with_capacity(n);
                    for _ in 0..n {
                        turns.push(ChatTurn {
                            role: r.string("chat role")?,
                            content: r.string("chat content")?,
                        });
                    }
                    PromptInput::Chat(turns)
                }
                v => return Err(DecodeError::Invalid(format!("prompt kind {v}"))),
            };
            let max_tokens = r.u32("max_tokens")?;
            let temperature = r.f32("temperature")?;
            let top_p = r.f32("top_p")?;
            let seed = r.u64("seed")?;
            let priority = r.u8("priority")?;
            let n = r.count(4, "stop strings")?;
            let stop = (0..n)
                .map(|_| r.string("stop string"))
                .collect::<Result<_, _>>()?;
            let stop_token_ids = r.tokens("stop token ids")?;
            let ignore_eos = r.bool("ignore_eos")?;
            Frame::Generate(GenerateRequest {
                input,
                max_tokens,
                temperature,
                top_p,
                seed,
                priority,
                stop,
                stop_token_ids,
                ignore_eos,
            })
        }
        0x02 => Frame::Tokens(TokenChunk {
            index: r.u32("index")?,
            ids: r.tokens("token ids")?,
            text: r.string("text")?,
        }),
        0x03 => Frame::Finished(FinishRecord {
            request_id: r.u64("request id")?,
            reason: match r.u8("finish reason")? {
                0 => FinishReason::Length,
                1 => FinishReason::Stop,
                v => return Err(DecodeError::Invalid(format!("finish reason {v}"))),
            },
            prompt_tokens: r.u32("prompt tokens")?,
            completion_tokens: r.u32("completion tokens")?,
            queue_us: r.u64("queue_us")?,
            ttft_us: r.u64("ttft_us")?,
            total_us: r.u64("total_us")?,
            instance: r.u32("instance")?,
            moves: r.u32("moves")?,
        }),
        0x04 => {
            let code = r.u16("error code")?;
            let code = ErrorCode::from_u16(code)
                .ok_or_else(|| DecodeError::Invalid(format!("error code {code}")))?;
            Frame::Error(ServeError::new(code, r.string("error message")?))
        }
        0x10 => Frame::Admin {
            token: r.string("token")?,
            command_json: r.string("command")?,
            blob: r.bytes("blob")?.to_vec(),
        },
        0x11 => Frame::AdminReply {
            json: r.string("reply")?,
        },
        0x20 => Frame::Join(JoinInfo {
            token: r.string("token")?,
            model: r.string("model")?,
            block_size: r.u32("block size")?,
            total_blocks: r.u32("total blocks")?,
            max_model_len: r.u32("max model len")?,
            migration_addr: r.string("migration address")?,
        }),
        0x21 => Frame::Welcome {
            instance: r.u32("instance")?,
        },
        0x22 => {
            let bytes = r.take(llumen_store::codec::SNAPSHOT_LEN, "load")?;
            Frame::Load(
                llumen_store::codec::decode_snapshot(bytes)
                    .map_err(|e| DecodeError::Invalid(format!("load: {e}")))?,
            )
        }
        0x23 => Frame::Assign(Assignment {
            request_id: r.u64("request id")?,
            prompt: r.tokens("prompt")?,
            generated: r.tokens("generated")?,
            max_tokens: r.u32("max tokens")?,
            temperature: r.f32("temperature")?,
            top_p: r.f32("top_p")?,
            seed: r.u64("seed")?,
            stop_token_ids: r.tokens("stop token ids")?,
            priority: r.u8("priority")?,
            headroom_blocks: r.u32("headroom")?,
        }),
        0x30 => Frame::Migrate {
            token: r.string("token")?,
            destination: r.u32("destination")?,
        },
        0x31 => Frame::MigrationChunk {
            last: r.bool("last")?,
            bytes: r.bytes("chunk")?.to_vec(),
        },
        0x32 => Frame::MigrateOut {
            migration_id: r.u64("migration id")?,
            request: r.u64("request")?,
            destination: r.u32("destination")?,
            addr: r.string("address")?,
        },
        0x33 => Frame::Resume {
            token: r.string("token")?,
            request: r.u64("request")?,
            instance: r.u32("instance")?,
        },
        0x34 => Frame::Moved {
            instance: r.u32("instance")?,
        },
        0x35 => Frame::Candidates,
        k => return Err(DecodeError::UnknownKind(k)),
    };
    r.finish()?;
    Ok(frame)
}

/// Reassembles frames from a byte stream delivered in arbitrary pieces.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    max_frame: usize,
    /// A tighter limit per frame kind, checked as soon as the kind byte
    /// arrives (a request stream may not send a 64 MiB admin-sized frame).
    kind_limit: Option<fn(u8) -> usize>,
}

impl FrameDecoder {
    /// A decoder refusing frames over `max_frame` bytes (version + kind + payload).
    pub fn new(max_frame: usize) -> Self {
        Self {
            buf: Vec::new(),
            max_frame,
            kind_limit: None,
        }
    }

    /// Also limits each frame by its kind (see [`limit_by_kind`]).
    pub fn with_kind_limit(mut self, limit: fn(u8) -> usize) -> Self {
        self.kind_limit = Some(limit);
        self
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received but not yet part of a returned frame.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Takes the bytes received but not yet part of a returned frame (for a
    /// reader that carries on with the stream's raw bytes).
    pub fn take_pending(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }

    /// The next whole frame, `None` when more bytes are needed. An oversize
    /// length is refused as soon as the prefix arrives, before its body.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, DecodeError> {
        if self.buf.len() < LEN_BYTES {
            return Ok(None);
        }
        let len = u32::from_be_bytes(self.buf[..LEN_BYTES].try_into().unwrap()) as usize;
        if len > self.max_frame {
            return Err(DecodeError::TooLarge {
                len,
                max: self.max_frame,
            });
        }
        if let (Some(limit), Some(&kind)) = (self.kind_limit, self.buf.get(LEN_BYTES + 1)) {
            let max = limit(kind).min(self.max_frame);
            if len > max {
                return Err(DecodeError::TooLarge { len, max });
            }
        }
        if self.buf.len() < LEN_BYTES + len {
            return Ok(None);
        }
        let frame = decode_body(&self.buf[LEN_BYTES..LEN_BYTES + len]);
        self.buf.drain(..LEN_BYTES + len);
        frame.map(Some)
    }

    /// Call at the end of the stream: an error if a frame was cut short.
    pub fn finish(&self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::UnexpectedEnd(self.buf.len()))
        }
    }
}

/// The server's limit per frame kind: admin frames may carry a policy
/// component ([`MAX_ADMIN_FRAME`]); everything else is small
/// ([`MAX_REQUEST_FRAME`]).
pub fn limit_by_kind(kind: u8) -> usize {
    match kind {
        0x10 => MAX_ADMIN_FRAME,
        0x31 => MAX_MIGRATION_CHUNK + 16,
        _ => MAX_REQUEST_FRAME,
    }
}

/// Bytes of a `MigrationChunk` frame before its payload: length prefix,
/// version, kind, `last`, payload length. `encode(MigrationChunk { last,
/// bytes })` is [`migration_chunk_header`]`(last, bytes.len())` followed by
/// `bytes`, which lets the migration transport send and receive multi-MB
/// payloads without copying them through a frame buffer.
pub const MIGRATION_CHUNK_HEADER: usize = LEN_BYTES + 2 + 1 + 4;

/// The header of a `MigrationChunk` frame carrying `payload_len` bytes.
/// Panics if `payload_len` is over [`MAX_MIGRATION_CHUNK`] (a caller bug).
pub fn migration_chunk_header(last: bool, payload_len: usize) -> [u8; MIGRATION_CHUNK_HEADER] {
    assert!(
        payload_len <= MAX_MIGRATION_CHUNK,
        "migration chunk over the limit"
    );
    let frame_len = (2 + 1 + 4 + payload_len) as u32;
    let mut h = [0u8; MIGRATION_CHUNK_HEADER];
    h[..4].copy_from_slice(&frame_len.to_be_bytes());
    h[4] = VERSION;
    h[5] = 0x31;
    h[6] = last as u8;
    h[7..].copy_from_slice(&(payload_len as u32).to_be_bytes());
    h
}

/// Parses a `MigrationChunk` frame's header: `(last, payload length)`.
/// Refuses another version or kind, a payload over [`MAX_MIGRATION_CHUNK`]
/// and a frame length that disagrees with the payload length.
pub fn parse_migration_chunk_header(
    h: &[u8; MIGRATION_CHUNK_HEADER],
) -> Result<(bool, usize), DecodeError> {
    let frame_len = u32::from_be_bytes(h[..4].try_into().unwrap()) as usize;
    if h[4] != VERSION {
        return Err(DecodeError::UnsupportedVersion(h[4]));
    }
    if h[5] != 0x31 {
        return Err(DecodeError::Invalid(format!(
            "a frame of kind 0x{:02x} where a migration chunk was expected",
            h[5]
        )));
    }
    let last = match h[6] {
        0 => false,
        1 => true,
        v => return Err(DecodeError::Invalid(format!("last: boolean byte {v}"))),
    };
    let payload_len = u32::from_be_bytes(h[7..].try_into().unwrap()) as usize;
    if payload_len > MAX_MIGRATION_CHUNK {
        return Err(DecodeError::TooLarge {
            len: payload_len,
            max: MAX_MIGRATION_CHUNK,
        });
    }
    if frame_len != 2 + 1 + 4 + payload_len {
        return Err(DecodeError::Invalid(format!(
            "migration chunk frame of {frame_len} bytes carries a payload of {payload_len}"
        )));
    }
    Ok((last, payload_len))
}

/// Decodes exactly one frame from `bytes` (length prefix included).
pub fn decode(bytes: &[u8], max_frame: usize) -> Result<Frame, DecodeError> {
    let mut d = FrameDecoder::new(max_frame);
    d.push(bytes);
    let frame = d
        .next_frame()?
        .ok_or(DecodeError::UnexpectedEnd(bytes.len()))?;
    if d.pending() > 0 {
        return Err(DecodeError::TrailingBytes(d.pending()));
    }
    Ok(frame)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn samples() -> Vec<Frame> {
        let mut g = GenerateRequest::text("hello", 8);
        g.stop = vec!["\n\n".into()];
        g.stop_token_ids = vec![2, 3];
        g.priority = 2;
        vec![
            Frame::Generate(g),
            Frame::Generate(GenerateRequest {
                input: PromptInput::Chat(vec![ChatTurn {
                    role: "user".into(),
                    content: "Hi ✓".into(),
                }]),
                ..GenerateRequest::text("", 1)
            }),
            Frame::Generate(GenerateRequest {
                input: PromptInput::Tokens(vec![1, 2, 3]),
                ..GenerateRequest::text("", 1)
            }),
            Frame::Tokens(TokenChunk {
                index: 4,
                ids: vec![9, 10],
                text: "ab".into(),
            }),
            Frame::Finished(FinishRecord {
                request_id: 7,
                reason: FinishReason::Stop,
                prompt_tokens: 3,
                completion_tokens: 5,
                queue_us: 1,
                ttft_us: 2,
                total_us: 3,
                instance: 1,
                moves: 0,
            }),
            Frame::Error(ServeError::new(ErrorCode::PromptTooLong, "too long")),
            Frame::Admin {
                token: "t".into(),
                command_json: "{}".into(),
                blob: vec![0, 1, 2],
            },
            Frame::AdminReply { json: "[]".into() },
            Frame::Join(JoinInfo {
                token: "t".into(),
                model: "tiny".into(),
                block_size: 16,
                total_blocks: 64,
                max_model_len: 2048,
                migration_addr: "127.0.0.1:9".into(),
            }),
            Frame::MigrateOut {
                migration_id: 1,
                request: 2,
                destination: 3,
                addr: "[::1]:4".into(),
            },
            Frame::Resume {
                token: "t".into(),
                request: 5,
                instance: 6,
            },
            Frame::Moved { instance: 7 },
            Frame::Candidates,
            Frame::Welcome { instance: 3 },
            Frame::Migrate {
                token: "t".into(),
                destination: 2,
            },
            Frame::MigrationChunk {
                last: true,
                bytes: vec![1, 2, 3],
            },
            Frame::Load(InstanceLoad {
                instance: 2,
                total_blocks: 10,
                draining: true,
                ..Default::default()
            }),
            Frame::Assign(Assignment {
                request_id: 1,
                prompt: vec![1, 2],
                generated: vec![3],
                max_tokens: 9,
                temperature: 0.5,
                top_p: 0.9,
                seed: 4,
                stop_token_ids: vec![0],
                priority: 1,
                headroom_blocks: 2,
            }),
        ]
    }

    #[test]
    fn every_frame_round_trips() {
        for f in samples() {
            let bytes = encode(&f);
            assert_eq!(decode(&bytes, MAX_ADMIN_FRAME).unwrap(), f, "{}", f.name());
        }
    }

    #[test]
    fn frames_reassemble_from_single_bytes() {
        let all: Vec<u8> = samples().iter().flat_map(encode).collect();
        let mut d = FrameDecoder::new(MAX_ADMIN_FRAME);
        let mut got = Vec::new();
        for b in all {
            d.push(&[b]);
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
        }
        d.finish().unwrap();
        assert_eq!(got, samples());
    }

    #[test]
    fn bad_frames_are_typed_errors() {
        let good = encode(&Frame::Welcome { instance: 1 });
        let mut v2 = good.clone();
        v2[4] = 2;
        assert_eq!(decode(&v2, 1024), Err(DecodeError::UnsupportedVersion(2)));
        assert_eq!(
            decode(&v2, 1024).unwrap_err().to_serve_error().code,
            ErrorCode::UnsupportedVersion
        );
        let mut unknown = good.clone();
        unknown[5] = 0x7f;
        assert_eq!(decode(&unknown, 1024), Err(DecodeError::UnknownKind(0x7f)));
        // Oversize is refused from the prefix alone.
        let mut d = FrameDecoder::new(16);
        d.push(&1000u32.to_be_bytes());
        assert_eq!(
            d.next_frame(),
            Err(DecodeError::TooLarge { len: 1000, max: 16 })
        );
        // A count far beyond the bytes present allocates nothing.
        let mut huge = encode(&Frame::Tokens(TokenChunk {
            index: 0,
            ids: vec![],
            text: String::new(),
        }));
        huge[10..14].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            decode(&huge, 1024),
            Err(DecodeError::Truncated(_))
        ));
        // Trailing bytes inside the declared length.
        let mut trailing = good.clone();
        trailing.push(0);
        let len = (trailing.len() - LEN_BYTES) as u32;
        trailing[..4].copy_from_slice(&len.to_be_bytes());
        assert_eq!(decode(&trailing, 1024), Err(DecodeError::TrailingBytes(1)));
        // Cut short.
        let mut d = FrameDecoder::new(1024);
        d.push(&good[..good.len() - 1]);
        assert_eq!(d.next_frame(), Ok(None));
        assert!(d.finish().is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

        /// Random bytes never panic the decoder.
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut d = FrameDecoder::new(1 << 16);
            d.push(&bytes);
            while let Ok(Some(_)) = d.next_frame() {}
        }

        /// Valid frames with random bytes flipped never panic either.
        #[test]
        fn mutated_frames_never_panic(
            which in 0usize..18,
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
        ) {
            let frames = samples();
            let mut bytes = encode(&frames[which % frames.len()]);
            for (at, v) in flips {
                let at = at % bytes.len();
                bytes[at] = v;
            }
            let _ = decode(&bytes, 1 << 16);
        }

        /// The migration-chunk header helpers agree with the frame codec:
        /// header ++ payload is the encoded frame, and what the header
        /// parser accepts the codec decodes to the same `last` and length.
        #[test]
        fn migration_chunk_header_matches_the_codec(
            last in any::<bool>(),
            payload in proptest::collection::vec(any::<u8>(), 0..64),
            flips in proptest::collection::vec((0usize..MIGRATION_CHUNK_HEADER, any::<u8>()), 0..3),
        ) {
            let frame = Frame::MigrationChunk { last, bytes: payload.clone() };
            let mut joined = migration_chunk_header(last, payload.len()).to_vec();
            joined.extend_from_slice(&payload);
            prop_assert_eq!(&joined, &encode(&frame));
            prop_assert_eq!(
                parse_migration_chunk_header(&joined[..MIGRATION_CHUNK_HEADER].try_into().unwrap()),
                Ok((last, payload.len()))
            );
            // Mutated headers: never a panic, and an accepted one is a
            // frame the codec decodes to the same fields.
            for (at, v) in flips {
                joined[at] = v;
            }
            let header: [u8; MIGRATION_CHUNK_HEADER] = joined[..MIGRATION_CHUNK_HEADER].try_into().unwrap();
            if let Ok((l, n)) = parse_migration_chunk_header(&header) {
                if n == payload.len() {
                    prop_assert_eq!(
                        decode(&joined, MAX_MIGRATION_CHUNK + 64),
                        Ok(Frame::MigrationChunk { last: l, bytes: payload.clone() })
                    );
                }
            }
        }
    }
}
