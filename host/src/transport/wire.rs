//! The async shell that moves [`crate::transport::protocol`] frames over
//! quinn streams.
//! Owns only the reading and writing of frames; what they mean belongs to
//! the server, the client and the instance link.

use crate::transport::protocol::{self, DecodeError, Frame, FrameDecoder};

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("reading: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("writing: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("the peer closed the stream: {0}")]
    Closed(#[from] quinn::ClosedStream),
}

/// Writes one frame.
pub async fn write_frame(send: &mut quinn::SendStream, frame: &Frame) -> Result<(), WireError> {
    send.write_all(&protocol::encode(frame)).await?;
    Ok(())
}

/// Reads frames from a stream.
pub struct FrameReader {
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
    ended: bool,
}

impl FrameReader {
    pub fn new(recv: quinn::RecvStream, max_frame: usize) -> Self {
        Self::with_decoder(recv, FrameDecoder::new(max_frame))
    }

    pub fn with_decoder(recv: quinn::RecvStream, decoder: FrameDecoder) -> Self {
        Self {
            recv,
            decoder,
            ended: false,
        }
    }

    /// The next frame; `None` when the peer finished the stream cleanly
    /// between two frames.
    pub async fn next(&mut self) -> Result<Option<Frame>, WireError> {
        loop {
            if let Some(frame) = self.decoder.next_frame()? {
                return Ok(Some(frame));
            }
            if self.ended {
                self.decoder.finish()?;
                return Ok(None);
            }
            match self.recv.read_chunk(64 * 1024, true).await? {
                Some(chunk) => self.decoder.push(&chunk.bytes),
                None => self.ended = true,
            }
        }
    }

    /// The stream and the bytes already received from it that no returned
    /// frame used (in order: they come before the stream's next bytes).
    pub fn into_parts(mut self) -> (quinn::RecvStream, Vec<u8>) {
        (self.recv, self.decoder.take_pending())
    }

    /// Tells the peer to stop sending (used to refuse the rest of a stream).
    pub fn stop(&mut self, code: u32) {
        let _ = self.recv.stop(quinn::VarInt::from_u32(code));
    }
}
