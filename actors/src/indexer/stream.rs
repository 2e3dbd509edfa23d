//! The parser thread of a streamed document: blob pieces in, text pieces out.
//!
//! ```text
//! DocumentIndexer ── pieces (≤ 2 × piece_bytes) ──▶ parser thread ── text (≤ 2 pieces) ──▶ chunk → embed → store
//! ```
//!
//! The indexer reads the blob in ranged pieces and hands them over a bounded channel to a
//! thread that runs [`stream_text`] (the parsers are synchronous: `csv`, `serde_json`, UTF-8
//! decoding) inside `catch_unwind`; its text comes back over another bounded channel. Both
//! channels are small, so a slow consumer (the embedder) slows the reads, and memory stays
//! bounded by a few pieces whatever the document's size. Dropping the text receiver stops the
//! thread at its next piece; dropping the piece sender ends its input.

use std::io::Read;
use std::panic::AssertUnwindSafe;

use bytes::{Buf, Bytes};
use tokio::sync::mpsc;

use super::detect::DocumentKind;
use super::extract::{ExtractError, panic_message, parser_name, stream_text};

/// Pieces waiting on either side of the parser thread.
const IN_FLIGHT: usize = 2;

/// A [`Read`] over the pieces the indexer sends, for the parser thread (it blocks).
pub struct PieceReader {
    pieces: mpsc::Receiver<Bytes>,
    current: Bytes,
}

impl PieceReader {
    pub fn new(pieces: mpsc::Receiver<Bytes>) -> PieceReader {
        PieceReader {
            pieces,
            current: Bytes::new(),
        }
    }
}

impl Read for PieceReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.pieces.blocking_recv() {
                Some(piece) => self.current = piece,
                // The sender is done (or gone): the input ends here.
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current.advance(n);
        Ok(n)
    }
}

/// The two ends the indexer holds while a streamed document is parsed.
pub struct Parser {
    /// Blob pieces, in order; drop it after the last.
    pub pieces: mpsc::Sender<Bytes>,
    /// Text pieces, in order, ending with the error that stopped the parser if one did.
    pub text: mpsc::Receiver<Result<String, ExtractError>>,
}

/// Starts a parser thread for `kind` (one of [`super::extract::is_streamed`]); see
/// [`stream_text`] for `read_bytes` and `whole_objects`.
pub fn spawn_parser(
    kind: DocumentKind,
    read_bytes: usize,
    whole_objects: bool,
) -> Result<Parser, ExtractError> {
    /// Room for deeply nested JSON (serde_json stops at 128 levels anyway).
    const STACK: usize = 16 * 1024 * 1024;
    let (pieces, pieces_rx) = mpsc::channel::<Bytes>(IN_FLIGHT);
    let (text_tx, text) = mpsc::channel(IN_FLIGHT);
    std::thread::Builder::new()
        .name("chorus-extract".into())
        .stack_size(STACK)
        .spawn(move || {
            let input = PieceReader::new(pieces_rx);
            let parsed = std::panic::catch_unwind(AssertUnwindSafe(|| {
                stream_text(kind, input, read_bytes, whole_objects, &mut |piece| {
                    text_tx
                        .blocking_send(Ok(piece))
                        .map_err(|_| ExtractError::Stopped)
                })
            }));
            let failure = match parsed {
                Ok(Ok(())) | Ok(Err(ExtractError::Stopped)) => return,
                Ok(Err(e)) => e,
                Err(panic) => ExtractError::Panicked(parser_name(kind), panic_message(&*panic)),
            };
            let _ = text_tx.blocking_send(Err(failure));
        })
        .map_err(|e| {
            ExtractError::Unreadable(format!("starting the {} parser: {e}", parser_name(kind)))
        })?;
    Ok(Parser { pieces, text })
}
