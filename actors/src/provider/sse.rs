//! An incremental Server-Sent-Events decoder, per the WHATWG HTML "event stream" parsing rules.
//!
//! Every streaming provider API speaks SSE, and the network hands us the body in arbitrary
//! pieces: a chunk may end mid-line, between `\r` and `\n`, or in the middle of a multi-byte
//! UTF-8 character. [`SseDecoder`] therefore buffers raw bytes and only decodes complete lines,
//! so no split point can corrupt an event. It is pure (no I/O, no async) and is tested on every
//! possible split of its transcripts; [`events`] wraps it around a byte stream for the adapters.
//!
//! Deliberate simplifications of the browser algorithm, which only matter for reconnection
//! (something a provider client never does): the `retry` field is ignored.

use std::mem;

use futures_util::stream::{self, Stream, StreamExt};

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    /// The `event:` field, if the event had one (the spec's default type `message` is left to
    /// the caller, so "no type" stays distinguishable).
    pub event: Option<String>,
    /// Every `data:` line of the event, joined with `\n`.
    pub data: String,
    /// The last event ID seen on the stream so far (it persists across events, as the spec
    /// says); `None` until an `id:` field sets it, or after one resets it to empty.
    pub id: Option<String>,
}

/// Incremental SSE decoder: feed it byte chunks as they arrive, collect the events.
#[derive(Debug, Default)]
pub struct SseDecoder {
    /// Bytes of the current, not yet terminated line.
    line: Vec<u8>,
    /// The previous chunk ended with `\r`: a `\n` opening the next chunk belongs to that same
    /// line terminator, not to a new (blank, dispatching) line.
    after_cr: bool,
    /// Whether the first line of the stream has been started: a leading BOM is stripped once.
    started: bool,
    event: Option<String>,
    data: String,
    /// Whether any `data` field was seen for the current event: an event without data is not
    /// dispatched, while `data:` with an empty value dispatches an empty-data event.
    has_data: bool,
    last_id: Option<String>,
}

impl SseDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Consumes one chunk of the body and returns the events it completed (often none; the
    /// returned `Vec` only allocates when there is something in it).
    pub fn feed(&mut self, mut bytes: &[u8]) -> Vec<SseEvent> {
        let mut out = Vec::new();
        // An empty chunk must not clear the flag: the `\n` may still be on its way.
        if self.after_cr && !bytes.is_empty() {
            self.after_cr = false;
            if let Some(rest) = bytes.strip_prefix(b"\n") {
                bytes = rest;
            }
        }
        while let Some(pos) = bytes.iter().position(|&b| b == b'\n' || b == b'\r') {
            let terminator = bytes[pos];
            self.line.extend_from_slice(&bytes[..pos]);
            bytes = &bytes[pos + 1..];
            if terminator == b'\r' {
                match bytes.first() {
                    Some(b'\n') => bytes = &bytes[1..],
                    // The `\n` of a `\r\n` may be the first byte of the next chunk.
                    None => self.after_cr = true,
                    Some(_) => {}
                }
            }
            let line = mem::take(&mut self.line);
            if let Some(event) = self.process_line(&line) {
                out.push(event);
            }
            // Reuse the line buffer's allocation for the next line.
            self.line = line;
            self.line.clear();
        }
        self.line.extend_from_slice(bytes);
        out
    }

    /// Whether bytes of an unfinished event are buffered. At the end of the stream the spec
    /// discards them (an event is only complete at its blank line); callers may use this to
    /// tell a clean end from a cut one.
    pub fn has_pending(&self) -> bool {
        !self.line.is_empty() || self.has_data || self.event.is_some()
    }

    fn process_line(&mut self, line: &[u8]) -> Option<SseEvent> {
        let mut line = line;
        if !self.started {
            self.started = true;
            line = line.strip_prefix("\u{feff}".as_bytes()).unwrap_or(line);
        }
        if line.is_empty() {
            return self.dispatch();
        }
        if line[0] == b':' {
            return None; // A comment, e.g. a keep-alive.
        }
        let (name, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &[][..]),
        };
        // Lossy: the spec decodes invalid UTF-8 to U+FFFD; a provider's bad byte must not end
        // the stream here (the JSON parser downstream decides whether the event is usable).
        let value = String::from_utf8_lossy(value);
        match name {
            b"data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(&value);
                self.has_data = true;
            }
            b"event" => self.event = Some(value.into_owned()),
            // An id containing NUL is ignored, as the spec says.
            b"id" if !value.contains('\0') => {
                self.last_id = (!value.is_empty()).then(|| value.into_owned());
            }
            _ => {} // `retry` and unknown fields.
        }
        None
    }

    fn dispatch(&mut self) -> Option<SseEvent> {
        let event = self.event.take();
        if !mem::take(&mut self.has_data) {
            return None;
        }
        Some(SseEvent {
            event,
            data: mem::take(&mut self.data),
            id: self.last_id.clone(),
        })
    }
}

/// Turns a byte stream (e.g. a provider response's body) into a stream of events.
/// A transport error is passed through in order; what follows it is up to the source stream.
/// An event left unfinished at the end of the body is dropped, as the spec says.
pub fn events<S, B, E>(body: S) -> impl Stream<Item = Result<SseEvent, E>>
where
    S: Stream<Item = Result<B, E>>,
    B: AsRef<[u8]>,
{
    let mut decoder = SseDecoder::new();
    body.flat_map(move |item| {
        let (decoded, error) = match item {
            Ok(bytes) => (decoder.feed(bytes.as_ref()), None),
            Err(error) => (Vec::new(), Some(error)),
        };
        stream::iter(decoded.into_iter().map(Ok).chain(error.map(Err)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(event: Option<&str>, data: &str, id: Option<&str>) -> SseEvent {
        SseEvent {
            event: event.map(str::to_owned),
            data: data.to_owned(),
            id: id.map(str::to_owned),
        }
    }

    fn decode_all(input: &[u8]) -> Vec<SseEvent> {
        SseDecoder::new().feed(input)
    }

    /// Feeds `input` split at every pair of split points and checks the result never changes.
    fn assert_split_invariant(input: &[u8]) {
        let whole = decode_all(input);
        for i in 0..=input.len() {
            for j in i..=input.len() {
                let mut decoder = SseDecoder::new();
                let mut got = decoder.feed(&input[..i]);
                got.extend(decoder.feed(&input[i..j]));
                got.extend(decoder.feed(&input[j..]));
                assert_eq!(got, whole, "split at {i} and {j}");
            }
        }
        // And one byte at a time.
        let mut decoder = SseDecoder::new();
        let got: Vec<_> = input.iter().flat_map(|b| decoder.feed(&[*b])).collect();
        assert_eq!(got, whole, "byte by byte");
    }

    #[test]
    fn basic_events_and_fields() {
        let got = decode_all(b"event: add\ndata: 73857293\n\nevent: remove\ndata: 2153\n\n");
        assert_eq!(
            got,
            vec![
                ev(Some("add"), "73857293", None),
                ev(Some("remove"), "2153", None)
            ]
        );
    }

    #[test]
    fn data_lines_join_with_newline_and_one_space_is_stripped() {
        let got = decode_all(b"data:first\ndata:  second\ndata\ndata: \n\n");
        assert_eq!(got, vec![ev(None, "first\n second\n\n", None)]);
    }

    #[test]
    fn all_three_line_endings() {
        let got = decode_all(b"data: a\r\ndata: b\rdata: c\n\r\ndata: d\r\r");
        assert_eq!(got, vec![ev(None, "a\nb\nc", None), ev(None, "d", None)]);
    }

    #[test]
    fn comments_ignored_and_events_without_data_not_dispatched() {
        let got = decode_all(b": keep-alive\n\nevent: ping\n\n:x\ndata: y\n\n");
        assert_eq!(got, vec![ev(None, "y", None)]);
    }

    #[test]
    fn empty_data_field_dispatches_an_empty_event() {
        assert_eq!(decode_all(b"data:\n\n"), vec![ev(None, "", None)]);
        assert_eq!(decode_all(b"data\n\n"), vec![ev(None, "", None)]);
    }

    #[test]
    fn event_type_does_not_leak_into_the_next_event() {
        let got = decode_all(b"event: a\ndata: 1\n\ndata: 2\n\n");
        assert_eq!(got, vec![ev(Some("a"), "1", None), ev(None, "2", None)]);
    }

    #[test]
    fn last_event_id_persists_and_resets() {
        let got = decode_all(b"id: 7\ndata: a\n\ndata: b\n\nid\ndata: c\n\nid: x\0y\ndata: d\n\n");
        assert_eq!(
            got,
            vec![
                ev(None, "a", Some("7")),
                ev(None, "b", Some("7")),
                ev(None, "c", None),
                ev(None, "d", None),
            ]
        );
    }

    #[test]
    fn leading_bom_is_stripped_once() {
        let got = decode_all("\u{feff}data: a\n\n\u{feff}data: b\n\n".as_bytes());
        // The second BOM makes the line's field name "\u{feff}data", an unknown field.
        assert_eq!(got, vec![ev(None, "a", None)]);
    }

    #[test]
    fn unknown_fields_and_retry_ignored() {
        let got = decode_all(b"retry: 100\nfoo: bar\ndata: z\n\n");
        assert_eq!(got, vec![ev(None, "z", None)]);
    }

    #[test]
    fn unfinished_event_at_eof_is_not_dispatched() {
        let mut decoder = SseDecoder::new();
        assert_eq!(
            decoder.feed(b"data: a\n\ndata: partial"),
            vec![ev(None, "a", None)]
        );
        assert!(decoder.has_pending());
        let mut decoder = SseDecoder::new();
        assert_eq!(decoder.feed(b"data: a\n\n").len(), 1);
        assert!(!decoder.has_pending());
    }

    #[test]
    fn invalid_utf8_is_replaced_not_fatal() {
        let got = decode_all(b"data: a\xffb\n\n");
        assert_eq!(got, vec![ev(None, "a\u{fffd}b", None)]);
    }

    #[test]
    fn every_split_point_gives_the_same_events() {
        let input = "\u{feff}: hi\r\nevent: delta\r\ndata: {\"text\":\"héllo → 世界 🎉\"}\r\n\r\n\
                     id: 1\rdata: a\rdata:b\r\rdata: [DONE]\n\n"
            .as_bytes();
        let whole = decode_all(input);
        assert_eq!(
            whole,
            vec![
                ev(Some("delta"), "{\"text\":\"héllo → 世界 🎉\"}", None),
                ev(None, "a\nb", Some("1")),
                ev(None, "[DONE]", Some("1")),
            ]
        );
        assert_split_invariant(input);
    }

    #[test]
    fn split_between_cr_and_lf_is_one_terminator() {
        let mut decoder = SseDecoder::new();
        assert!(decoder.feed(b"data: a\r").is_empty());
        assert!(decoder.feed(b"").is_empty()); // An empty read in between changes nothing.
        // If the `\n` counted as a second line ending, this would dispatch early.
        assert!(decoder.feed(b"\ndata: b\r").is_empty());
        assert_eq!(decoder.feed(b"\n\r\n"), vec![ev(None, "a\nb", None)]);
    }

    #[tokio::test]
    async fn stream_helper_decodes_across_chunks_and_passes_errors() {
        let chunks: Vec<Result<&[u8], &str>> = vec![
            Ok(&b"data: he"[..]),
            Ok(&"llo \u{e9}".as_bytes()[..5]),
            Ok(&[0xa9, b'\n', b'\n'][..]),
            Err("reset"),
        ];
        let got: Vec<_> = events(stream::iter(chunks)).collect().await;
        assert_eq!(got, vec![Ok(ev(None, "hello é", None)), Err("reset")]);
    }
}
