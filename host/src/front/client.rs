//! The Rust client of the `llumen/1` QUIC API: generate (streamed), admin
//! calls, and raw frames for tests. Used by `llumen generate`, `llumen
//! status`, `llumen policy …` and the bench's live driver.
//!
//! Owns one connection to a manager. Must never reach into the server's
//! internals: everything goes through frames.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::front::admin::AdminCommand;
use crate::front::api::{FinishRecord, GenerateEvent, GenerateRequest, ServeError};
use crate::transport::protocol::{Frame, MAX_ADMIN_FRAME, MAX_REQUEST_FRAME};
use crate::transport::tls::{self, TlsError, Trust};
use crate::transport::wire::{write_frame, FrameReader, WireError};

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: quinn::ConnectError,
    },
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("stream: {0}")]
    Wire(#[from] WireError),
    /// The server answered with a typed error.
    #[error("server: {0}")]
    Server(ServeError),
    #[error("protocol: {0}")]
    Protocol(String),
}

/// Where the client finds the server's certificate and the admin token
/// when not given explicitly: the data directory `llumen serve` uses.
pub fn default_data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("LLUMEN_DATA_DIR") {
        return d.into();
    }
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("llumen")
}

/// Trust the certificate in `data_dir` unless a cert file or a fingerprint
/// is given.
pub fn trust_from(data_dir: &Path, cert: Option<PathBuf>, fingerprint: Option<String>) -> Trust {
    match (fingerprint, cert) {
        (Some(f), _) => Trust::Fingerprint(f),
        (None, Some(c)) => Trust::CertFile(c),
        (None, None) => Trust::CertFile(data_dir.join(tls::CERT_FILE)),
    }
}

/// One connection to a manager.
pub struct Client {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
}

/// A finished generation, collected.
#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    pub text: String,
    pub tokens: Vec<u32>,
    pub finish: FinishRecord,
}

impl Client {
    pub async fn connect(addr: SocketAddr, trust: &Trust) -> Result<Self, ClientError> {
        let endpoint = tls::client_endpoint(addr, trust)?;
        let conn = endpoint
            .connect(addr, tls::SERVER_NAME)
            .map_err(|source| ClientError::Connect { addr, source })?
            .await?;
        Ok(Self { endpoint, conn })
    }

    /// Sends a request; tokens stream back through the returned stream.
    pub async fn generate(
        &self,
        request: &GenerateRequest,
    ) -> Result<GenerationStream, ClientError> {
        let (mut send, recv) = self.conn.open_bi().await?;
        write_frame(&mut send, &Frame::Generate(request.clone())).await?;
        Ok(GenerationStream {
            send: Some(send),
            reader: FrameReader::new(recv, MAX_REQUEST_FRAME),
            done: false,
        })
    }

    /// Runs an admin command; the JSON reply.
    pub async fn admin(
        &self,
        token: &str,
        command: &AdminCommand,
        blob: &[u8],
    ) -> Result<serde_json::Value, ClientError> {
        let frame = Frame::Admin {
            token: token.to_string(),
            command_json: serde_json::to_string(command).expect("commands serialize"),
            blob: blob.to_vec(),
        };
        let (mut send, recv) = self.conn.open_bi().await?;
        write_frame(&mut send, &frame).await?;
        let _ = send.finish();
        let mut reader = FrameReader::new(recv, MAX_ADMIN_FRAME);
        match reader.next().await? {
            Some(Frame::AdminReply { json }) => serde_json::from_str(&json)
                .map_err(|e| ClientError::Protocol(format!("admin reply is not JSON: {e}"))),
            Some(Frame::Error(e)) => Err(ClientError::Server(e)),
            Some(other) => Err(ClientError::Protocol(format!(
                "unexpected {} frame in an admin reply",
                other.name()
            ))),
            None => Err(ClientError::Protocol(
                "the server sent no admin reply".into(),
            )),
        }
    }

    /// Writes `bytes` as they are on a new stream, finishes it, and returns
    /// every frame the server answers (for testing bad input).
    pub async fn raw(&self, bytes: &[u8]) -> Result<Vec<Frame>, ClientError> {
        let (mut send, recv) = self.conn.open_bi().await?;
        send.write_all(bytes).await.map_err(WireError::from)?;
        let _ = send.finish();
        let mut reader = FrameReader::new(recv, MAX_ADMIN_FRAME);
        let mut frames = Vec::new();
        while let Some(f) = reader.next().await? {
            frames.push(f);
        }
        Ok(frames)
    }

    /// The underlying connection (for tests that misbehave on purpose).
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }

    /// Closes the connection and waits for the close to be sent.
    pub async fn close(self) {
        self.conn.close(0u32.into(), b"bye");
        self.endpoint.wait_idle().await;
    }
}

/// The events of one request. Dropping it before the end cancels the
/// request (the stream is reset).
pub struct GenerationStream {
    send: Option<quinn::SendStream>,
    reader: FrameReader,
    done: bool,
}

impl GenerationStream {
    /// The next event; `None` after the last one.
    pub async fn next(&mut self) -> Result<Option<GenerateEvent>, ClientError> {
        if self.done {
            return Ok(None);
        }
        let event = match self.reader.next().await? {
            Some(Frame::Tokens(c)) => GenerateEvent::Tokens(c),
            Some(Frame::Finished(f)) => GenerateEvent::Finished(f),
            Some(Frame::Error(e)) => GenerateEvent::Error(e),
            Some(other) => {
                return Err(ClientError::Protocol(format!(
                    "unexpected {} frame on a request stream",
                    other.name()
                )))
            }
            None => {
                return Err(ClientError::Protocol(
                    "the server ended the stream before the request finished".into(),
                ))
            }
        };
        if matches!(event, GenerateEvent::Finished(_) | GenerateEvent::Error(_)) {
            self.done = true;
            if let Some(mut send) = self.send.take() {
                let _ = send.finish();
            }
        }
        Ok(Some(event))
    }

    /// Reads to the end: the whole text, tokens and the final record; the
    /// server's error if it failed. Checks the tokens arrive in order,
    /// without gaps or repeats.
    pub async fn collect(mut self) -> Result<Completion, ClientError> {
        let mut text = String::new();
        let mut tokens = Vec::new();
        while let Some(event) = self.next().await? {
            match event {
                GenerateEvent::Tokens(c) => {
                    if c.index as usize != tokens.len() && !c.ids.is_empty() {
                        return Err(ClientError::Protocol(format!(
                            "token chunk at index {} after {} tokens",
                            c.index,
                            tokens.len()
                        )));
                    }
                    tokens.extend(c.ids);
                    text.push_str(&c.text);
                }
                GenerateEvent::Finished(finish) => {
                    return Ok(Completion {
                        text,
                        tokens,
                        finish,
                    })
                }
                GenerateEvent::Error(e) => return Err(ClientError::Server(e)),
            }
        }
        Err(ClientError::Protocol("no final record".into()))
    }

    /// Cancels the request now.
    pub fn cancel(mut self) {
        self.reset();
    }

    fn reset(&mut self) {
        if !self.done {
            if let Some(mut send) = self.send.take() {
                let _ = send.reset(0u32.into());
            }
            self.reader.stop(0);
            self.done = true;
        }
    }
}

impl Drop for GenerationStream {
    fn drop(&mut self) {
        self.reset();
    }
}
