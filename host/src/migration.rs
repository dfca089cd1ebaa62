//! The QUIC transport of live migration: one bidirectional stream per
//! migration, from the source instance to the endpoint that hosts the
//! destination (`Migrate` frame, then the engine's migration messages in
//! `MigrationChunk` frames, both ways).
//!
//! Owns the streams and the chunking of large messages (a pre-copy stage of
//! a long context is hundreds of MB). The protocol itself (reserve, stages,
//! commit, aborts, timeouts) is the engine's pure state machine, run by the
//! llumlets ([`crate::llumlet`]); this module must never interpret
//! messages, only move them. A broken stream is reported to the source as a
//! lost link (it gives the migration up and keeps, or requeues, the
//! request); the destination frees its reservation by its idle timeout.

use std::net::SocketAddr;

use tokio::sync::mpsc;

use crate::llumlet::{Mailbox, MigrationLink};
use crate::protocol::{Frame, MAX_MIGRATION_CHUNK};
use crate::tls::{self, Trust};
use crate::wire::{write_frame, FrameReader, WireError};

/// Largest migration message reassembled from chunks.
pub const MAX_MIGRATION_MESSAGE: usize = 2 << 30;

/// Writes one migration message as chunks.
pub async fn write_message(send: &mut quinn::SendStream, bytes: &[u8]) -> Result<(), WireError> {
    let mut chunks = bytes.chunks(MAX_MIGRATION_CHUNK).peekable();
    if chunks.peek().is_none() {
        return write_frame(
            send,
            &Frame::MigrationChunk {
                last: true,
                bytes: Vec::new(),
            },
        )
        .await;
    }
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        write_frame(
            send,
            &Frame::MigrationChunk {
                last,
                bytes: chunk.to_vec(),
            },
        )
        .await?;
    }
    Ok(())
}

/// Reassembles migration messages from chunk frames.
pub struct MessageReader {
    reader: FrameReader,
    partial: Vec<u8>,
}

impl MessageReader {
    pub fn new(reader: FrameReader) -> Self {
        Self {
            reader,
            partial: Vec::new(),
        }
    }

    /// The next whole message; `None` at the end of the stream.
    pub async fn next(&mut self) -> Result<Option<Vec<u8>>, String> {
        loop {
            match self.reader.next().await.map_err(|e| e.to_string())? {
                None => return Ok(None),
                Some(Frame::MigrationChunk { last, bytes }) => {
                    if self.partial.len() + bytes.len() > MAX_MIGRATION_MESSAGE {
                        return Err(format!(
                            "migration message over {MAX_MIGRATION_MESSAGE} bytes"
                        ));
                    }
                    self.partial.extend_from_slice(&bytes);
                    if last {
                        return Ok(Some(std::mem::take(&mut self.partial)));
                    }
                }
                Some(other) => {
                    return Err(format!(
                        "unexpected {} frame on a migration stream",
                        other.name()
                    ))
                }
            }
        }
    }
}

/// Fault injection for tests of the abort paths: with
/// `LLUMEN_FAULT_MIGRATION_DROP_AFTER=N` in its environment, a process's
/// outgoing migrations close their QUIC connection instead of sending their
/// message number N (0-based). Never set in production.
fn fault_drop_after() -> Option<usize> {
    static DROP_AFTER: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *DROP_AFTER.get_or_init(|| {
        std::env::var("LLUMEN_FAULT_MIGRATION_DROP_AFTER")
            .ok()
            .and_then(|v| v.parse().ok())
    })
}

/// The source side's connection to the endpoints it migrates to.
pub struct MigrationTransport {
    endpoint: quinn::Endpoint,
    token: String,
    conns: tokio::sync::Mutex<std::collections::HashMap<SocketAddr, quinn::Connection>>,
}

impl MigrationTransport {
    /// A transport trusting `trust` and presenting `token`.
    pub fn new(local_hint: SocketAddr, trust: Trust, token: String) -> Result<Self, tls::TlsError> {
        Ok(Self {
            endpoint: tls::client_endpoint(local_hint, &trust)?,
            token,
            conns: tokio::sync::Mutex::new(Default::default()),
        })
    }

    async fn connection(&self, addr: SocketAddr) -> Result<quinn::Connection, String> {
        let mut conns = self.conns.lock().await;
        if let Some(c) = conns.get(&addr) {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        let conn = self
            .endpoint
            .connect(addr, tls::SERVER_NAME)
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        conns.insert(addr, conn.clone());
        Ok(conn)
    }

    /// Opens the link of migration `migration_id` from `source` to instance
    /// `destination` hosted at `addr`. Replies go to the source's mailbox;
    /// a broken stream is reported as a lost link.
    pub fn open(
        self: &std::sync::Arc<Self>,
        addr: SocketAddr,
        destination: u32,
        migration_id: u64,
        source: Mailbox,
    ) -> MigrationLink {
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let this = self.clone();
        tokio::spawn(async move {
            let result: Result<(), String> = async {
                let conn = this.connection(addr).await?;
                let (mut send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
                write_frame(
                    &mut send,
                    &Frame::Migrate {
                        token: this.token.clone(),
                        destination,
                    },
                )
                .await
                .map_err(|e| e.to_string())?;
                let mut replies = MessageReader::new(FrameReader::new(
                    recv,
                    crate::protocol::MAX_MIGRATION_CHUNK + 64,
                ));
                let mut sending = true;
                let mut sent = 0usize;
                let drop_after = fault_drop_after();
                loop {
                    tokio::select! {
                        out = rx.recv(), if sending => match out {
                            Some(bytes) => {
                                if drop_after.is_some_and(|n| sent >= n) {
                                    // Fault injection: the connection dies here.
                                    conn.close(1u32.into(), b"fault injection: migration connection dropped");
                                    return Err("fault injection: connection dropped".into());
                                }
                                write_message(&mut send, &bytes).await.map_err(|e| e.to_string())?;
                                sent += 1;
                            }
                            None => {
                                // The source is done with this migration.
                                sending = false;
                                let _ = send.finish();
                            }
                        },
                        reply = replies.next() => match reply? {
                            Some(bytes) => source.from_destination(migration_id, bytes),
                            None => {
                                if sending {
                                    return Err("the destination closed the stream".into());
                                }
                                return Ok(());
                            }
                        },
                    }
                }
            }
            .await;
            if let Err(e) = result {
                tracing::warn!(migration_id, destination, error = %e, "migration link lost");
                source.link_lost(migration_id);
            }
        });
        tx
    }
}

/// The destination side of one migration stream: messages go into the
/// destination's mailbox, replies come back on the stream.
pub async fn serve_incoming(
    destination: Mailbox,
    mut send: quinn::SendStream,
    reader: FrameReader,
) {
    let mut messages = MessageReader::new(reader);
    let (reply_tx, mut reply_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    // The migration this stream carries (from its first message, a small
    // `Reserve`), to abort it if the stream breaks.
    let mut migration_id = None;
    loop {
        tokio::select! {
            m = messages.next() => match m {
                Ok(Some(bytes)) => {
                    if migration_id.is_none() {
                        migration_id = llumen_engine::MigrationMessage::decode(&bytes)
                            .ok()
                            .map(|m| m.migration_id());
                    }
                    if !destination.from_source(bytes, reply_tx.clone()) {
                        return;
                    }
                }
                Ok(None) => {
                    // The source finished its side; deliver what is left
                    // (the llumlet drops its reply link when the migration
                    // ends here).
                    drop(reply_tx);
                    let drain = async {
                        while let Some(bytes) = reply_rx.recv().await {
                            if write_message(&mut send, &bytes).await.is_err() {
                                return;
                            }
                        }
                        let _ = send.finish();
                    };
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(30), drain).await;
                    return;
                }
                Err(e) => {
                    tracing::warn!(instance = destination.instance(), error = %e, "incoming migration stream failed");
                    if let Some(id) = migration_id {
                        destination.incoming_lost(id);
                    }
                    return;
                }
            },
            Some(bytes) = reply_rx.recv() => {
                if write_message(&mut send, &bytes).await.is_err() {
                    return;
                }
            }
        }
    }
}
