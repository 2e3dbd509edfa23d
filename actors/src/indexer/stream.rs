//! The parser thread of a streamed document: blob pieces in, chunks out.
//!
//! ```text
//! DocumentIndexer ── pieces (≤ 2) ──▶ parser thread: extract → chunk ── windows of chunks (≤ 2) ──▶ embed → store
//! ```
//!
//! The indexer reads the blob in ranged pieces and hands them over a bounded channel to a
//! thread that runs [`stream_text`] (the parsers are synchronous: `csv`, `serde_json`, UTF-8
//! decoding) and a [`StreamChunker`] (token counting is CPU work too, kept off the async
//! workers) inside `catch_unwind`; each window's chunks come back over another bounded channel.
//! Both channels are small, so a slow consumer (the embedder) slows the reads, and memory stays
//! bounded by a few pieces and windows whatever the document's size. Dropping the chunk
//! receiver stops the thread at its next window; dropping the piece sender ends its input.

use std::io::Read;
use std::panic::AssertUnwindSafe;

use bytes::{Buf, Bytes};
use tokio::sync::mpsc;

use super::chunk::{ChunkDraft, ChunkParams, StreamChunker};
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

/// What the parser thread does with one document.
#[derive(Debug, Clone, Copy)]
pub struct ParserConfig {
    /// One of [`super::extract::is_streamed`].
    pub kind: DocumentKind,
    /// Bytes read at a time, and the chunker's window.
    pub piece_bytes: usize,
    /// A JSON object may be read whole (the file is small enough).
    pub whole_objects: bool,
    pub chunk: ChunkParams,
    /// Most extracted text (`documents.max_text_bytes`).
    pub max_text_bytes: usize,
}

/// The two ends the indexer holds while a streamed document is parsed.
pub struct Parser {
    /// Blob pieces, in order; drop it after the last.
    pub pieces: mpsc::Sender<Bytes>,
    /// Each window's chunks, in order, ending with the error that stopped the parser if one
    /// did.
    pub chunks: mpsc::Receiver<Result<Vec<ChunkDraft>, ExtractError>>,
}

/// Starts a parser thread.
pub fn spawn_parser(config: ParserConfig) -> Result<Parser, ExtractError> {
    /// Room for deeply nested JSON (serde_json stops at 128 levels anyway).
    const STACK: usize = 16 * 1024 * 1024;
    let kind = config.kind;
    let (pieces, pieces_rx) = mpsc::channel::<Bytes>(IN_FLIGHT);
    let (chunks_tx, chunks) = mpsc::channel(IN_FLIGHT);
    std::thread::Builder::new()
        .name("chorus-extract".into())
        .stack_size(STACK)
        .spawn(move || {
            let input = PieceReader::new(pieces_rx);
            let send = |drafts: Vec<ChunkDraft>| {
                if drafts.is_empty() {
                    return Ok(());
                }
                chunks_tx
                    .blocking_send(Ok(drafts))
                    .map_err(|_| ExtractError::Stopped)
            };
            let parsed = std::panic::catch_unwind(AssertUnwindSafe(|| {
                let mut chunker = StreamChunker::new(
                    config.chunk,
                    kind == DocumentKind::Markdown,
                    config.piece_bytes,
                );
                let mut extracted = 0usize;
                stream_text(
                    kind,
                    input,
                    config.piece_bytes,
                    config.whole_objects,
                    &mut |text| {
                        extracted += text.len();
                        if extracted > config.max_text_bytes {
                            return Err(ExtractError::TooLarge {
                                limit: config.max_text_bytes,
                            });
                        }
                        send(chunker.push(&text))
                    },
                )?;
                send(chunker.finish())
            }));
            let failure = match parsed {
                Ok(Ok(())) | Ok(Err(ExtractError::Stopped)) => return,
                Ok(Err(e)) => e,
                Err(panic) => ExtractError::Panicked(parser_name(kind), panic_message(&*panic)),
            };
            let _ = chunks_tx.blocking_send(Err(failure));
        })
        .map_err(|e| {
            ExtractError::Unreadable(format!("starting the {} parser: {e}", parser_name(kind)))
        })?;
    Ok(Parser { pieces, chunks })
}
