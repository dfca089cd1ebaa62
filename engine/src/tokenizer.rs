//! GPT-2 style byte-level BPE tokenizer, as llama.cpp's GGUF files describe
//! it (`tokenizer.ggml.model = "gpt2"`), with the ChatML chat template.
//!
//! **Owns**: text -> token ids (special tokens, pre-tokenization, byte-level
//! mapping, rank-ordered BPE merges), token ids -> text (including a
//! streaming decoder that holds back partial UTF-8), and rendering chat
//! messages into a prompt. **Never touches**: tensors, the model, scheduling.
//! The only I/O is [`Tokenizer::from_gguf`], which reads a file's metadata.
//!
//! # Pipeline (matches llama.cpp and HF `tokenizers` for SmolLM2)
//!
//! 1. Special tokens (GGUF token type control or user-defined, e.g.
//!    `<|im_start|>`) found in the text become their own id; the text between
//!    them is encoded normally ([`Tokenizer::encode`]; [`Tokenizer::encode_ordinary`]
//!    treats them as plain text).
//! 2. Pre-tokenization: optionally each numeric character alone (SmolLM2's
//!    `smollm` pre-tokenizer does this), then GPT-2's pattern
//!    `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
//!    hand-written over `char` classes. **No leading space is added** unless
//!    the file says `tokenizer.ggml.add_space_prefix = true` (SmolLM2 says
//!    false: `"The"` is id 504, `"ĠThe"` is 378).
//! 3. Each piece's UTF-8 bytes are mapped to GPT-2's printable byte alphabet
//!    (`Ġ` is the space) and merged by BPE, lowest merge rank first.

use std::collections::{BinaryHeap, HashMap};
use std::path::Path;

use candle_core::quantized::gguf_file::Value;

use crate::TokenId;

/// A tokenizer construction or chat-template error (the message says what).
#[derive(Clone, Debug, PartialEq)]
pub struct TokenizerError(pub String);

impl std::fmt::Display for TokenizerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "tokenizer: {}", self.0)
    }
}

impl std::error::Error for TokenizerError {}

fn err<T>(msg: impl Into<String>) -> Result<T, TokenizerError> {
    Err(TokenizerError(msg.into()))
}

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenType {
    Normal,
    Unknown,
    /// Control tokens (`<|im_start|>`, `<|endoftext|>`): matched as one id
    /// when they appear in text; skipped by `decode(.., skip_special = true)`.
    Control,
    /// User-defined tokens: matched as one id in text, always rendered.
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    /// From the GGUF integer code (0 and unknown codes count as normal).
    pub fn from_code(code: i64) -> Self {
        match code {
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => TokenType::Normal,
        }
    }

    /// Whether text containing this token's string encodes to it directly.
    pub fn is_special(self) -> bool {
        matches!(self, TokenType::Control | TokenType::UserDefined)
    }
}

/// Everything a [`Tokenizer`] is built from (what a GGUF file's
/// `tokenizer.*` metadata holds).
#[derive(Clone, Debug, Default)]
pub struct BpeSpec {
    /// Token strings in the byte-level alphabet, indexed by id.
    pub tokens: Vec<String>,
    /// One type per token; empty means all normal.
    pub token_types: Vec<TokenType>,
    /// Merges in rank order, each `"left right"`.
    pub merges: Vec<String>,
    pub bos: Option<TokenId>,
    pub eos: Option<TokenId>,
    /// Prepend BOS in [`Tokenizer::encode`].
    pub add_bos: bool,
    /// Prepend a space to the text before encoding (SmolLM2: false).
    pub add_space_prefix: bool,
    /// Split every numeric character into its own piece before the GPT-2
    /// pattern (llama.cpp pre-tokenizers `smollm`, `starcoder`, ...).
    pub individual_digits: bool,
    /// The Jinja chat template, if the model has one (see [`ChatTemplate::from_jinja`]).
    pub chat_template: Option<String>,
}

/// A byte-level BPE tokenizer. Plain data: `Send + Sync`, cheap to share
/// behind an `Arc`.
#[derive(Clone, Debug)]
pub struct Tokenizer {
    tokens: Vec<String>,
    types: Vec<TokenType>,
    vocab: HashMap<String, TokenId>,
    /// `(left, right) -> (rank, merged)`.
    merges: HashMap<(TokenId, TokenId), (u32, TokenId)>,
    /// The token of each single byte ([`NO_TOKEN`] for bytes the vocabulary
    /// lacks: SmolLM2 has none for 21 bytes, mostly ones UTF-8 never uses).
    byte_tokens: [TokenId; 256],
    /// What each token decodes to.
    token_bytes: Vec<Box<[u8]>>,
    /// Special tokens, longest first: `(text, id)`.
    specials: Vec<(String, TokenId)>,
    bos: Option<TokenId>,
    eos: Option<TokenId>,
    add_bos: bool,
    add_space_prefix: bool,
    individual_digits: bool,
    chat: Result<ChatTemplate, TokenizerError>,
}

/// Placeholder for a byte without a token: such bytes are dropped before
/// merging (HF `tokenizers`' behaviour without an unknown token, so their
/// neighbours may merge; llama.cpp instead keeps them as a barrier).
const NO_TOKEN: TokenId = TokenId::MAX;

/// GPT-2's byte -> printable char table.
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for (b, slot) in table.iter_mut().enumerate() {
        let b = b as u32;
        let keep = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        *slot = if keep {
            char::from_u32(b).unwrap()
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap()
        };
    }
    table
}

impl Tokenizer {
    /// Builds a tokenizer from its parts. Fails when a printable ASCII byte
    /// or the space has no token (not a byte-level vocabulary), a merge is
    /// malformed or names unknown tokens, or an id is out of range. Other
    /// bytes may lack a token: they are dropped when encoding.
    pub fn new(spec: BpeSpec) -> Result<Self, TokenizerError> {
        let n = spec.tokens.len();
        if n == 0 {
            return err("empty vocabulary");
        }
        if n > u32::MAX as usize {
            return err(format!("vocabulary of {n} tokens does not fit token ids"));
        }
        let types = if spec.token_types.is_empty() {
            vec![TokenType::Normal; n]
        } else if spec.token_types.len() == n {
            spec.token_types
        } else {
            return err(format!(
                "{} token types for {n} tokens",
                spec.token_types.len()
            ));
        };
        for (name, id) in [("bos", spec.bos), ("eos", spec.eos)] {
            if let Some(id) = id.filter(|&id| id as usize >= n) {
                return err(format!(
                    "{name} token id {id} out of range (vocabulary {n})"
                ));
            }
        }
        let mut vocab = HashMap::with_capacity(n);
        for (i, t) in spec.tokens.iter().enumerate() {
            // On duplicates the first id wins (as in llama.cpp).
            vocab.entry(t.clone()).or_insert(i as TokenId);
        }
        let table = bytes_to_unicode();
        let mut inverse = HashMap::with_capacity(256);
        let mut byte_tokens = [NO_TOKEN; 256];
        for (b, &c) in table.iter().enumerate() {
            inverse.insert(c, b as u8);
            match vocab.get(c.encode_utf8(&mut [0; 4]) as &str) {
                Some(&id) => byte_tokens[b] = id,
                None if (0x20..=0x7e).contains(&b) => {
                    return err(format!(
                        "byte 0x{b:02x} (byte-level char {c:?}) has no token: not a byte-level BPE vocabulary"
                    ))
                }
                None => {}
            }
        }
        let mut merges = HashMap::with_capacity(spec.merges.len());
        for (rank, m) in spec.merges.iter().enumerate() {
            let Some((l, r)) = m.split_once(' ') else {
                return err(format!("merge {rank} ({m:?}) is not \"left right\""));
            };
            let lookup = |s: &str| {
                vocab.get(s).copied().ok_or_else(|| {
                    TokenizerError(format!("merge {rank} ({m:?}): {s:?} is not a token"))
                })
            };
            let (li, ri) = (lookup(l)?, lookup(r)?);
            let merged = lookup(&format!("{l}{r}"))?;
            merges.entry((li, ri)).or_insert((rank as u32, merged));
        }
        let token_bytes = spec
            .tokens
            .iter()
            .zip(&types)
            .map(|(t, ty)| {
                if ty.is_special() {
                    return t.as_bytes().into();
                }
                let mut out = Vec::with_capacity(t.len());
                for c in t.chars() {
                    match inverse.get(&c) {
                        Some(&b) => out.push(b),
                        // Not in the byte alphabet: render the char itself.
                        None => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                    }
                }
                out.into_boxed_slice()
            })
            .collect();
        let mut specials: Vec<(String, TokenId)> = spec
            .tokens
            .iter()
            .zip(&types)
            .enumerate()
            .filter(|(_, (t, ty))| ty.is_special() && !t.is_empty())
            .map(|(i, (t, _))| (t.clone(), i as TokenId))
            .collect();
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        let chat = match &spec.chat_template {
            None => Ok(ChatTemplate::chatml()),
            Some(src) => ChatTemplate::from_jinja(src),
        };
        Ok(Self {
            tokens: spec.tokens,
            types,
            vocab,
            merges,
            byte_tokens,
            token_bytes,
            specials,
            bos: spec.bos,
            eos: spec.eos,
            add_bos: spec.add_bos,
            add_space_prefix: spec.add_space_prefix,
            individual_digits: spec.individual_digits,
            chat,
        })
    }

    /// The tokenizer described by a GGUF file's metadata (reads the header only).
    pub fn from_gguf(path: impl AsRef<Path>) -> Result<Self, TokenizerError> {
        let path = path.as_ref();
        let mut f = std::fs::File::open(path)
            .map_err(|e| TokenizerError(format!("{}: {e}", path.display())))?;
        let content = candle_core::quantized::gguf_file::Content::read(&mut f).map_err(|e| {
            TokenizerError(format!("{}: not a readable GGUF file: {e}", path.display()))
        })?;
        Self::from_gguf_metadata(&content.metadata)
    }

    /// The tokenizer described by GGUF metadata: `tokenizer.ggml.model`
    /// (must be `gpt2`), `.pre`, `.tokens`, `.token_type`, `.merges`,
    /// `.bos_token_id`, `.eos_token_id`, `.add_bos_token`,
    /// `.add_space_prefix`, and `tokenizer.chat_template`.
    pub fn from_gguf_metadata(md: &HashMap<String, Value>) -> Result<Self, TokenizerError> {
        let get = |k: &str| md.get(k);
        let string = |k: &str| -> Result<Option<String>, TokenizerError> {
            match get(k) {
                None => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(v) => err(format!(
                    "metadata {k}: expected a string, found {:?}",
                    v.value_type()
                )),
            }
        };
        let strings = |k: &str| -> Result<Option<Vec<String>>, TokenizerError> {
            match get(k) {
                None => Ok(None),
                Some(Value::Array(a)) => a
                    .iter()
                    .enumerate()
                    .map(|(i, v)| match v {
                        Value::String(s) => Ok(s.clone()),
                        v => err(format!(
                            "metadata {k}[{i}]: expected a string, found {:?}",
                            v.value_type()
                        )),
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map(Some),
                Some(v) => err(format!(
                    "metadata {k}: expected an array, found {:?}",
                    v.value_type()
                )),
            }
        };
        let int = |k: &str| -> Result<Option<i64>, TokenizerError> {
            get(k)
                .map(|v| {
                    value_as_i64(v).ok_or_else(|| {
                        TokenizerError(format!(
                            "metadata {k}: expected an integer, found {:?}",
                            v.value_type()
                        ))
                    })
                })
                .transpose()
        };
        let flag = |k: &str| -> Result<Option<bool>, TokenizerError> {
            match get(k) {
                None => Ok(None),
                Some(Value::Bool(b)) => Ok(Some(*b)),
                Some(v) => err(format!(
                    "metadata {k}: expected a bool, found {:?}",
                    v.value_type()
                )),
            }
        };
        match string("tokenizer.ggml.model")?.as_deref() {
            Some("gpt2") => {}
            Some(m) => {
                return err(format!(
                    "tokenizer.ggml.model is {m:?}; only byte-level BPE (\"gpt2\") is supported"
                ))
            }
            None => return err("metadata tokenizer.ggml.model missing"),
        }
        let individual_digits = match string("tokenizer.ggml.pre")?.as_deref() {
            None | Some("default" | "gpt2" | "mpt" | "olmo" | "jais") => false,
            Some(
                "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone"
                | "minerva-7b",
            ) => true,
            Some(p) => {
                return err(format!(
                    "tokenizer.ggml.pre {p:?} is not supported (supported: gpt2-style and smollm/starcoder-style)"
                ))
            }
        };
        let tokens = strings("tokenizer.ggml.tokens")?
            .ok_or_else(|| TokenizerError("metadata tokenizer.ggml.tokens missing".into()))?;
        let merges = strings("tokenizer.ggml.merges")?
            .ok_or_else(|| TokenizerError("metadata tokenizer.ggml.merges missing".into()))?;
        let token_types = match get("tokenizer.ggml.token_type") {
            None => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| value_as_i64(v).map(TokenType::from_code))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    TokenizerError("metadata tokenizer.ggml.token_type: expected integers".into())
                })?,
            Some(v) => {
                return err(format!(
                    "metadata tokenizer.ggml.token_type: expected an array, found {:?}",
                    v.value_type()
                ))
            }
        };
        let id = |k: &str| -> Result<Option<TokenId>, TokenizerError> {
            int(k)?
                .map(|v| {
                    TokenId::try_from(v)
                        .map_err(|_| TokenizerError(format!("metadata {k}: {v} is not a token id")))
                })
                .transpose()
        };
        Self::new(BpeSpec {
            tokens,
            token_types,
            merges,
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos: id("tokenizer.ggml.eos_token_id")?,
            add_bos: flag("tokenizer.ggml.add_bos_token")?.unwrap_or(false),
            add_space_prefix: flag("tokenizer.ggml.add_space_prefix")?.unwrap_or(false),
            individual_digits,
            chat_template: string("tokenizer.chat_template")?,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }
    pub fn bos_id(&self) -> Option<TokenId> {
        self.bos
    }
    /// End of sequence (SmolLM2: `<|im_end|>` = 2, the end of a chat turn).
    pub fn eos_id(&self) -> Option<TokenId> {
        self.eos
    }
    /// The id of a token string (byte-level alphabet, e.g. `"ĠThe"`).
    pub fn token_to_id(&self, token: &str) -> Option<TokenId> {
        self.vocab.get(token).copied()
    }
    /// The token string of `id` (byte-level alphabet).
    pub fn id_to_token(&self, id: TokenId) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }
    pub fn token_type(&self, id: TokenId) -> Option<TokenType> {
        self.types.get(id as usize).copied()
    }
    /// Control tokens (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, ...):
    /// a generation should stop on any of them.
    pub fn is_control(&self, id: TokenId) -> bool {
        self.token_type(id) == Some(TokenType::Control)
    }
    /// The bytes `id` decodes to (empty for an unknown id).
    pub fn token_bytes(&self, id: TokenId) -> &[u8] {
        self.token_bytes.get(id as usize).map_or(&[], |b| b)
    }

    /// Encodes `text`, recognising special tokens written in it (e.g.
    /// `<|im_start|>` -> 1), with BOS first if the model asks for it.
    pub fn encode(&self, text: &str) -> Vec<TokenId> {
        let mut out = Vec::new();
        if self.add_bos {
            out.extend(self.bos);
        }
        let mut first = true;
        for (piece, special) in self.split_specials(text) {
            match special {
                Some(id) => out.push(id),
                None => {
                    self.encode_text(piece, first && self.add_space_prefix, &mut out);
                }
            }
            first = false;
        }
        out
    }

    /// Encodes `text` as plain text: special-token strings are ordinary
    /// characters, no BOS.
    pub fn encode_ordinary(&self, text: &str) -> Vec<TokenId> {
        let mut out = Vec::new();
        self.encode_text(text, self.add_space_prefix, &mut out);
        out
    }

    /// Splits `text` around special tokens (leftmost, then longest match).
    fn split_specials<'t>(&self, text: &'t str) -> Vec<(&'t str, Option<TokenId>)> {
        let mut out = Vec::new();
        let mut start = 0;
        let mut i = 0;
        let bytes = text.as_bytes();
        while i < bytes.len() {
            let hit = if text.is_char_boundary(i) {
                self.specials
                    .iter()
                    .find(|(s, _)| text[i..].starts_with(s.as_str()))
            } else {
                None
            };
            match hit {
                Some((s, id)) => {
                    if start < i {
                        out.push((&text[start..i], None));
                    }
                    out.push((&text[i..i + s.len()], Some(*id)));
                    i += s.len();
                    start = i;
                }
                None => i += 1,
            }
        }
        if start < text.len() {
            out.push((&text[start..], None));
        }
        out
    }

    fn encode_text(&self, text: &str, space_prefix: bool, out: &mut Vec<TokenId>) {
        let owned;
        let text = if space_prefix {
            owned = format!(" {text}");
            &owned
        } else {
            text
        };
        for piece in pre_tokenize(text, self.individual_digits) {
            self.bpe(piece.as_bytes(), out);
        }
    }

    /// Byte-level BPE of one pre-token: start from one token per byte and
    /// apply the lowest-ranked adjacent merge (leftmost among equals) until
    /// none applies.
    fn bpe(&self, bytes: &[u8], out: &mut Vec<TokenId>) {
        let ids: Vec<TokenId> = bytes
            .iter()
            .map(|&b| self.byte_tokens[b as usize])
            .filter(|&id| id != NO_TOKEN)
            .collect();
        if ids.len() <= 1 {
            out.extend(ids);
            return;
        }
        const NONE: usize = usize::MAX;
        struct Sym {
            id: TokenId,
            prev: usize,
            next: usize,
        }
        let n = ids.len();
        let mut syms: Vec<Sym> = ids
            .iter()
            .enumerate()
            .map(|(i, &id)| Sym {
                id,
                prev: if i == 0 { NONE } else { i - 1 },
                next: if i + 1 == n { NONE } else { i + 1 },
            })
            .collect();
        // Min-heap on (rank, position): entries are (left pos, left id, right id).
        let mut heap = BinaryHeap::new();
        let push = |heap: &mut BinaryHeap<std::cmp::Reverse<(u32, usize, TokenId, TokenId)>>,
                    syms: &[Sym],
                    i: usize| {
            let j = syms[i].next;
            if j == NONE {
                return;
            }
            if let Some(&(rank, _)) = self.merges.get(&(syms[i].id, syms[j].id)) {
                heap.push(std::cmp::Reverse((rank, i, syms[i].id, syms[j].id)));
            }
        };
        for i in 0..n - 1 {
            push(&mut heap, &syms, i);
        }
        let mut alive = vec![true; n];
        while let Some(std::cmp::Reverse((_, i, l, r))) = heap.pop() {
            if !alive[i] || syms[i].id != l {
                continue;
            }
            let j = syms[i].next;
            if j == NONE || syms[j].id != r {
                continue;
            }
            let merged = self.merges[&(l, r)].1;
            syms[i].id = merged;
            alive[j] = false;
            let k = syms[j].next;
            syms[i].next = k;
            if k != NONE {
                syms[k].prev = i;
            }
            let p = syms[i].prev;
            if p != NONE {
                push(&mut heap, &syms, p);
            }
            push(&mut heap, &syms, i);
        }
        let mut i = 0;
        while i != NONE {
            out.push(syms[i].id);
            i = syms[i].next;
        }
    }

    /// Decodes `ids` to text (invalid UTF-8 becomes U+FFFD). With
    /// `skip_special`, control tokens (`<|im_end|>`, ...) are left out.
    pub fn decode(&self, ids: &[TokenId], skip_special: bool) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            if skip_special && self.is_control(id) {
                continue;
            }
            bytes.extend_from_slice(self.token_bytes(id));
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// A streaming decoder for one generation (see [`StreamDecoder`]).
    pub fn stream_decoder(&self, skip_special: bool) -> StreamDecoder {
        StreamDecoder {
            pending: Vec::new(),
            skip_special,
        }
    }

    /// The chat template (from the GGUF's `tokenizer.chat_template`, or plain
    /// ChatML when the file has none); an error if the file's template is not
    /// one this crate can follow.
    pub fn chat_template(&self) -> Result<&ChatTemplate, TokenizerError> {
        self.chat.as_ref().map_err(Clone::clone)
    }

    /// Renders `messages` with the chat template (and the assistant header
    /// when `add_generation_prompt`).
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        Ok(self
            .chat_template()?
            .render(messages, add_generation_prompt))
    }

    /// The prompt ids of `messages`, ready for the assistant's reply.
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<TokenId>, TokenizerError> {
        Ok(self.encode(&self.apply_chat_template(messages, true)?))
    }
}

pub(crate) fn value_as_i64(v: &Value) -> Option<i64> {
    Some(match v {
        Value::U8(x) => *x as i64,
        Value::I8(x) => *x as i64,
        Value::U16(x) => *x as i64,
        Value::I16(x) => *x as i64,
        Value::U32(x) => *x as i64,
        Value::I32(x) => *x as i64,
        Value::U64(x) => i64::try_from(*x).ok()?,
        Value::I64(x) => *x,
        _ => return None,
    })
}

/// Turns token ids into text as they are generated: bytes of a character
/// split across tokens are held back until the character is complete, so
/// every returned chunk is valid UTF-8 and the chunks concatenate to
/// [`Tokenizer::decode`] of all ids. Owns no reference to the tokenizer.
#[derive(Clone, Debug, Default)]
pub struct StreamDecoder {
    pending: Vec<u8>,
    skip_special: bool,
}

impl StreamDecoder {
    /// Adds one token; returns the text it completes (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: TokenId) -> String {
        if self.skip_special && tokenizer.is_control(id) {
            return String::new();
        }
        self.push_bytes(tokenizer.token_bytes(id))
    }

    /// Adds raw bytes; returns the complete characters now available.
    /// Invalid sequences become U+FFFD; an incomplete tail is kept.
    pub fn push_bytes(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    out.push_str(std::str::from_utf8(valid).unwrap());
                    match e.error_len() {
                        // Incomplete at the end: wait for more bytes.
                        None => {
                            rest = after;
                            break;
                        }
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[n..];
                        }
                    }
                }
            }
        }
        let keep = rest.len();
        let len = self.pending.len();
        self.pending.drain(..len - keep);
        out
    }

    /// Ends the stream: any held-back incomplete character becomes U+FFFD.
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }

    /// Bytes held back (an incomplete character).
    pub fn pending_bytes(&self) -> usize {
        self.pending.len()
    }
}

// Unicode classes approximated with std's properties: `\p{N}` is
// `is_numeric` (Nd, Nl, No, as HF's `Digits` uses); `\p{L}` is `is_alphabetic`
// minus numbers (Alphabetic also holds some combining marks, which `\p{L}`
// does not: pieces may differ from HF's on scripts with vowel signs).
fn is_letter(c: char) -> bool {
    c.is_alphabetic() && !c.is_numeric()
}
fn is_number(c: char) -> bool {
    c.is_numeric()
}
fn is_other(c: char) -> bool {
    !c.is_whitespace() && !is_letter(c) && !is_number(c)
}

/// Pre-tokenization: GPT-2's pattern
/// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`,
/// after isolating every numeric character when `individual_digits`.
/// The pieces concatenate to `text`.
pub fn pre_tokenize(text: &str, individual_digits: bool) -> Vec<&str> {
    let mut out = Vec::new();
    if !individual_digits {
        gpt2_split(text, &mut out);
        return out;
    }
    let mut start = 0;
    for (i, c) in text.char_indices() {
        if is_number(c) {
            if start < i {
                gpt2_split(&text[start..i], &mut out);
            }
            let end = i + c.len_utf8();
            out.push(&text[i..end]);
            start = end;
        }
    }
    if start < text.len() {
        gpt2_split(&text[start..], &mut out);
    }
    out
}

fn gpt2_split<'t>(text: &'t str, out: &mut Vec<&'t str>) {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let n = chars.len();
    let at = |k: usize| if k < n { chars[k].0 } else { text.len() };
    let ch = |k: usize| chars.get(k).map(|&(_, c)| c);
    let run = |mut k: usize, f: fn(char) -> bool| {
        while k < n && f(chars[k].1) {
            k += 1;
        }
        k
    };
    let mut i = 0;
    while i < n {
        let c = chars[i].1;
        // Contractions: 's 't 're 've 'm 'll 'd (case-sensitive, as GPT-2).
        if c == '\'' {
            let len = match (ch(i + 1), ch(i + 2)) {
                (Some('r'), Some('e')) | (Some('v'), Some('e')) | (Some('l'), Some('l')) => 3,
                (Some('s' | 't' | 'm' | 'd'), _) => 2,
                _ => 0,
            };
            if len > 0 {
                out.push(&text[at(i)..at(i + len)]);
                i += len;
                continue;
            }
        }
        // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`.
        let (body, lead) = if c == ' ' { (i + 1, 1) } else { (i, 0) };
        if let Some(b) = ch(body) {
            let class: Option<fn(char) -> bool> = if is_letter(b) {
                Some(is_letter)
            } else if is_number(b) {
                Some(is_number)
            } else if is_other(b) {
                Some(is_other)
            } else {
                None
            };
            if let Some(f) = class {
                let end = run(body, f);
                out.push(&text[at(body - lead)..at(end)]);
                i = end;
                continue;
            }
        }
        // Whitespace: `\s+(?!\S)` leaves the last whitespace char before a
        // non-space to the next piece; `\s+` takes a lone one.
        let end = run(i, char::is_whitespace);
        let end = if end < n && end - i >= 2 {
            end - 1
        } else {
            end
        };
        out.push(&text[at(i)..at(end)]);
        i = end;
    }
}

/// One chat message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// The ChatML template: every message is
/// `<|im_start|>{role}\n{content}<|im_end|>\n`, and the generation prompt is
/// `<|im_start|>assistant\n`. Templates (like SmolLM2's) that insert a
/// default system message when the conversation does not start with one
/// carry it in [`ChatTemplate::default_system`].
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ChatTemplate {
    default_system: Option<String>,
}

const IM_START: &str = "<|im_start|>";
const IM_END: &str = "<|im_end|>";

impl ChatTemplate {
    /// Plain ChatML, no default system message.
    pub fn chatml() -> Self {
        Self::default()
    }

    /// ChatML with a default system message.
    pub fn chatml_with_default_system(system: impl Into<String>) -> Self {
        Self {
            default_system: Some(system.into()),
        }
    }

    /// Recognises a ChatML Jinja template (the simple user / system /
    /// assistant case) and its default system message, as in SmolLM2's
    /// `{% if loop.first and messages[0]['role'] != 'system' %}{{
    /// '<|im_start|>system\nYou are ...<|im_end|>\n' }}{% endif %}`.
    /// Anything that is not ChatML is an error.
    pub fn from_jinja(src: &str) -> Result<Self, TokenizerError> {
        if !(src.contains(IM_START) && src.contains(IM_END)) {
            let head: String = src.chars().take(80).collect();
            return err(format!(
                "unsupported chat template (not ChatML: no {IM_START}/{IM_END}): {head:?}..."
            ));
        }
        let conditional = ["!= 'system'", "!= \"system\""]
            .iter()
            .any(|p| src.contains(p));
        let mut default_system = None;
        if conditional {
            let marker = format!("{IM_START}system");
            let mut from = 0;
            while let Some(p) = src[from..].find(&marker) {
                let after = from + p + marker.len();
                let rest = &src[after..];
                let body = rest.strip_prefix("\\n").or_else(|| rest.strip_prefix('\n'));
                if let Some(body) = body {
                    if let Some(end) = body.find(IM_END) {
                        let text = &body[..end];
                        // A literal message, not an expression.
                        if !text.contains("{{") && !has_unescaped_quote(text) {
                            default_system = Some(unescape_jinja(text));
                            break;
                        }
                    }
                }
                from = after;
            }
        }
        Ok(Self { default_system })
    }

    /// The system message inserted when the first message is not `system`.
    pub fn default_system(&self) -> Option<&str> {
        self.default_system.as_deref()
    }

    /// The prompt text of `messages`, ending with the assistant header when
    /// `add_generation_prompt`.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> String {
        let mut s = String::new();
        let mut turn = |role: &str, content: &str| {
            s.push_str(IM_START);
            s.push_str(role);
            s.push('\n');
            s.push_str(content);
            s.push_str(IM_END);
            s.push('\n');
        };
        if let Some(sys) = &self.default_system {
            if messages.first().is_some_and(|m| m.role != "system") {
                turn("system", sys);
            }
        }
        for m in messages {
            turn(&m.role, &m.content);
        }
        if add_generation_prompt {
            s.push_str(IM_START);
            s.push_str("assistant\n");
        }
        s
    }
}

/// A `'` or `"` not escaped by a backslash (the literal would end there).
fn has_unescaped_quote(s: &str) -> bool {
    let mut escaped = false;
    for c in s.chars() {
        match c {
            '\\' if !escaped => escaped = true,
            '\'' | '"' if !escaped => return true,
            _ => escaped = false,
        }
    }
    false
}

fn unescape_jinja(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match it.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some(o) => out.push(o),
            None => out.push('\\'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small byte-level vocabulary: specials, the 256 byte chars, and the
    /// merges of `words` (each spelled by successive merges left to right).
    fn toy(words: &[&str], individual_digits: bool, template: Option<&str>) -> Tokenizer {
        let table = bytes_to_unicode();
        let mut tokens = vec![
            "<|endoftext|>".to_string(),
            "<|im_start|>".to_string(),
            "<|im_end|>".to_string(),
        ];
        let mut types = vec![TokenType::Control; 3];
        for c in table {
            tokens.push(c.to_string());
            types.push(TokenType::Normal);
        }
        let mut merges = Vec::new();
        for w in words {
            let chars: Vec<String> = w.bytes().map(|b| table[b as usize].to_string()).collect();
            let mut acc = chars[0].clone();
            for c in &chars[1..] {
                let m = format!("{acc} {c}");
                acc.push_str(c);
                if !merges.contains(&m) {
                    merges.push(m);
                    tokens.push(acc.clone());
                    types.push(TokenType::Normal);
                }
            }
        }
        Tokenizer::new(BpeSpec {
            tokens,
            token_types: types,
            merges,
            bos: Some(1),
            eos: Some(2),
            individual_digits,
            chat_template: template.map(str::to_string),
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn byte_table_is_gpt2s() {
        let t = bytes_to_unicode();
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[b'A' as usize], 'A');
        assert_eq!(t[0], 'Ā');
        let mut seen: Vec<char> = t.to_vec();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 256);
    }

    #[test]
    fn pre_tokenization_follows_gpt2s_pattern() {
        let p = |s| pre_tokenize(s, false);
        assert_eq!(p("The cat"), ["The", " cat"]);
        assert_eq!(p("Hello, world!"), ["Hello", ",", " world", "!"]);
        assert_eq!(p("it's we'll I'd"), ["it", "'s", " we", "'ll", " I", "'d"]);
        assert_eq!(p("a  b"), ["a", " ", " b"]);
        assert_eq!(p("a   "), ["a", "   "]);
        assert_eq!(p("x\ny"), ["x", "\n", "y"]);
        assert_eq!(p("x\n\n  y"), ["x", "\n\n ", " y"]);
        assert_eq!(p("abc 123 4"), ["abc", " 123", " 4"]);
        assert_eq!(p(" 's"), [" '", "s"]);
        assert_eq!(p("café déjà"), ["café", " déjà"]);
        assert_eq!(p("日本語 テスト"), ["日本語", " テスト"]);
        assert_eq!(p("a.,;b"), ["a", ".,;", "b"]);
        assert_eq!(p(""), Vec::<&str>::new());
        // SmolLM2 (`smollm`): every digit alone, a space before one stands alone.
        assert_eq!(
            pre_tokenize("abc 123x", true),
            ["abc", " ", "1", "2", "3", "x"]
        );
        for s in ["Hello,  world!\n\n  ok 12 'x' \t", "ü ß 3.14", "  lead"] {
            for d in [false, true] {
                assert_eq!(pre_tokenize(s, d).concat(), s);
            }
        }
    }

    #[test]
    fn bpe_merges_by_rank_and_round_trips() {
        let t = toy(&["hello", " world", "ll"], false, None);
        let ids = t.encode("hello world");
        assert_eq!(ids.len(), 2, "{ids:?}");
        assert_eq!(t.id_to_token(ids[0]), Some("hello"));
        assert_eq!(t.id_to_token(ids[1]), Some("Ġworld"));
        // "ll" alone merges; "hell" stops at the longest merge chain "hell".
        let ids = t.encode("ll hell");
        assert_eq!(
            ids.iter()
                .map(|&i| t.id_to_token(i).unwrap())
                .collect::<Vec<_>>(),
            ["ll", "Ġ", "hell"]
        );
        for s in ["hello world", "héllo wörld 😀 ✓\n\tend", "", " ", "a\u{0}b"] {
            assert_eq!(t.decode(&t.encode(s), false), s);
        }
    }

    #[test]
    fn bytes_without_a_token_are_dropped() {
        let table = bytes_to_unicode();
        let mut tokens: Vec<String> = table
            .iter()
            .enumerate()
            .filter(|&(b, _)| b != 0x04)
            .map(|(_, c)| c.to_string())
            .collect();
        tokens.push("ab".into());
        tokens.push("--".into());
        let t = Tokenizer::new(BpeSpec {
            tokens,
            merges: vec!["a b".into(), "- -".into()],
            ..Default::default()
        })
        .unwrap();
        let ab = t.token_to_id("ab").unwrap();
        let (a, b) = (t.token_to_id("a").unwrap(), t.token_to_id("b").unwrap());
        assert_eq!(t.encode("ab"), [ab]);
        // The missing byte is dropped before merging (as HF `tokenizers` does):
        // `-\x04-` is one pre-token (a symbol run), then `--`.
        assert_eq!(t.encode("-\u{4}-"), [t.token_to_id("--").unwrap()]);
        // Between letters it is a piece of its own.
        assert_eq!(t.encode("a\u{4}b"), [a, b]);
        assert_eq!(t.encode("a\u{4} b"), [a, t.token_to_id("Ġ").unwrap(), b]);
        assert_eq!(t.encode("\u{4}"), Vec::<TokenId>::new());
    }

    #[test]
    fn special_tokens_are_single_ids() {
        let t = toy(&["user"], false, None);
        let ids = t.encode("<|im_start|>user\nhi<|im_end|>");
        assert_eq!(ids[0], 1);
        assert_eq!(t.id_to_token(ids[1]), Some("user"));
        assert_eq!(*ids.last().unwrap(), 2);
        assert_eq!(t.decode(&ids, false), "<|im_start|>user\nhi<|im_end|>");
        assert_eq!(t.decode(&ids, true), "user\nhi");
        // As plain text they are characters.
        assert!(t.encode_ordinary("<|im_start|>").len() > 1);
        // A broken special is plain text.
        assert!(!t.encode("<|im_start").contains(&1));
    }

    #[test]
    fn stream_decoding_holds_partial_utf8() {
        let t = toy(&[], false, None);
        let s = "aé😀z€";
        let ids = t.encode(s); // one token per byte in the toy vocabulary
        assert_eq!(ids.len(), s.len());
        let mut d = t.stream_decoder(true);
        let chunks: Vec<String> = ids.iter().map(|&i| d.push(&t, i)).collect();
        assert_eq!(chunks.concat() + &d.finish(), s);
        // The first byte of 😀 yields nothing; its last byte yields the char.
        let at = s.find('😀').unwrap();
        assert_eq!(chunks[at], "");
        assert_eq!(chunks[at + 3], "😀");
        // Invalid bytes become U+FFFD; an unfinished tail appears at finish.
        let mut d = StreamDecoder::default();
        assert_eq!(d.push_bytes(&[b'a', 0xff, b'b', 0xe2, 0x82]), "a\u{FFFD}b");
        assert_eq!(d.pending_bytes(), 2);
        assert_eq!(d.finish(), "\u{FFFD}");
    }

    #[test]
    fn chat_template_chatml_and_default_system() {
        let msgs = [ChatMessage::user("Hi")];
        assert_eq!(
            ChatTemplate::chatml().render(&msgs, true),
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let smol = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are SmolLM<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
        let escaped = smol.replace('\n', "\\n");
        for src in [smol, escaped.as_str()] {
            let t = ChatTemplate::from_jinja(src).unwrap();
            assert_eq!(t.default_system(), Some("You are SmolLM"));
            assert_eq!(
                t.render(&msgs, true),
                "<|im_start|>system\nYou are SmolLM<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
            );
            let with_sys = [
                ChatMessage::system("S"),
                ChatMessage::user("U"),
                ChatMessage::assistant("A"),
            ];
            assert_eq!(
                t.render(&with_sys, false),
                "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
            );
        }
        // A generic ChatML template has no default system message.
        let generic = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}";
        assert_eq!(
            ChatTemplate::from_jinja(generic).unwrap().default_system(),
            None
        );
        let llama3 = "{{ '<|start_header_id|>' + message['role'] }}";
        assert!(ChatTemplate::from_jinja(llama3)
            .unwrap_err()
            .0
            .contains("not ChatML"));
        // The tokenizer follows its template.
        let t = toy(&[], false, Some(smol));
        let ids = t.encode_chat(&msgs).unwrap();
        assert_eq!(ids[0], 1);
        assert!(t
            .decode(&ids, false)
            .starts_with("<|im_start|>system\nYou are SmolLM"));
        let bad = toy(&[], false, Some(llama3));
        assert!(bad.encode_chat(&msgs).is_err());
    }

    #[test]
    fn construction_errors_name_the_problem() {
        let mut spec = BpeSpec {
            tokens: vec!["a".into(), "b".into()],
            ..Default::default()
        };
        assert!(Tokenizer::new(spec.clone())
            .unwrap_err()
            .0
            .contains("byte 0x20"));
        let table = bytes_to_unicode();
        spec.tokens = table.iter().map(|c| c.to_string()).collect();
        spec.merges = vec!["a b".into()];
        assert!(Tokenizer::new(spec.clone())
            .unwrap_err()
            .0
            .contains("\"ab\" is not a token"));
        spec.merges = vec!["ab".into()];
        assert!(Tokenizer::new(spec.clone())
            .unwrap_err()
            .0
            .contains("merge 0"));
        spec.merges.clear();
        spec.eos = Some(9999);
        assert!(Tokenizer::new(spec).unwrap_err().0.contains("eos"));
    }

    #[test]
    fn gguf_tokenizer_matches_smollm2_ids() {
        let Some(path) = crate::models::smollm2_path() else {
            eprintln!("skipped: SmolLM2 GGUF not found (run scripts/fetch-smollm2.sh)");
            return;
        };
        let t = Tokenizer::from_gguf(&path).unwrap();
        assert_eq!(t.vocab_size(), 49_152);
        assert_eq!(t.encode("The"), [504]);
        assert_eq!(t.encode(" The"), [378]);
        assert_eq!(t.encode("<|im_start|>"), [1]);
        assert_eq!(t.encode("<|im_end|>"), [2]);
        assert_eq!(t.eos_id(), Some(2));
        assert_eq!(t.bos_id(), Some(1));
        assert!(t.is_control(0) && t.is_control(1) && t.is_control(2));
        // No multi-digit tokens: digits are split one by one.
        assert_eq!(t.encode("2024").len(), 4);
        let s =
            "Hello, world! The capital of France is Paris.\n\n  Ünïcødé 😀 日本語 2024-01-01\tx";
        let ids = t.encode(s);
        assert_eq!(t.decode(&ids, false), s);
        let mut d = t.stream_decoder(true);
        let streamed: String = ids.iter().map(|&i| d.push(&t, i)).collect::<String>() + &d.finish();
        assert_eq!(streamed, s);
        let tpl = t.chat_template().unwrap();
        assert_eq!(
            tpl.default_system(),
            Some("You are a helpful AI assistant named SmolLM, trained by Hugging Face")
        );
        let prompt = t
            .apply_chat_template(&[ChatMessage::user("What is the capital of France?")], true)
            .unwrap();
        assert!(prompt.ends_with(
            "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        ));
        let ids = t.encode(&prompt);
        assert_eq!(ids[0], 1);
        assert_eq!(t.decode(&ids, false), prompt);
    }
}
