//! The manager's QUIC endpoint (`llumen/1`): client request streams, admin
//! streams and joining instances, plus [`RemoteLink`], the manager's side of
//! a joined instance.
//!
//! Owns turning streams into manager calls and back: the first frame of a
//! stream says what it is. A stream with a bad frame gets a typed `Error`
//! frame and is closed; the connection and every other stream carry on.
//! Must never decide anything (the manager and the policies do) nor parse
//! bytes itself (the codec in [`crate::transport::protocol`] does).

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::control::llumlet::{EventSender, InstanceEvent};
use crate::control::manager::{relabel, InstanceLink, Manager};
use crate::front::admin::Admin;
use crate::front::api::{ErrorCode, GenerateEvent, ServeError, Serving};
use crate::transport::protocol::{self, Assignment, Frame, FrameDecoder, MAX_REQUEST_FRAME};
use crate::transport::tls;
use crate::transport::wire::{write_frame, FrameReader, WireError};

/// What the endpoint serves.
pub struct ServerContext {
    pub manager: Manager,
    pub admin: Arc<Admin>,
    pub token: String,
    /// How long a new stream may take to deliver its whole first frame
    /// (a slow-loris stream is answered `Timeout` and closed).
    pub first_frame_timeout: std::time::Duration,
}

/// Accepts connections until the endpoint closes.
pub async fn run_quic(endpoint: quinn::Endpoint, ctx: Arc<ServerContext>) {
    while let Some(incoming) = endpoint.accept().await {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            match incoming.await {
                Ok(conn) => serve_connection(conn, ctx).await,
                Err(e) => tracing::debug!(error = %e, "handshake failed"),
            }
        });
    }
}

async fn serve_connection(conn: quinn::Connection, ctx: Arc<ServerContext>) {
    loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                let ctx = ctx.clone();
                let conn = conn.clone();
                tokio::spawn(async move { serve_stream(conn, send, recv, ctx).await });
            }
            Err(e) => {
                tracing::debug!(remote = %conn.remote_address(), error = %e, "connection ended");
                return;
            }
        }
    }
}

async fn reply_error(send: &mut quinn::SendStream, error: ServeError) {
    let _ = write_frame(send, &Frame::Error(error)).await;
    let _ = send.finish();
}

async fn serve_stream(
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    ctx: Arc<ServerContext>,
) {
    let decoder =
        FrameDecoder::new(protocol::MAX_ADMIN_FRAME).with_kind_limit(protocol::limit_by_kind);
    let mut reader = FrameReader::with_decoder(recv, decoder);
    let first = match tokio::time::timeout(ctx.first_frame_timeout, reader.next()).await {
        Err(_) => {
            reader.stop(1);
            return reply_error(
                &mut send,
                ServeError::new(
                    ErrorCode::Timeout,
                    format!(
                        "no complete first frame within {} ms",
                        ctx.first_frame_timeout.as_millis()
                    ),
                ),
            )
            .await;
        }
        Ok(first) => first,
    };
    let first = match first {
        Ok(Some(f)) => f,
        Ok(None) => return,
        Err(WireError::Decode(e)) => {
            reader.stop(1);
            return reply_error(&mut send, e.to_serve_error()).await;
        }
        Err(e) => {
            tracing::debug!(error = %e, "stream failed before its first frame");
            return;
        }
    };
    match first {
        Frame::Generate(request) => serve_generate(&ctx, send, reader, request).await,
        Frame::Admin {
            token,
            command_json,
            blob,
        } => {
            let result = match crate::front::admin::authorize(&ctx.token, &token, &command_json) {
                Err(e) => Err(e),
                Ok(command) => {
                    let admin = ctx.admin.clone();
                    tokio::task::spawn_blocking(move || admin.handle(command, &blob))
                        .await
                        .unwrap_or_else(|e| {
                            Err(ServeError::new(ErrorCode::Internal, e.to_string()))
                        })
                }
            };
            match result {
                Ok(json) => {
                    let _ = write_frame(
                        &mut send,
                        &Frame::AdminReply {
                            json: json.to_string(),
                        },
                    )
                    .await;
                    let _ = send.finish();
                }
                Err(e) => reply_error(&mut send, e).await,
            }
        }
        Frame::Join(info) => serve_join(&ctx, conn, send, reader, info).await,
        Frame::Resume {
            token,
            request,
            instance,
        } => {
            if !tls::token_matches(&ctx.token, &token) {
                return reply_error(
                    &mut send,
                    ServeError::new(ErrorCode::Unauthorized, "wrong or missing admin token"),
                )
                .await;
            }
            match ctx.manager.routes().claim(request, instance) {
                Some(events) => {
                    forward_resumed(events, reader, ctx.manager.routes(), request).await
                }
                None => {
                    reply_error(
                        &mut send,
                        ServeError::new(
                            ErrorCode::NotFound,
                            format!("request {request} is not waiting for its stream"),
                        ),
                    )
                    .await
                }
            }
        }
        Frame::Migrate { token, destination } => {
            if !tls::token_matches(&ctx.token, &token) {
                return reply_error(
                    &mut send,
                    ServeError::new(ErrorCode::Unauthorized, "wrong or missing admin token"),
                )
                .await;
            }
            match ctx.manager.local_mailbox(destination) {
                Some(mailbox) => {
                    crate::transport::migration::serve_incoming(mailbox, send, reader).await
                }
                None => {
                    reply_error(
                        &mut send,
                        ServeError::new(
                            ErrorCode::NotFound,
                            format!("instance {destination} is not served by this endpoint"),
                        ),
                    )
                    .await
                }
            }
        }
        other => {
            reply_error(
                &mut send,
                ServeError::new(
                    ErrorCode::Malformed,
                    format!(
                        "a stream must start with generate, admin, join, migrate or resume, not {}",
                        other.name()
                    ),
                ),
            )
            .await
        }
    }
}

async fn serve_generate(
    ctx: &ServerContext,
    mut send: quinn::SendStream,
    mut reader: FrameReader,
    request: crate::front::api::GenerateRequest,
) {
    let mut generation = match ctx.manager.submit(request) {
        Ok(g) => g,
        Err(e) => return reply_error(&mut send, e).await,
    };
    // The client keeps its side open while it waits: a reset of it (or any
    // frame after the request) cancels; a clean finish changes nothing.
    let mut client_open = true;
    loop {
        tokio::select! {
            event = generation.events.recv() => {
                let Some(event) = event else { break };
                let (frame, last) = match event {
                    GenerateEvent::Tokens(c) => (Frame::Tokens(c), false),
                    GenerateEvent::Finished(f) => (Frame::Finished(f), true),
                    GenerateEvent::Error(e) => (Frame::Error(e), true),
                };
                if write_frame(&mut send, &frame).await.is_err() {
                    return; // the client stopped reading: dropping `generation` cancels
                }
                if last {
                    generation.cancel.disarm();
                    let _ = send.finish();
                    return;
                }
            }
            more = reader.next(), if client_open => match more {
                Ok(None) => client_open = false,
                Ok(Some(f)) => {
                    return reply_error(&mut send, ServeError::new(
                        ErrorCode::Malformed,
                        format!("unexpected {} frame after the request", f.name()),
                    )).await;
                }
                Err(_) => return, // reset by the client: cancel
            },
        }
    }
}

async fn serve_join(
    ctx: &ServerContext,
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    mut reader: FrameReader,
    info: protocol::JoinInfo,
) {
    if !tls::token_matches(&ctx.token, &info.token) {
        return reply_error(
            &mut send,
            ServeError::new(ErrorCode::Unauthorized, "wrong or missing admin token"),
        )
        .await;
    }
    if info.model != ctx.manager.model_name() {
        return reply_error(
            &mut send,
            ServeError::new(
                ErrorCode::InvalidParameter,
                format!(
                    "this manager serves {}, the instance runs {}",
                    ctx.manager.model_name(),
                    info.model
                ),
            ),
        )
        .await;
    }
    let id = ctx.manager.next_instance_id();
    if write_frame(&mut send, &Frame::Welcome { instance: id })
        .await
        .is_err()
    {
        return;
    }
    let migration_addr = info.migration_addr.parse().ok();
    ctx.manager.register(
        id,
        Arc::new(RemoteLink {
            conn: conn.clone(),
            routes: ctx.manager.routes(),
        }),
        migration_addr,
    );
    let sink = ctx.manager.load_sink();
    loop {
        match reader.next().await {
            Ok(Some(Frame::Load(load))) => sink(relabel(load, id)),
            Ok(Some(other)) => {
                tracing::warn!(
                    instance = id,
                    frame = other.name(),
                    "unexpected frame on an instance's control stream"
                );
            }
            Ok(None) | Err(_) => break,
        }
    }
    tracing::warn!(instance = id, "joined instance disconnected");
    ctx.manager.remove_instance(id);
    conn.close(0u32.into(), b"control stream ended");
}

/// A migrated request's events from the joined instance it moved to.
async fn forward_resumed(
    events: EventSender,
    mut reader: FrameReader,
    routes: crate::control::llumlet::Routes,
    request: u64,
) {
    if let Err(e) = relay_frames(&mut reader, events, &routes, request).await {
        // Lost: dropping our sender lets the relay place it again (unless
        // another holder still runs it).
        tracing::debug!(request, error = %e, "resumed stream ended");
    }
}

/// How a stream of an instance's frames about one request ended.
enum FramesEnd {
    /// The request finished there.
    Finished,
    /// It failed there, or migrated on (its channel is parked for the
    /// destination to claim).
    Left,
    /// The relay dropped it (cancelled, or its client went away); the
    /// instance was told to stop.
    Cancelled,
}

/// Feeds the frames an instance sends about `request` (on an assignment or
/// a resumed stream) into the request's relay channel, until the request
/// ends there or the relay cancels it. An error: the stream broke or
/// carried something else.
async fn relay_frames(
    reader: &mut FrameReader,
    events: EventSender,
    routes: &crate::control::llumlet::Routes,
    request: u64,
) -> Result<FramesEnd, String> {
    loop {
        tokio::select! {
            _ = events.closed() => {
                reader.stop(1);
                return Ok(FramesEnd::Cancelled);
            }
            frame = reader.next() => match frame.map_err(|e| e.to_string())? {
                Some(Frame::Tokens(chunk)) => {
                    for (k, &id) in chunk.ids.iter().enumerate() {
                        let _ = events.send(InstanceEvent::Token { index: chunk.index + k as u32, id });
                    }
                }
                Some(Frame::Finished(f)) => {
                    let _ = events.send(InstanceEvent::Finished {
                        reason: f.reason,
                        output_tokens: f.completion_tokens,
                        queue_us: f.queue_us,
                    });
                    return Ok(FramesEnd::Finished);
                }
                Some(Frame::Error(e)) => {
                    let _ = events.send(InstanceEvent::Failed(e));
                    return Ok(FramesEnd::Left);
                }
                Some(Frame::Moved { .. }) => {
                    // Migrated away: the destination claims the channel.
                    routes.park(request, events);
                    return Ok(FramesEnd::Left);
                }
                Some(other) => return Err(format!("unexpected {} frame from an instance", other.name())),
                None => return Err("the instance ended the stream early".into()),
            }
        }
    }
}

/// The frame that carries an instance's event about `request` to the
/// manager, and whether it is the stream's last; `None` for an event the
/// manager learns otherwise (`Moved`: from the claim).
pub(crate) fn event_frame(
    event: InstanceEvent,
    request: u64,
    instance: u32,
) -> Option<(Frame, bool)> {
    Some(match event {
        InstanceEvent::Token { index, id } => (
            Frame::Tokens(crate::front::api::TokenChunk {
                index,
                ids: vec![id],
                text: String::new(),
            }),
            false,
        ),
        InstanceEvent::Finished {
            reason,
            output_tokens,
            queue_us,
        } => (
            Frame::Finished(crate::front::api::FinishRecord {
                request_id: request,
                reason,
                prompt_tokens: 0,
                completion_tokens: output_tokens,
                queue_us,
                ttft_us: 0,
                total_us: 0,
                instance,
                moves: 0,
            }),
            true,
        ),
        InstanceEvent::Failed(e) => (Frame::Error(e), true),
        InstanceEvent::MovedAway => (Frame::Moved { instance }, true),
        InstanceEvent::Moved { .. } => return None,
    })
}

/// The manager's side of a joined instance: each request is one stream the
/// manager opens; the instance streams tokens back on it.
pub struct RemoteLink {
    conn: quinn::Connection,
    routes: crate::control::llumlet::Routes,
}

impl InstanceLink for RemoteLink {
    fn assign(&self, job: Assignment, events: EventSender) -> Result<(), ServeError> {
        if let Some(reason) = self.conn.close_reason() {
            return Err(ServeError::new(
                ErrorCode::Unavailable,
                format!("instance connection closed: {reason}"),
            ));
        }
        let conn = self.conn.clone();
        let routes = self.routes.clone();
        tokio::spawn(async move {
            let request = job.request_id;
            if let Err(e) = run_assignment(conn, job, events, routes).await {
                // Dropping `events` tells the relay to place it again.
                tracing::warn!(request, error = %e, "assignment stream to a joined instance failed");
            }
        });
        Ok(())
    }

    fn set_draining(&self, _draining: bool) {
        // The manager marks the loads it receives from this instance.
    }

    fn candidates(
        &self,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Vec<llumen_policy_logic::MigrationCandidate>>
                + Send
                + '_,
        >,
    > {
        let conn = self.conn.clone();
        Box::pin(async move {
            let result: Result<Vec<llumen_policy_logic::MigrationCandidate>, String> = async {
                let json = ask_instance(&conn, &Frame::Candidates, "candidates").await?;
                let rows: Vec<(u64, u8, u32, u32, u32, u64)> =
                    serde_json::from_str(&json).map_err(|e| e.to_string())?;
                Ok(rows
                    .into_iter()
                    .map(
                        |(id, priority, blocks, prompt_tokens, output_tokens, arrival_us)| {
                            llumen_policy_logic::MigrationCandidate {
                                id,
                                priority,
                                blocks,
                                prompt_tokens,
                                output_tokens,
                                arrival_us,
                            }
                        },
                    )
                    .collect())
            }
            .await;
            result.unwrap_or_else(|e| {
                tracing::debug!(error = %e, "asking a joined instance for migration candidates");
                Vec::new()
            })
        })
    }

    fn stop(&self) {
        self.conn.close(0u32.into(), b"removed from the fleet");
    }

    fn kind(&self) -> &'static str {
        "remote"
    }

    fn migrate_out(
        &self,
        migration_id: u64,
        request: u64,
        destination: u32,
        addr: std::net::SocketAddr,
        _transport: &Arc<crate::transport::migration::MigrationTransport>,
    ) -> Result<tokio::sync::oneshot::Receiver<crate::control::llumlet::MigrationReport>, String>
    {
        use crate::control::llumlet::MigrationReport;
        if let Some(reason) = self.conn.close_reason() {
            return Err(format!("instance connection closed: {reason}"));
        }
        let (done, rx) = tokio::sync::oneshot::channel();
        let conn = self.conn.clone();
        tokio::spawn(async move {
            let result: Result<MigrationReport, String> = async {
                let order = Frame::MigrateOut {
                    migration_id,
                    request,
                    destination,
                    addr: addr.to_string(),
                };
                let json = ask_instance(&conn, &order, "migrate-out").await?;
                serde_json::from_str(&json).map_err(|e| e.to_string())
            }
            .await;
            let _ = done.send(result.unwrap_or_else(|e| {
                MigrationReport::NotStarted(format!("joined source instance: {e}"))
            }));
        });
        Ok(rx)
    }
}

/// One question to a joined instance on a fresh stream: `frame` out, the
/// JSON of its `AdminReply` back (`what` names the question in errors).
async fn ask_instance(
    conn: &quinn::Connection,
    frame: &Frame,
    what: &str,
) -> Result<String, String> {
    let (mut send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    write_frame(&mut send, frame)
        .await
        .map_err(|e| e.to_string())?;
    let _ = send.finish();
    let mut reader = FrameReader::new(recv, MAX_REQUEST_FRAME);
    match reader.next().await.map_err(|e| e.to_string())? {
        Some(Frame::AdminReply { json }) => Ok(json),
        Some(Frame::Error(e)) => Err(e.to_string()),
        other => Err(format!("unexpected answer to {what}: {other:?}")),
    }
}

async fn run_assignment(
    conn: quinn::Connection,
    job: Assignment,
    events: EventSender,
    routes: crate::control::llumlet::Routes,
) -> Result<(), String> {
    let request = job.request_id;
    let (mut send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    write_frame(&mut send, &Frame::Assign(job))
        .await
        .map_err(|e| e.to_string())?;
    let mut reader = FrameReader::new(recv, MAX_REQUEST_FRAME);
    match relay_frames(&mut reader, events, &routes, request).await? {
        // Tell the instance to drop it.
        FramesEnd::Cancelled => {
            let _ = send.reset(1u32.into());
        }
        FramesEnd::Finished => {
            let _ = send.finish();
        }
        FramesEnd::Left => {}
    }
    Ok(())
}

/// The instance side of a stream the manager opens (used by `llumen
/// instance`): an assignment (tokens back until the end) or a migrate-out
/// order (the report back when the migration ends).
pub async fn serve_manager_stream(
    llumlet: Arc<crate::control::llumlet::Llumlet>,
    transport: Arc<crate::transport::migration::MigrationTransport>,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
) {
    let mut reader = FrameReader::new(recv, MAX_REQUEST_FRAME);
    let job = match reader.next().await {
        Ok(Some(Frame::Assign(job))) => job,
        Ok(Some(Frame::Candidates)) => {
            let rows: Vec<(u64, u8, u32, u32, u32, u64)> = llumlet
                .migration_candidates()
                .await
                .into_iter()
                .map(|c| {
                    (
                        c.id,
                        c.priority,
                        c.blocks,
                        c.prompt_tokens,
                        c.output_tokens,
                        c.arrival_us,
                    )
                })
                .collect();
            let json = serde_json::to_string(&rows).expect("candidates serialize");
            let _ = write_frame(&mut send, &Frame::AdminReply { json }).await;
            let _ = send.finish();
            return;
        }
        Ok(Some(Frame::MigrateOut {
            migration_id,
            request,
            destination,
            addr,
        })) => {
            let report = match addr.parse() {
                Ok(addr) => {
                    let mailbox = llumlet.mailbox();
                    let link = transport.open(addr, destination, migration_id, mailbox.clone());
                    mailbox
                        .migrate_out(migration_id, request, link)
                        .await
                        .unwrap_or_else(|_| {
                            crate::control::llumlet::MigrationReport::NotStarted(
                                "instance stopped".into(),
                            )
                        })
                }
                Err(e) => crate::control::llumlet::MigrationReport::NotStarted(format!(
                    "bad address {addr:?}: {e}"
                )),
            };
            let json = serde_json::to_string(&report).expect("reports serialize");
            let _ = write_frame(&mut send, &Frame::AdminReply { json }).await;
            let _ = send.finish();
            return;
        }
        Ok(_) => {
            return reply_error(
                &mut send,
                ServeError::new(
                    ErrorCode::Malformed,
                    "expected an assign or migrate-out frame",
                ),
            )
            .await
        }
        Err(e) => {
            if let WireError::Decode(d) = e {
                reply_error(&mut send, d.to_serve_error()).await;
            }
            return;
        }
    };
    let request = job.request_id;
    let (tx, mut rx) = mpsc::unbounded_channel();
    if let Err(e) = llumlet.assign(job, tx) {
        return reply_error(&mut send, e).await;
    }
    let mut manager_open = true;
    loop {
        tokio::select! {
            event = rx.recv() => {
                let (frame, last) = match event {
                    Some(event) => match event_frame(event, request, llumlet.instance()) {
                        Some(f) => f,
                        None => continue,
                    },
                    None => (Frame::Error(ServeError::new(ErrorCode::Unavailable, "instance stopped")), true),
                };
                if write_frame(&mut send, &frame).await.is_err() {
                    return; // dropping rx aborts the request
                }
                if last {
                    let _ = send.finish();
                    return;
                }
            }
            more = reader.next(), if manager_open => match more {
                Ok(None) => manager_open = false,
                _ => return, // reset by the manager: dropping rx aborts
            },
        }
    }
}
