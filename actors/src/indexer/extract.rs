//! Text out of an uploaded file: the first step of ingestion.
//!
//! Every format comes out as [`Extracted`]: pages of text (one page unless the format has pages),
//! with Markdown-style `#` headings where the format has headings (Markdown itself, HTML `<h1>`…,
//! DOCX `Heading1`… styles), so the chunker builds heading paths the same way for all of them.
//!
//! - plain text and Markdown: the file itself (UTF-8; CRLF becomes LF);
//! - HTML: the rendered text only (`html2text`: no scripts, styles or URLs), headings as `#`;
//! - CSV: one paragraph per record, `header: value; header: value`;
//! - JSON: one line per leaf, `path.to[0].key: value` (keys sorted), a paragraph per top-level
//!   entry;
//! - PDF: the text layer, page by page (`pdf-extract`); a PDF without one goes to OCR;
//! - DOCX: paragraphs of `word/document.xml` (`zip` + `quick-xml`), with a zip-bomb guard;
//! - PNG/JPEG/TIFF: OCR.
//!
//! **Invalid UTF-8 fails** the document with the byte offset (the upload already refuses it
//! with 415, so this only catches a blob changed behind our back): a lossy decode would index
//! replacement characters silently.
//!
//! **Streamed formats.** Plain text, Markdown, CSV and JSON arrays are also read as a stream
//! ([`stream_text`]): bytes in pieces from a [`Read`], text out in pieces, so ingestion holds a
//! bounded amount of either whatever the file's size; their pieces joined are exactly what
//! [`extract_sync`] gives for the whole file. HTML, PDF, DOCX and images need the whole file (a
//! DOM, a cross-reference table, a ZIP directory) and are read whole, under a size cap.
//!
//! **Hostile input.** Parsers run on their own thread with a large stack, inside
//! `catch_unwind`, under a deadline ([`run_isolated`]): a panic or a timeout fails the document
//! with a reason and the node keeps serving. (A parser stuck in a loop keeps its thread until it
//! returns; the document has failed by then.) Extracted text is capped at `max_text_bytes`.
//!
//! **OCR** runs the `tesseract` binary (and `pdftoppm` for PDFs) when they are on the `PATH`
//! (or configured by path); without them such documents fail with "no text layer; OCR needs
//! tesseract-ocr installed".

use std::io::{Cursor, Read};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;

use super::detect::DocumentKind;

/// One page of extracted text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtractedPage {
    /// 1-based page number, for formats with pages (PDF).
    pub number: Option<u32>,
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extracted {
    pub pages: Vec<ExtractedPage>,
    /// `#` lines are headings (Markdown, HTML, DOCX); in plain text they are just text.
    pub headings: bool,
}

impl Extracted {
    fn single(text: String, headings: bool) -> Extracted {
        Extracted {
            pages: vec![ExtractedPage { number: None, text }],
            headings,
        }
    }

    pub fn text_bytes(&self) -> usize {
        self.pages.iter().map(|p| p.text.len()).sum()
    }

    pub fn is_blank(&self) -> bool {
        self.pages.iter().all(|p| p.text.trim().is_empty())
    }
}

/// Why a document could not be read. The `Display` is the reason stored on the document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExtractError {
    #[error("{0}")]
    Unreadable(String),
    #[error("{0}")]
    NoText(String),
    #[error("extracted text exceeds the limit of {limit} bytes (documents.max_text_bytes)")]
    TooLarge { limit: usize },
    #[error("rejected as a possible zip bomb: {0}")]
    ZipBomb(String),
    #[error("the {0} parser crashed on this file: {1}")]
    Panicked(&'static str, String),
    #[error("extraction did not finish within {0:?}")]
    TimedOut(Duration),
    #[error("OCR failed: {0}")]
    Ocr(String),
    /// Whoever took the streamed text stopped listening (the document was deleted, or
    /// ingestion failed elsewhere).
    #[error("ingestion stopped")]
    Stopped,
}

/// Limits and tools of extraction (`[documents]` in chorus.toml).
#[derive(Debug, Clone)]
pub struct ExtractConfig {
    pub max_text_bytes: usize,
    pub timeout: Duration,
    /// `tesseract`: a name looked up on `PATH`, or a path.
    pub tesseract: String,
    /// `pdftoppm` (poppler-utils), to turn PDF pages into images for OCR.
    pub pdftoppm: String,
}

impl Default for ExtractConfig {
    fn default() -> Self {
        ExtractConfig {
            max_text_bytes: 16 * 1024 * 1024,
            timeout: Duration::from_secs(300),
            tesseract: "tesseract".into(),
            pdftoppm: "pdftoppm".into(),
        }
    }
}

/// Extracts the text of `bytes`, read as `kind`.
pub async fn extract(
    kind: DocumentKind,
    bytes: Bytes,
    config: &ExtractConfig,
) -> Result<Extracted, ExtractError> {
    let limit = config.max_text_bytes;
    let extracted = if kind.is_image() {
        None
    } else {
        let input = bytes.clone();
        let parsed = run_isolated(parser_name(kind), config.timeout, move || {
            extract_sync(kind, &input, limit)
        })
        .await??;
        Some(parsed)
    };
    let extracted = match extracted {
        Some(e) if !(kind == DocumentKind::Pdf && e.is_blank()) => e,
        _ => ocr(kind, &bytes, config).await?,
    };
    if extracted.text_bytes() > limit {
        return Err(ExtractError::TooLarge { limit });
    }
    if extracted.is_blank() {
        return Err(ExtractError::NoText("the document contains no text".into()));
    }
    Ok(extracted)
}

pub fn parser_name(kind: DocumentKind) -> &'static str {
    match kind {
        DocumentKind::Pdf => "PDF",
        DocumentKind::Docx => "DOCX",
        DocumentKind::Html => "HTML",
        DocumentKind::Csv => "CSV",
        DocumentKind::Json => "JSON",
        _ => "text",
    }
}

/// The synchronous part: parsing. Runs on an isolated thread.
pub fn extract_sync(
    kind: DocumentKind,
    bytes: &[u8],
    limit: usize,
) -> Result<Extracted, ExtractError> {
    match kind {
        DocumentKind::Text => Ok(Extracted::single(utf8(bytes)?, false)),
        DocumentKind::Markdown => Ok(Extracted::single(utf8(bytes)?, true)),
        DocumentKind::Html => html(bytes),
        DocumentKind::Csv => csv_text(bytes, limit),
        DocumentKind::Json => json_text(bytes, limit),
        DocumentKind::Pdf => pdf(bytes),
        DocumentKind::Docx => docx(bytes, limit),
        DocumentKind::Png | DocumentKind::Jpeg | DocumentKind::Tiff => Ok(Extracted {
            pages: Vec::new(),
            headings: false,
        }),
    }
}

/// UTF-8 text with a BOM dropped and line ends normalised to `\n`.
fn utf8(bytes: &[u8]) -> Result<String, ExtractError> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let text = std::str::from_utf8(bytes).map_err(|e| {
        ExtractError::Unreadable(format!(
            "the text is not valid UTF-8 (byte {}); save it as UTF-8 and upload it again",
            e.valid_up_to()
        ))
    })?;
    Ok(if text.contains('\r') {
        text.replace("\r\n", "\n").replace('\r', "\n")
    } else {
        text.to_owned()
    })
}

fn html(bytes: &[u8]) -> Result<Extracted, ExtractError> {
    let text = utf8(bytes)?;
    let rendered = html2text::config::plain_no_decorate()
        .string_from_read(text.as_bytes(), 10_000)
        .map_err(|e| ExtractError::Unreadable(format!("unreadable HTML: {e}")))?;
    // Trailing spaces of padded lines carry nothing.
    let lines: Vec<&str> = rendered.lines().map(str::trim_end).collect();
    Ok(Extracted::single(lines.join("\n"), true))
}

/// Collects streamed text whole, failing once it exceeds `limit` bytes.
fn collect(
    limit: usize,
    stream: impl FnOnce(&mut dyn FnMut(String) -> Result<(), ExtractError>) -> Result<(), ExtractError>,
) -> Result<String, ExtractError> {
    let mut out = String::new();
    stream(&mut |piece: String| {
        out.push_str(&piece);
        if out.len() > limit {
            return Err(ExtractError::TooLarge { limit });
        }
        Ok(())
    })?;
    Ok(out)
}

fn csv_text(bytes: &[u8], limit: usize) -> Result<Extracted, ExtractError> {
    let text = collect(limit, |emit| stream_csv(bytes, 0, emit))?;
    Ok(Extracted::single(text, false))
}

fn json_text(bytes: &[u8], limit: usize) -> Result<Extracted, ExtractError> {
    let text = collect(limit, |emit| stream_json(bytes, true, 0, emit))?;
    Ok(Extracted::single(text, false))
}

/// Formats [`stream_text`] reads as a stream.
pub fn is_streamed(kind: DocumentKind) -> bool {
    matches!(
        kind,
        DocumentKind::Text | DocumentKind::Markdown | DocumentKind::Csv | DocumentKind::Json
    )
}

/// Text handed out per piece by [`stream_text`], about.
pub const TEXT_PIECE_BYTES: usize = 256 * 1024;

/// Reads a streamed format ([`is_streamed`]) from `input` and hands its text to `emit` in pieces
/// of about [`TEXT_PIECE_BYTES`], in order: the pieces joined are what [`extract_sync`] returns
/// for the same bytes (`max_text_bytes` is the caller's to count: memory stays bounded either
/// way). Holds at
/// most about `read_bytes` of input and one piece of output, except that a JSON document whose
/// top level is an object is read whole (its keys are sorted) — allowed only when
/// `whole_objects`. An error from `emit` ends the stream and is returned.
pub fn stream_text(
    kind: DocumentKind,
    input: impl Read,
    read_bytes: usize,
    whole_objects: bool,
    emit: &mut dyn FnMut(String) -> Result<(), ExtractError>,
) -> Result<(), ExtractError> {
    match kind {
        DocumentKind::Text | DocumentKind::Markdown => stream_utf8(input, read_bytes, emit),
        DocumentKind::Csv => stream_csv(input, TEXT_PIECE_BYTES, emit),
        DocumentKind::Json => stream_json(input, whole_objects, TEXT_PIECE_BYTES, emit),
        other => Err(ExtractError::Unreadable(format!(
            "{} files cannot be read as a stream",
            parser_name(other)
        ))),
    }
}

/// Fills `buf` unless the input ends first; the bytes read.
fn read_full(input: &mut impl Read, buf: &mut [u8]) -> Result<usize, ExtractError> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ExtractError::Unreadable(format!("reading the file: {e}"))),
        }
    }
    Ok(filled)
}

fn not_utf8(at: u64) -> ExtractError {
    ExtractError::Unreadable(format!(
        "the text is not valid UTF-8 (byte {at}); save it as UTF-8 and upload it again"
    ))
}

/// UTF-8 decoded piece by piece: a BOM dropped, CRLF and CR made LF, a character or a CRLF cut
/// between two reads put back together.
fn stream_utf8(
    mut input: impl Read,
    read_bytes: usize,
    emit: &mut dyn FnMut(String) -> Result<(), ExtractError>,
) -> Result<(), ExtractError> {
    let mut buf = vec![0u8; read_bytes.max(16)];
    // Bytes of the previous read not decoded yet: a cut character, a CR that may start a CRLF.
    let mut carry: Vec<u8> = Vec::new();
    // Input bytes (after the BOM) decoded so far, for error offsets.
    let mut decoded: u64 = 0;
    let mut first = true;
    loop {
        let n = read_full(&mut input, &mut buf)?;
        let end = n < buf.len();
        let mut bytes = std::mem::take(&mut carry);
        bytes.extend_from_slice(&buf[..n]);
        if first {
            if bytes.len() < 3 && !end {
                carry = bytes;
                continue;
            }
            first = false;
            if bytes.starts_with(b"\xEF\xBB\xBF") {
                bytes.drain(..3);
            }
        }
        let mut valid = match std::str::from_utf8(&bytes) {
            Ok(text) => text.len(),
            Err(e) if e.error_len().is_none() && !end => e.valid_up_to(),
            Err(e) => return Err(not_utf8(decoded + e.valid_up_to() as u64)),
        };
        if !end && bytes[..valid].ends_with(b"\r") {
            valid -= 1;
        }
        carry = bytes.split_off(valid);
        decoded += valid as u64;
        let text = String::from_utf8(bytes)
            .map_err(|e| not_utf8(decoded + e.utf8_error().valid_up_to() as u64))?;
        let text = if text.contains('\r') {
            text.replace("\r\n", "\n").replace('\r', "\n")
        } else {
            text
        };
        if !text.is_empty() {
            emit(text)?;
        }
        if end {
            return Ok(());
        }
    }
}

/// Paragraphs handed out joined by blank lines, in pieces of at least `flush_at` bytes.
struct Paragraphs<'a> {
    emit: &'a mut dyn FnMut(String) -> Result<(), ExtractError>,
    pending: String,
    any: bool,
    flush_at: usize,
}

impl<'a> Paragraphs<'a> {
    fn new(flush_at: usize, emit: &'a mut dyn FnMut(String) -> Result<(), ExtractError>) -> Self {
        Paragraphs {
            emit,
            pending: String::new(),
            any: false,
            flush_at,
        }
    }

    fn push(&mut self, paragraph: &str) -> Result<(), ExtractError> {
        if self.any {
            self.pending.push_str("\n\n");
        }
        self.pending.push_str(paragraph);
        self.any = true;
        if self.pending.len() >= self.flush_at {
            (self.emit)(std::mem::take(&mut self.pending))?;
        }
        Ok(())
    }

    fn finish(mut self) -> Result<(), ExtractError> {
        if !self.pending.is_empty() {
            (self.emit)(std::mem::take(&mut self.pending))?;
        }
        Ok(())
    }
}

/// One paragraph per record, `header: value; …`.
fn stream_csv(
    input: impl Read,
    flush_at: usize,
    emit: &mut dyn FnMut(String) -> Result<(), ExtractError>,
) -> Result<(), ExtractError> {
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .has_headers(true)
        .from_reader(input);
    let headers: Vec<String> = reader
        .headers()
        .map_err(|e| ExtractError::Unreadable(format!("unreadable CSV header: {e}")))?
        .iter()
        .map(|h| h.trim().to_owned())
        .collect();
    let mut out = Paragraphs::new(flush_at, emit);
    let mut record = csv::StringRecord::new();
    let mut row = 1;
    loop {
        row += 1;
        let more = reader
            .read_record(&mut record)
            .map_err(|e| ExtractError::Unreadable(format!("unreadable CSV row {row}: {e}")))?;
        if !more {
            break;
        }
        let fields: Vec<String> = record
            .iter()
            .enumerate()
            .filter(|(_, v)| !v.trim().is_empty())
            .map(|(j, v)| match headers.get(j).filter(|h| !h.is_empty()) {
                Some(h) => format!("{h}: {}", v.trim()),
                None => v.trim().to_owned(),
            })
            .collect();
        if !fields.is_empty() {
            out.push(&fields.join("; "))?;
        }
    }
    out.finish()
}

/// One paragraph per top-level entry, `path.to[0].key: value` lines. A top-level array is read
/// an element at a time; a top-level object whole (when `whole_objects`), its keys sorted.
fn stream_json(
    input: impl Read,
    whole_objects: bool,
    flush_at: usize,
    emit: &mut dyn FnMut(String) -> Result<(), ExtractError>,
) -> Result<(), ExtractError> {
    let mut out = Paragraphs::new(flush_at, emit);
    let mut failure = None;
    let mut de = serde_json::Deserializer::from_reader(std::io::BufReader::new(input));
    let top = JsonTop {
        out: &mut out,
        whole_objects,
        failure: &mut failure,
    };
    let parsed = serde::de::DeserializeSeed::deserialize(top, &mut de).and_then(|()| de.end());
    if let Some(failure) = failure {
        return Err(failure);
    }
    parsed.map_err(|e| ExtractError::Unreadable(format!("unreadable JSON: {e}")))?;
    out.finish()
}

/// The top level of a streamed JSON document.
struct JsonTop<'a, 'b> {
    out: &'a mut Paragraphs<'b>,
    whole_objects: bool,
    /// Why `emit` stopped the parse (a serde error cannot carry it).
    failure: &'a mut Option<ExtractError>,
}

impl JsonTop<'_, '_> {
    fn entry<E: serde::de::Error>(
        &mut self,
        path: &str,
        value: &serde_json::Value,
    ) -> Result<(), E> {
        let mut lines = Vec::new();
        flatten(path, value, &mut lines);
        if lines.is_empty() {
            return Ok(());
        }
        self.out.push(&lines.join("\n")).map_err(|e| {
            *self.failure = Some(e);
            E::custom("stopped")
        })
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for JsonTop<'_, '_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
        de.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for JsonTop<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0usize;
        while let Some(item) = seq.next_element::<serde_json::Value>()? {
            self.entry(&format!("[{i}]"), &item)?;
            i += 1;
        }
        Ok(())
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        if !self.whole_objects {
            *self.failure = Some(ExtractError::Unreadable(
                "a JSON object is read whole, and this one is larger than documents of its kind \
                 may be; upload its records as a JSON array, which is read piece by piece"
                    .into(),
            ));
            return Err(serde::de::Error::custom("too large"));
        }
        let mut entries = std::collections::BTreeMap::new();
        while let Some((key, value)) = map.next_entry::<String, serde_json::Value>()? {
            entries.insert(key, value);
        }
        for (key, value) in &entries {
            self.entry(key, value)?;
        }
        Ok(())
    }

    fn visit_bool<E: serde::de::Error>(mut self, v: bool) -> Result<(), E> {
        self.entry("", &serde_json::Value::Bool(v))
    }
    fn visit_i64<E: serde::de::Error>(mut self, v: i64) -> Result<(), E> {
        self.entry("", &serde_json::Value::from(v))
    }
    fn visit_u64<E: serde::de::Error>(mut self, v: u64) -> Result<(), E> {
        self.entry("", &serde_json::Value::from(v))
    }
    fn visit_f64<E: serde::de::Error>(mut self, v: f64) -> Result<(), E> {
        self.entry("", &serde_json::Value::from(v))
    }
    fn visit_str<E: serde::de::Error>(mut self, v: &str) -> Result<(), E> {
        self.entry("", &serde_json::Value::from(v))
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        Ok(())
    }
}

/// `path: value` lines for every leaf under `value`.
fn flatten(path: &str, value: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value;
    let line = |v: String| {
        if path.is_empty() {
            v
        } else {
            format!("{path}: {v}")
        }
    };
    match value {
        Value::Object(map) => {
            for (key, item) in map {
                let child = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                flatten(&child, item, out);
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                flatten(&format!("{path}[{i}]"), item, out);
            }
        }
        Value::String(s) => out.push(line(s.clone())),
        Value::Null => {}
        other => out.push(line(other.to_string())),
    }
}

fn pdf(bytes: &[u8]) -> Result<Extracted, ExtractError> {
    let pages = pdf_extract::extract_text_from_mem_by_pages(bytes)
        .map_err(|e| ExtractError::Unreadable(format!("unreadable PDF: {e}")))?;
    if pages.is_empty() {
        return Err(ExtractError::Unreadable(
            "unreadable PDF: no pages could be read".into(),
        ));
    }
    Ok(Extracted {
        pages: pages
            .into_iter()
            .enumerate()
            .map(|(i, text)| ExtractedPage {
                number: u32::try_from(i + 1).ok(),
                text: text.replace("\r\n", "\n"),
            })
            .collect(),
        headings: false,
    })
}

/// At most this many entries in a DOCX.
const DOCX_MAX_ENTRIES: usize = 10_000;
/// Above this size, an entry must not expand more than [`DOCX_MAX_RATIO`] times.
const DOCX_RATIO_FLOOR: u64 = 1024 * 1024;
const DOCX_MAX_RATIO: u64 = 100;

fn docx(bytes: &[u8], limit: usize) -> Result<Extracted, ExtractError> {
    let mut archive = zip::ZipArchive::new(Cursor::new(bytes))
        .map_err(|e| ExtractError::Unreadable(format!("unreadable DOCX (ZIP): {e}")))?;
    if archive.len() > DOCX_MAX_ENTRIES {
        return Err(ExtractError::ZipBomb(format!(
            "{} entries (at most {DOCX_MAX_ENTRIES})",
            archive.len()
        )));
    }
    // The XML is at most a few times the text it holds; the cap on the whole archive's declared
    // size is generous for real documents and small for bombs.
    let cap = (limit as u64).saturating_mul(4);
    let mut declared: u64 = 0;
    for i in 0..archive.len() {
        let entry = archive
            .by_index_raw(i)
            .map_err(|e| ExtractError::Unreadable(format!("unreadable DOCX entry: {e}")))?;
        declared = declared.saturating_add(entry.size());
        if entry.size() > DOCX_RATIO_FLOOR
            && entry.size() / entry.compressed_size().max(1) > DOCX_MAX_RATIO
        {
            return Err(ExtractError::ZipBomb(format!(
                "`{}` expands {} times ({} bytes from {})",
                entry.name().unwrap_or_default(),
                entry.size() / entry.compressed_size().max(1),
                entry.size(),
                entry.compressed_size()
            )));
        }
    }
    if declared > cap {
        return Err(ExtractError::ZipBomb(format!(
            "the archive expands to {declared} bytes (at most {cap})"
        )));
    }
    let entry = archive.by_name("word/document.xml").map_err(|_| {
        ExtractError::Unreadable("not a Word document: word/document.xml is missing".into())
    })?;
    // Declared sizes can lie: read no more than the cap, whatever the header says.
    let mut xml = Vec::new();
    entry
        .take(cap + 1)
        .read_to_end(&mut xml)
        .map_err(|e| ExtractError::Unreadable(format!("unreadable DOCX: {e}")))?;
    if xml.len() as u64 > cap {
        return Err(ExtractError::ZipBomb(format!(
            "word/document.xml expands beyond {cap} bytes"
        )));
    }
    let text = docx_paragraphs(&xml, limit)?;
    Ok(Extracted::single(text, true))
}

/// Paragraphs of `word/document.xml`, headings (`Heading1`…`Heading9`, `Title`) as `#` lines.
fn docx_paragraphs(xml: &[u8], limit: usize) -> Result<String, ExtractError> {
    use quick_xml::events::Event;

    let bad = |e: &dyn std::fmt::Display| {
        ExtractError::Unreadable(format!("unreadable DOCX: word/document.xml: {e}"))
    };
    let mut reader = quick_xml::Reader::from_reader(xml);
    let mut buf = Vec::new();
    let mut out = String::new();
    let mut paragraph = String::new();
    let mut heading: Option<usize> = None;
    let mut in_text = false;
    loop {
        match reader.read_event_into(&mut buf).map_err(|e| bad(&e))? {
            Event::Start(e) | Event::Empty(e) => match e.name().as_ref() {
                b"w:p" => {
                    paragraph.clear();
                    heading = None;
                }
                b"w:t" => in_text = true,
                b"w:tab" => paragraph.push('\t'),
                b"w:br" | b"w:cr" => paragraph.push('\n'),
                b"w:pStyle" => {
                    for attr in e.attributes().flatten() {
                        if attr.key.as_ref() == b"w:val" {
                            heading = heading_level(&String::from_utf8_lossy(&attr.value));
                        }
                    }
                }
                _ => {}
            },
            Event::Text(t) if in_text => {
                paragraph.push_str(&t.decode().map_err(|e| bad(&e))?);
            }
            Event::CData(t) if in_text => {
                paragraph.push_str(&t.decode().map_err(|e| bad(&e))?);
            }
            Event::GeneralRef(r) if in_text => {
                if let Some(c) = r.resolve_char_ref().map_err(|e| bad(&e))? {
                    paragraph.push(c);
                } else {
                    let name = r.decode().map_err(|e| bad(&e))?;
                    paragraph.push_str(match name.as_ref() {
                        "amp" => "&",
                        "lt" => "<",
                        "gt" => ">",
                        "quot" => "\"",
                        "apos" => "'",
                        _ => "",
                    });
                }
            }
            Event::End(e) => match e.name().as_ref() {
                b"w:t" => in_text = false,
                b"w:p" => {
                    let text = paragraph.trim();
                    if !text.is_empty() {
                        if !out.is_empty() {
                            out.push_str("\n\n");
                        }
                        if let Some(level) = heading {
                            out.push_str(&"#".repeat(level));
                            out.push(' ');
                            out.push_str(&text.replace('\n', " "));
                        } else {
                            out.push_str(text);
                        }
                        if out.len() > limit {
                            return Err(ExtractError::TooLarge { limit });
                        }
                    }
                    paragraph.clear();
                }
                _ => {}
            },
            Event::Eof => break,
            _ => {}
        }
        buf.clear();
    }
    Ok(out)
}

fn heading_level(style: &str) -> Option<usize> {
    if style.eq_ignore_ascii_case("title") {
        return Some(1);
    }
    let digits = style
        .strip_prefix("Heading")
        .or_else(|| style.strip_prefix("heading"))?;
    match digits.parse::<usize>() {
        Ok(level @ 1..=6) => Some(level),
        Ok(7..=9) => Some(6),
        _ => None,
    }
}

/// Runs `f` on a fresh thread with a large stack (deeply nested input recurses), catching a
/// panic and giving up after `timeout`.
pub async fn run_isolated<T, F>(
    parser: &'static str,
    timeout: Duration,
    f: F,
) -> Result<T, ExtractError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    const STACK: usize = 64 * 1024 * 1024;
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("chorus-extract".into())
        .stack_size(STACK)
        .spawn(move || {
            let result = std::panic::catch_unwind(AssertUnwindSafe(f));
            let _ = tx.send(result);
        })
        .map_err(|e| ExtractError::Unreadable(format!("starting the {parser} parser: {e}")))?;
    match tokio::time::timeout(timeout, rx).await {
        Err(_) => Err(ExtractError::TimedOut(timeout)),
        Ok(Err(_)) => Err(ExtractError::Panicked(
            parser,
            "the parser thread ended".into(),
        )),
        Ok(Ok(Ok(value))) => Ok(value),
        Ok(Ok(Err(panic))) => Err(ExtractError::Panicked(parser, panic_message(&*panic))),
    }
}

/// What a caught panic said.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

// ---- OCR ----

/// `program` as a runnable path: a path as given when it exists, else looked up on `PATH`.
pub fn find_program(program: &str) -> Option<PathBuf> {
    if program.is_empty() {
        return None;
    }
    let as_path = Path::new(program);
    if as_path.components().count() > 1 {
        return as_path.is_file().then(|| as_path.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

async fn ocr(
    kind: DocumentKind,
    bytes: &[u8],
    config: &ExtractConfig,
) -> Result<Extracted, ExtractError> {
    let what = if kind == DocumentKind::Pdf {
        "no text layer"
    } else {
        "an image has no text layer"
    };
    let Some(tesseract) = find_program(&config.tesseract) else {
        return Err(ExtractError::NoText(format!(
            "{what}; OCR needs tesseract-ocr installed"
        )));
    };
    let pdftoppm = if kind == DocumentKind::Pdf {
        Some(find_program(&config.pdftoppm).ok_or_else(|| {
            ExtractError::NoText(format!(
                "{what}; OCR of PDFs needs poppler-utils (pdftoppm) installed besides tesseract-ocr"
            ))
        })?)
    } else {
        None
    };
    let dir = std::env::temp_dir().join(format!("chorus-ocr-{}", uuid::Uuid::new_v4()));
    let result = tokio::time::timeout(
        config.timeout,
        ocr_in(&dir, bytes, &tesseract, pdftoppm.as_deref()),
    )
    .await
    .unwrap_or(Err(ExtractError::TimedOut(config.timeout)));
    let _ = tokio::fs::remove_dir_all(&dir).await;
    result
}

async fn ocr_in(
    dir: &Path,
    bytes: &[u8],
    tesseract: &Path,
    pdftoppm: Option<&Path>,
) -> Result<Extracted, ExtractError> {
    let io = |e: std::io::Error| ExtractError::Ocr(e.to_string());
    tokio::fs::create_dir_all(dir).await.map_err(io)?;
    let input = dir.join("input");
    tokio::fs::write(&input, bytes).await.map_err(io)?;
    let images = match pdftoppm {
        None => vec![(None, input)],
        Some(pdftoppm) => {
            run(
                pdftoppm,
                &["-r", "200", "-png"],
                &[&input, &dir.join("page")],
            )
            .await?;
            let mut pages = Vec::new();
            let mut entries = tokio::fs::read_dir(dir).await.map_err(io)?;
            while let Some(entry) = entries.next_entry().await.map_err(io)? {
                let name = entry.file_name().to_string_lossy().into_owned();
                // pdftoppm names pages page-1.png, page-01.png, … by page count.
                if let Some(n) = name
                    .strip_prefix("page-")
                    .and_then(|rest| rest.strip_suffix(".png"))
                    .and_then(|n| n.parse::<u32>().ok())
                {
                    pages.push((Some(n), entry.path()));
                }
            }
            pages.sort_by_key(|(n, _)| *n);
            pages
        }
    };
    let mut pages = Vec::new();
    for (number, image) in images {
        let text = run(tesseract, &[], &[&image, Path::new("stdout")]).await?;
        pages.push(ExtractedPage {
            number,
            text: String::from_utf8_lossy(&text).replace("\r\n", "\n"),
        });
    }
    Ok(Extracted {
        pages,
        headings: false,
    })
}

/// Runs a tool, returning its stdout; a failure carries the end of its stderr.
async fn run(program: &Path, flags: &[&str], paths: &[&Path]) -> Result<Vec<u8>, ExtractError> {
    let output = tokio::process::Command::new(program)
        .args(flags)
        .args(paths)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| ExtractError::Ocr(format!("running {}: {e}", program.display())))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: String = stderr
            .chars()
            .rev()
            .take(300)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        return Err(ExtractError::Ocr(format!(
            "{} exited with {}: {}",
            program.display(),
            output.status,
            tail.trim()
        )));
    }
    Ok(output.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(e: Extracted) -> String {
        assert_eq!(e.pages.len(), 1);
        e.pages.into_iter().next().unwrap().text
    }

    #[test]
    fn text_normalises_line_ends_and_drops_the_bom() {
        let e = extract_sync(DocumentKind::Text, b"\xEF\xBB\xBFa\r\nb\rc", 100).unwrap();
        assert!(!e.headings);
        assert_eq!(one(e), "a\nb\nc");
        let err = extract_sync(DocumentKind::Markdown, b"ok \xFF", 100).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the text is not valid UTF-8 (byte 3); save it as UTF-8 and upload it again"
        );
    }

    #[test]
    fn html_keeps_text_and_headings_only() {
        let html = b"<html><head><title>T</title><style>p{color:red}</style>\
            <script>var x = 1;</script></head><body><h1>Guide</h1><p>First <b>bold</b> \
            <a href='https://x'>link</a>.</p><h2>Setup</h2><p>Second.</p></body></html>";
        let e = extract_sync(DocumentKind::Html, html, 10_000).unwrap();
        assert!(e.headings);
        let text = one(e);
        // Link texts keep html2text's brackets; URLs, scripts and styles are dropped.
        assert_eq!(text, "# Guide\n\nFirst bold [link].\n\n## Setup\n\nSecond.");
    }

    #[test]
    fn csv_rows_become_paragraphs() {
        let csv = b"name,role,team\nAda,engineer,core\n\nGrace,,compilers\n";
        let text = one(extract_sync(DocumentKind::Csv, csv, 10_000).unwrap());
        assert_eq!(
            text,
            "name: Ada; role: engineer; team: core\n\nname: Grace; team: compilers"
        );
    }

    #[test]
    fn json_is_flattened_per_entry() {
        let json =
            br#"[{"name":"Ada","langs":["en","fr"],"meta":{"age":36,"x":null}},{"name":"Bo"}]"#;
        let text = one(extract_sync(DocumentKind::Json, json, 10_000).unwrap());
        assert_eq!(
            text,
            "[0].langs[0]: en\n[0].langs[1]: fr\n[0].meta.age: 36\n[0].name: Ada\n\n[1].name: Bo"
        );
        let err = extract_sync(DocumentKind::Json, b"{\"a\":", 100).unwrap_err();
        assert!(err.to_string().starts_with("unreadable JSON"), "{err}");
        assert_eq!(
            extract_sync(DocumentKind::Json, br#"{"a":"xxxxxxxxxx"}"#, 5).unwrap_err(),
            ExtractError::TooLarge { limit: 5 }
        );
    }

    fn docx_bytes(document_xml: &[u8], method: zip::CompressionMethod) -> Vec<u8> {
        use std::io::Write;
        let mut out = Cursor::new(Vec::new());
        let mut zip = zip::ZipWriter::new(&mut out);
        let options = zip::write::SimpleFileOptions::default().compression_method(method);
        zip.start_file("[Content_Types].xml", options).unwrap();
        zip.write_all(b"<Types/>").unwrap();
        zip.start_file("word/document.xml", options).unwrap();
        zip.write_all(document_xml).unwrap();
        zip.finish().unwrap();
        out.into_inner()
    }

    #[test]
    fn docx_paragraphs_and_headings() {
        let xml = br#"<?xml version="1.0"?><w:document xmlns:w="x"><w:body>
            <w:p><w:pPr><w:pStyle w:val="Heading1"/></w:pPr><w:r><w:t>Intro</w:t></w:r></w:p>
            <w:p><w:r><w:t xml:space="preserve">Tom &amp; Jerry </w:t></w:r><w:r><w:t>run</w:t><w:tab/><w:t>fast.</w:t></w:r></w:p>
            <w:p></w:p>
            <w:p><w:pPr><w:pStyle w:val="Heading2"/></w:pPr><w:r><w:t>Details</w:t></w:r></w:p>
            <w:p><w:r><w:t>Line</w:t><w:br/><w:t>two &#233;</w:t></w:r></w:p>
            </w:body></w:document>"#;
        let bytes = docx_bytes(xml, zip::CompressionMethod::Deflated);
        let e = extract_sync(DocumentKind::Docx, &bytes, 10_000).unwrap();
        assert!(e.headings);
        assert_eq!(
            one(e),
            "# Intro\n\nTom & Jerry run\tfast.\n\n## Details\n\nLine\ntwo é"
        );
    }

    #[test]
    fn docx_bombs_and_impostors_fail() {
        // 64 MiB of one byte, deflated to ~64 KiB: far beyond the ratio.
        let body = vec![b'a'; 64 * 1024 * 1024];
        let bomb = docx_bytes(&body, zip::CompressionMethod::Deflated);
        let err = extract_sync(DocumentKind::Docx, &bomb, 1_000_000_000).unwrap_err();
        assert!(matches!(err, ExtractError::ZipBomb(_)), "{err}");
        // Within the ratio but beyond the size cap (4 × the text limit).
        let stored = docx_bytes(&[b'a'; 5000], zip::CompressionMethod::Stored);
        let err = extract_sync(DocumentKind::Docx, &stored, 1000).unwrap_err();
        assert!(matches!(err, ExtractError::ZipBomb(_)), "{err}");
        let err = extract_sync(DocumentKind::Docx, b"PK\x03\x04garbage", 1000).unwrap_err();
        assert!(err.to_string().starts_with("unreadable DOCX"), "{err}");
    }

    #[test]
    fn heading_styles() {
        assert_eq!(heading_level("Heading1"), Some(1));
        assert_eq!(heading_level("heading3"), Some(3));
        assert_eq!(heading_level("Heading9"), Some(6));
        assert_eq!(heading_level("Title"), Some(1));
        assert_eq!(heading_level("Normal"), None);
        assert_eq!(heading_level("HeadingX"), None);
    }

    #[tokio::test]
    async fn a_panicking_parser_is_an_error_not_a_crash() {
        let err = run_isolated("test", Duration::from_secs(5), || -> u32 {
            panic!("boom at offset 7")
        })
        .await
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "the test parser crashed on this file: boom at offset 7"
        );
        let slow = run_isolated("test", Duration::from_millis(50), || {
            std::thread::sleep(Duration::from_millis(500));
        })
        .await
        .unwrap_err();
        assert!(matches!(slow, ExtractError::TimedOut(_)));
    }

    #[tokio::test]
    async fn images_without_tesseract_fail_with_the_reason() {
        let config = ExtractConfig {
            tesseract: "/nonexistent/tesseract".into(),
            ..ExtractConfig::default()
        };
        let err = extract(
            DocumentKind::Png,
            Bytes::from_static(b"\x89PNG\r\n\x1a\n"),
            &config,
        )
        .await
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "an image has no text layer; OCR needs tesseract-ocr installed"
        );
    }

    #[test]
    fn programs_are_found_on_the_path_or_by_path() {
        assert!(find_program("sh").is_some());
        assert!(find_program("/bin/sh").is_some() || find_program("/usr/bin/sh").is_some());
        assert_eq!(find_program("definitely-not-a-program-xyz"), None);
        assert_eq!(find_program("/nonexistent/tesseract"), None);
        assert_eq!(find_program(""), None);
    }

    /// Hands out a few bytes per read, so characters and CRLFs are cut between reads.
    struct Trickle<'a> {
        bytes: &'a [u8],
        step: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.step = self.step % 7 + 1;
            let n = self.step.min(buf.len()).min(self.bytes.len());
            buf[..n].copy_from_slice(&self.bytes[..n]);
            self.bytes = &self.bytes[n..];
            Ok(n)
        }
    }

    fn streamed(
        kind: DocumentKind,
        bytes: &[u8],
        whole_objects: bool,
    ) -> Result<(String, usize), ExtractError> {
        let mut out = String::new();
        let mut pieces = 0;
        stream_text(
            kind,
            Trickle { bytes, step: 0 },
            16,
            whole_objects,
            &mut |piece| {
                out.push_str(&piece);
                pieces += 1;
                Ok(())
            },
        )?;
        Ok((out, pieces))
    }

    #[test]
    fn streamed_text_is_the_whole_text() {
        let mut csv = String::from("name,note\n");
        let mut json = String::from("[");
        for i in 0..3000 {
            csv.push_str(&format!("n{i},\"é, {i}\"\n"));
            json.push_str(&format!(
                "{}{{\"id\":{i},\"tags\":[\"ü\",null]}}",
                if i > 0 { "," } else { "" }
            ));
        }
        json.push(']');
        let text = "\u{FEFF}ab\r\ncd\ré€𝄞 x\r\n\r\nend".repeat(50);
        let cases: [(DocumentKind, &[u8]); 6] = [
            (DocumentKind::Text, text.as_bytes()),
            (DocumentKind::Markdown, b"# T\r\n\r\nbody"),
            (DocumentKind::Csv, csv.as_bytes()),
            (DocumentKind::Json, json.as_bytes()),
            (DocumentKind::Json, br#"{"b": [1, 2], "a": {"x": "y"}}"#),
            (DocumentKind::Json, b" 42 "),
        ];
        for (kind, bytes) in cases {
            let (text, pieces) = streamed(kind, bytes, true).unwrap();
            assert_eq!(
                text,
                one(extract_sync(kind, bytes, usize::MAX).unwrap()),
                "{kind:?}"
            );
            if bytes.len() > 100_000 {
                assert!(pieces > 1, "{kind:?} in pieces");
            }
        }
        // A BOM is dropped only at the start.
        let (text, _) = streamed(DocumentKind::Text, "\u{FEFF}a\u{FEFF}".as_bytes(), true).unwrap();
        assert_eq!(text, "a\u{FEFF}");
    }

    #[test]
    fn streamed_failures_say_why() {
        let mut bytes = "ok ".repeat(40).into_bytes();
        bytes.extend_from_slice(b"\xFF rest");
        let err = streamed(DocumentKind::Text, &bytes, true).unwrap_err();
        assert_eq!(
            err,
            extract_sync(DocumentKind::Text, &bytes, usize::MAX).unwrap_err()
        );
        assert!(err.to_string().contains("byte 120"), "{err}");
        // A character cut off at the very end is invalid too.
        let err = streamed(DocumentKind::Text, b"abc\xE2\x82", true).unwrap_err();
        assert!(err.to_string().contains("byte 3"), "{err}");
        let err = streamed(DocumentKind::Json, b"[1, 2", true).unwrap_err();
        assert!(err.to_string().starts_with("unreadable JSON"), "{err}");
        let err = streamed(DocumentKind::Json, b"[1] [2]", true).unwrap_err();
        assert!(err.to_string().starts_with("unreadable JSON"), "{err}");
        // An object too large to be read whole, and what stops the consumer, stop the parse.
        let err = streamed(DocumentKind::Json, br#"{"a": 1}"#, false).unwrap_err();
        assert!(err.to_string().contains("JSON array"), "{err}");
        let mut calls = 0;
        let err = stream_text(DocumentKind::Json, &b"[1, 2, 3]"[..], 16, true, &mut |_| {
            calls += 1;
            Err(ExtractError::Stopped)
        })
        .unwrap_err();
        assert_eq!((err, calls), (ExtractError::Stopped, 1));
        let err = streamed(DocumentKind::Pdf, b"%PDF", true).unwrap_err();
        assert!(
            err.to_string().contains("cannot be read as a stream"),
            "{err}"
        );
    }
}
