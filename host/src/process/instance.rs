//! `llumen instance --join ADDR`: one instance in its own process. It loads
//! the model, runs a llumlet, joins the manager over QUIC (authenticated by
//! the admin token), reports its loads on the control stream and serves the
//! streams the manager opens (assignments, migrate-out orders). It listens
//! on an endpoint of its own for incoming live migrations (with the
//! manager's certificate from the shared data dir) and continues a migrated-
//! in request's stream to the manager on a `Resume` stream.
//!
//! Owns the instance side of the join protocol. Must never decide where a
//! request goes (the manager does) nor keep requests across a lost manager
//! connection (the manager re-dispatches them; this process exits).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::sync::mpsc;

use crate::process::model::{InstanceShape, LoadedModel};
use crate::transport::protocol::{Frame, JoinInfo, MAX_REQUEST_FRAME};
use crate::transport::tls::{self, Trust};
use crate::transport::wire::{write_frame, FrameReader};

/// Where and as whom a joining instance connects.
pub struct JoinOptions {
    /// The manager's QUIC address.
    pub addr: SocketAddr,
    pub trust: Trust,
    /// The admin token.
    pub token: String,
    /// The identity its migration endpoint presents (the manager's).
    pub identity: tls::ServerIdentity,
    /// Where its migration endpoint listens.
    pub migration_listen: SocketAddr,
}

/// Joins the manager and serves until the connection ends. `ready` is
/// called with the instance id the manager gave.
pub async fn run_instance(
    options: JoinOptions,
    model: LoadedModel,
    shape: InstanceShape,
    ready: impl FnOnce(u32),
) -> Result<()> {
    let JoinOptions {
        addr,
        trust,
        token,
        identity,
        migration_listen,
    } = options;
    let migration_endpoint = tls::server_endpoint(migration_listen, &identity)?;
    let migration_addr = migration_endpoint.local_addr()?;
    let endpoint = tls::client_endpoint(addr, &trust)?;
    let conn = endpoint
        .connect(addr, tls::SERVER_NAME)
        .with_context(|| format!("connecting to {addr}"))?
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let (mut control, recv) = conn.open_bi().await?;
    let info = JoinInfo {
        token: token.clone(),
        model: model.name.clone(),
        block_size: shape.block_size as u32,
        total_blocks: shape.num_blocks as u32,
        max_model_len: model.max_model_len(&shape) as u32,
        migration_addr: migration_addr.to_string(),
    };
    write_frame(&mut control, &Frame::Join(info)).await?;
    let mut reader = FrameReader::new(recv, MAX_REQUEST_FRAME);
    let instance = match reader.next().await? {
        Some(Frame::Welcome { instance }) => instance,
        Some(Frame::Error(e)) => bail!("the manager refused the join: {e}"),
        other => bail!("unexpected answer to join: {other:?}"),
    };
    ready(instance);

    // Loads go out on the control stream; only the newest one matters, so
    // a backlog is collapsed to its last snapshot.
    let (load_tx, mut load_rx) = mpsc::unbounded_channel();
    let llumlet = Arc::new(
        model
            .spawn_llumlet(
                instance,
                &shape,
                Box::new(move |load| {
                    let _ = load_tx.send(load);
                }),
                Arc::new(ResumeRoutes {
                    conn: conn.clone(),
                    token: token.clone(),
                    runtime: tokio::runtime::Handle::current(),
                }),
                llumen_engine::MigrationConfig::default(),
            )
            .map_err(anyhow::Error::msg)?,
    );
    let transport = Arc::new(crate::transport::migration::MigrationTransport::new(
        addr,
        trust.clone(),
        token.clone(),
    )?);
    let incoming = tokio::spawn(accept_migrations(
        migration_endpoint,
        llumlet.mailbox(),
        instance,
        token.clone(),
    ));
    let writer = tokio::spawn(async move {
        while let Some(mut load) = load_rx.recv().await {
            while let Ok(newer) = load_rx.try_recv() {
                load = newer;
            }
            if write_frame(&mut control, &Frame::Load(load)).await.is_err() {
                return;
            }
            // At most ~200 snapshots a second on the wire.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });

    let result = loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                tokio::spawn(crate::front::server::serve_manager_stream(
                    llumlet.clone(),
                    transport.clone(),
                    send,
                    recv,
                ));
            }
            Err(e) => break e,
        }
    };
    writer.abort();
    incoming.abort();
    llumlet.stop();
    bail!("lost the manager connection: {result}")
}

/// Serves migrations into this instance from other instances.
async fn accept_migrations(
    endpoint: quinn::Endpoint,
    mailbox: crate::control::llumlet::Mailbox,
    instance: u32,
    token: String,
) {
    while let Some(incoming) = endpoint.accept().await {
        let mailbox = mailbox.clone();
        let token = token.clone();
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            while let Ok((mut send, recv)) = conn.accept_bi().await {
                let mut reader =
                    FrameReader::new(recv, crate::transport::protocol::MAX_MIGRATION_CHUNK + 64);
                match reader.next().await {
                    Ok(Some(Frame::Migrate {
                        token: t,
                        destination,
                    })) if tls::token_matches(&token, &t) && destination == instance => {
                        tokio::spawn(crate::transport::migration::serve_incoming(
                            mailbox.clone(),
                            send,
                            reader,
                        ));
                    }
                    _ => {
                        let _ = write_frame(
                            &mut send,
                            &Frame::Error(crate::front::api::ServeError::new(
                                crate::front::api::ErrorCode::Unauthorized,
                                "expected a migrate frame with the admin token for this instance",
                            )),
                        )
                        .await;
                        let _ = send.finish();
                    }
                }
            }
        });
    }
}

/// A joined instance's route book: a request migrated in continues its
/// stream to the manager on a `Resume` stream; one migrated out tells the
/// manager on its assignment stream (`Moved`), which parks the channel.
struct ResumeRoutes {
    conn: quinn::Connection,
    token: String,
    /// `claim` is called on the llumlet's thread, outside the runtime.
    runtime: tokio::runtime::Handle,
}

impl crate::control::llumlet::RouteBook for ResumeRoutes {
    fn claim(&self, request: u64, instance: u32) -> Option<crate::control::llumlet::EventSender> {
        use crate::control::llumlet::InstanceEvent;
        if self.conn.close_reason().is_some() {
            return None;
        }
        let (tx, mut rx) = mpsc::unbounded_channel::<InstanceEvent>();
        let conn = self.conn.clone();
        let token = self.token.clone();
        self.runtime.spawn(async move {
            let result: Result<(), String> = async {
                let (mut send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
                write_frame(&mut send, &Frame::Resume { token, request, instance })
                    .await
                    .map_err(|e| e.to_string())?;
                let mut reader = FrameReader::new(recv, MAX_REQUEST_FRAME);
                loop {
                    tokio::select! {
                        event = rx.recv() => {
                            let Some(event) = event else { return Ok(()) };
                            let Some((frame, last)) = crate::front::server::event_frame(event, request, instance) else {
                                continue;
                            };
                            write_frame(&mut send, &frame).await.map_err(|e| e.to_string())?;
                            if last {
                                let _ = send.finish();
                                return Ok(());
                            }
                        }
                        // The manager refused (nobody waits) or cancelled.
                        _ = reader.next() => return Err("the manager ended the resumed stream".into()),
                    }
                }
            }
            .await;
            if let Err(e) = result {
                tracing::debug!(request, error = %e, "resumed stream ended");
            }
        });
        Some(tx)
    }

    fn park(&self, _request: u64, events: crate::control::llumlet::EventSender) {
        let _ = events.send(crate::control::llumlet::InstanceEvent::MovedAway);
    }
}
