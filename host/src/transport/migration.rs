//! The QUIC transport of live migration: one bidirectional stream per
//! migration, from the source instance to the endpoint that hosts the
//! destination (`Migrate` frame, then the engine's migration messages in
//! `MigrationChunk` frames, both ways).
//!
//! Owns the streams and the chunking of large messages (a pre-copy stage of
//! a long context is hundreds of MB). The protocol itself (reserve, stages,
//! commit, aborts, timeouts) is the engine's pure state machine, run by the
//! llumlets ([`crate::control::llumlet`]); this module must never interpret
//! messages, only move them. A broken stream is reported to the source as a
//! lost link (it gives the migration up and keeps, or requeues, the
//! request); the destination frees its reservation by its idle timeout.

use std::net::SocketAddr;

use tokio::sync::mpsc;

use crate::control::llumlet::{Mailbox, MigrationLink};
use bytes::Bytes;

use crate::transport::protocol::{self, Frame, MAX_MIGRATION_CHUNK};
use crate::transport::tls::{self, Trust};
use crate::transport::wire::{write_frame, FrameReader, WireError};

/// Largest migration message reassembled from chunks.
pub const MAX_MIGRATION_MESSAGE: usize = 2 << 30;

/// Writes one migration message as chunks: each a `MigrationChunk` frame
/// whose header is written in front of a zero-copy slice of `message`.
pub async fn write_message(
    send: &mut quinn::SendStream,
    message: impl Into<Bytes>,
) -> Result<(), WireError> {
    let message: Bytes = message.into();
    let mut offset = 0;
    loop {
        let end = (offset + MAX_MIGRATION_CHUNK).min(message.len());
        let last = end == message.len();
        let header = protocol::migration_chunk_header(last, end - offset);
        send.write_all_chunks(&mut [Bytes::copy_from_slice(&header), message.slice(offset..end)])
            .await?;
        if last {
            return Ok(());
        }
        offset = end;
    }
}

/// Reassembles migration messages from a stream of `MigrationChunk`
/// frames, reading each payload straight into the message (one copy out
/// of quinn's buffers). Any other frame ends the stream with an error.
///
/// Cancel-safe: `next` keeps all progress in `self` between awaits, so it
/// may lose a `select!` race and be called again.
pub struct MessageReader {
    recv: quinn::RecvStream,
    /// Header bytes received so far (starts with what a `FrameReader`
    /// had buffered past the frames it returned).
    pending: Vec<u8>,
    /// The chunk being read: is it the message's last, bytes still due.
    body: Option<(bool, usize)>,
    partial: Vec<u8>,
}

impl MessageReader {
    /// Carries on from `reader` (its buffered bytes come first).
    pub fn new(reader: FrameReader) -> Self {
        let (recv, pending) = reader.into_parts();
        Self {
            recv,
            pending,
            body: None,
            partial: Vec::new(),
        }
    }

    /// The next whole message; `None` when the stream ends between two
    /// messages.
    pub async fn next(&mut self) -> Result<Option<Vec<u8>>, String> {
        loop {
            match self.body {
                None if self.pending.len() >= protocol::MIGRATION_CHUNK_HEADER => {
                    let header: [u8; protocol::MIGRATION_CHUNK_HEADER] = self.pending
                        [..protocol::MIGRATION_CHUNK_HEADER]
                        .try_into()
                        .expect("length checked");
                    let (last, len) = protocol::parse_migration_chunk_header(&header)
                        .map_err(|e| format!("migration stream: {e}"))?;
                    if self.partial.len() + len > MAX_MIGRATION_MESSAGE {
                        return Err(format!(
                            "migration message over {MAX_MIGRATION_MESSAGE} bytes"
                        ));
                    }
                    self.pending.drain(..protocol::MIGRATION_CHUNK_HEADER);
                    // Payload bytes that arrived with the header.
                    let take = len.min(self.pending.len());
                    self.partial.extend(self.pending.drain(..take));
                    self.body = Some((last, len - take));
                }
                Some((last, 0)) => {
                    self.body = None;
                    if last {
                        return Ok(Some(std::mem::take(&mut self.partial)));
                    }
                }
                Some((last, due)) => {
                    // `pending` is empty here: the body takes every byte
                    // before the next header.
                    match self
                        .recv
                        .read_chunk(due, true)
                        .await
                        .map_err(|e| format!("reading: {e}"))?
                    {
                        Some(chunk) => {
                            self.partial.extend_from_slice(&chunk.bytes);
                            self.body = Some((last, due - chunk.bytes.len()));
                        }
                        None => return Err("stream ended inside a migration chunk".into()),
                    }
                }
                None => {
                    let want = protocol::MIGRATION_CHUNK_HEADER - self.pending.len();
                    match self
                        .recv
                        .read_chunk(want, true)
                        .await
                        .map_err(|e| format!("reading: {e}"))?
                    {
                        Some(chunk) => self.pending.extend_from_slice(&chunk.bytes),
                        None if self.pending.is_empty() && self.partial.is_empty() => {
                            return Ok(None)
                        }
                        None => return Err("stream ended inside a migration message".into()),
                    }
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
    trust: Trust,
    token: String,
    conns: tokio::sync::Mutex<std::collections::HashMap<SocketAddr, quinn::Connection>>,
}

impl MigrationTransport {
    /// A transport trusting `trust` and presenting `token`.
    pub fn new(local_hint: SocketAddr, trust: Trust, token: String) -> Result<Self, tls::TlsError> {
        Ok(Self {
            endpoint: tls::client_endpoint(local_hint, &trust)?,
            trust,
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
        let config = tls::migration_client_config(&self.trust, addr).map_err(|e| e.to_string())?;
        let conn = self
            .endpoint
            .connect_with(config, addr, tls::SERVER_NAME)
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
                    crate::transport::protocol::MAX_MIGRATION_CHUNK + 64,
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
                                write_message(&mut send, bytes).await.map_err(|e| e.to_string())?;
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
                            if write_message(&mut send, bytes).await.is_err() {
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
                if write_message(&mut send, bytes).await.is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::protocol::encode;

    /// A loopback QUIC connection with migration's client config: (client
    /// side, server side, endpoints kept alive).
    async fn pair() -> (quinn::Connection, quinn::Connection, Vec<quinn::Endpoint>) {
        let dir = tempfile::tempdir().unwrap();
        let (identity, _) = tls::load_or_create_identity(dir.path()).unwrap();
        let server = tls::server_endpoint("127.0.0.1:0".parse().unwrap(), &identity).unwrap();
        let addr = server.local_addr().unwrap();
        let trust = Trust::Fingerprint(identity.fingerprint.clone());
        let client = tls::client_endpoint(addr, &trust).unwrap();
        let accept = {
            let server = server.clone();
            tokio::spawn(async move { server.accept().await.unwrap().await.unwrap() })
        };
        let config = tls::migration_client_config(&trust, addr).unwrap();
        let c = client
            .connect_with(config, addr, tls::SERVER_NAME)
            .unwrap()
            .await
            .unwrap();
        let s = accept.await.unwrap();
        (c, s, vec![server, client])
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[tokio::test]
    async fn messages_of_every_size_cross_whole_after_a_first_frame() {
        let (client, server, _endpoints) = pair().await;
        let sizes = [
            0,
            1,
            4096,
            MAX_MIGRATION_CHUNK,
            MAX_MIGRATION_CHUNK + 17,
            3 * MAX_MIGRATION_CHUNK - 1,
        ];
        let sender = tokio::spawn(async move {
            let (mut send, _recv) = client.open_bi().await.unwrap();
            // A first frame, then the messages right behind it (the
            // reader's buffer holds some of the first chunk's bytes).
            let first = Frame::Migrate {
                token: "t".into(),
                destination: 7,
            };
            let mut head = encode(&first);
            head.extend_from_slice(&protocol::migration_chunk_header(true, 3));
            head.extend_from_slice(b"abc");
            send.write_all(&head).await.unwrap();
            for (i, &n) in sizes.iter().enumerate() {
                write_message(&mut send, pattern(n, i as u8)).await.unwrap();
            }
            send.finish().unwrap();
            send.stopped().await.ok();
            client
        });
        let (_send, recv) = server.accept_bi().await.unwrap();
        let mut frames = FrameReader::new(recv, 1 << 16);
        assert_eq!(
            frames.next().await.unwrap(),
            Some(Frame::Migrate {
                token: "t".into(),
                destination: 7
            })
        );
        let mut messages = MessageReader::new(frames);
        assert_eq!(messages.next().await.unwrap().as_deref(), Some(&b"abc"[..]));
        for (i, &n) in sizes.iter().enumerate() {
            let m = messages.next().await.unwrap().expect("a message");
            assert_eq!(m.len(), n);
            assert!(m == pattern(n, i as u8), "message {i} of {n} bytes differs");
        }
        assert_eq!(messages.next().await.unwrap(), None);
        // Bulk transfer made MTU discovery climb past Ethernet's 1,500.
        let client = sender.await.unwrap();
        assert!(
            client.stats().path.current_mtu > 1500,
            "{:?}",
            client.stats().path
        );
    }

    #[tokio::test]
    async fn a_foreign_frame_or_a_cut_chunk_is_an_error() {
        let (client, server, _endpoints) = pair().await;
        let sender = tokio::spawn(async move {
            // A frame of another kind where a chunk is due.
            let (mut send, _r) = client.open_bi().await.unwrap();
            let foreign = Frame::Migrate {
                token: "x".repeat(20),
                destination: 1,
            };
            send.write_all(&encode(&foreign)).await.unwrap();
            send.finish().unwrap();
            // A chunk announcing more bytes than the stream carries.
            let (mut send2, _r2) = client.open_bi().await.unwrap();
            send2
                .write_all(&protocol::migration_chunk_header(true, 100))
                .await
                .unwrap();
            send2.write_all(&[0; 10]).await.unwrap();
            send2.finish().unwrap();
            send.stopped().await.ok();
            send2.stopped().await.ok();
            client
        });
        for want in [
            "kind 0x30 where a migration chunk was expected",
            "ended inside a migration chunk",
        ] {
            let (_send, recv) = server.accept_bi().await.unwrap();
            let mut messages = MessageReader::new(FrameReader::new(recv, 1 << 16));
            let err = messages.next().await.unwrap_err();
            assert!(err.contains(want), "{err}");
        }
        drop(sender.await.unwrap());
    }
}
