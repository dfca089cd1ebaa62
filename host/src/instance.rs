//! `llumen instance --join ADDR`: one instance in its own process. It loads
//! the model, runs a llumlet, joins the manager over QUIC (authenticated by
//! the admin token), reports its loads on the control stream and serves the
//! assignment streams the manager opens.
//!
//! Owns the instance side of the join protocol. Must never decide where a
//! request goes (the manager does) nor keep requests across a lost manager
//! connection (the manager re-dispatches them; this process exits).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use llumen_engine::Engine;
use tokio::sync::mpsc;

use crate::llumlet::Llumlet;
use crate::model::{InstanceShape, LoadedModel};
use crate::protocol::{Frame, JoinInfo, MAX_REQUEST_FRAME};
use crate::tls::{self, Trust};
use crate::wire::{write_frame, FrameReader};

/// Joins the manager at `addr` and serves until the connection ends.
/// `ready` is called with the instance id the manager gave.
pub async fn run_instance(
    addr: SocketAddr,
    trust: Trust,
    token: String,
    model: LoadedModel,
    shape: InstanceShape,
    ready: impl FnOnce(u32),
) -> Result<()> {
    let endpoint = tls::client_endpoint(addr, &trust)?;
    let conn = endpoint
        .connect(addr, tls::SERVER_NAME)
        .with_context(|| format!("connecting to {addr}"))?
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let (mut control, recv) = conn.open_bi().await?;
    let info = JoinInfo {
        token,
        model: model.name.clone(),
        block_size: shape.block_size as u32,
        total_blocks: shape.num_blocks as u32,
        max_model_len: model.max_model_len(&shape) as u32,
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
    let engine = Engine::new(
        model.scheduler_config(&shape),
        model.backend(&shape).map_err(anyhow::Error::msg)?,
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let llumlet = Arc::new(Llumlet::spawn(
        instance,
        engine,
        Box::new(move |load| {
            let _ = load_tx.send(load);
        }),
        crate::llumlet::Routes::default(),
        llumen_engine::MigrationConfig::default(),
    )?);
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
                let llumlet = llumlet.clone();
                tokio::spawn(crate::server::serve_assignment(llumlet, send, recv));
            }
            Err(e) => break e,
        }
    };
    writer.abort();
    llumlet.stop();
    bail!("lost the manager connection: {result}")
}
