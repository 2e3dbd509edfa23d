//! What an upload is, from its bytes and its name, decided while it streams in.
//!
//! The content decides the family: `%PDF-` is a PDF, a ZIP holding `word/document.xml` is a Word
//! document, PNG/JPEG/TIFF signatures are images (read by OCR), and anything else must be UTF-8
//! text without NUL bytes. The name's extension then picks the text format (Markdown, HTML, CSV,
//! JSON, else plain text), and must not claim a binary format the content is not — a `.pdf` that
//! is not a PDF is refused rather than guessed at.
//!
//! [`Sniffer`] sees every byte once, in chunks, and keeps O(1) state: the first bytes, a UTF-8
//! validator carrying at most three bytes across chunks, and a 16-byte window for finding
//! `word/document.xml` among the ZIP's local file headers (file names are stored uncompressed).

use serde::{Deserialize, Serialize};

/// A format the indexer can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DocumentKind {
    Text,
    Markdown,
    Html,
    Csv,
    Json,
    Pdf,
    Docx,
    Png,
    Jpeg,
    Tiff,
}

pub const DOCX_MIME: &str =
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document";

impl DocumentKind {
    pub fn mime(self) -> &'static str {
        match self {
            DocumentKind::Text => "text/plain",
            DocumentKind::Markdown => "text/markdown",
            DocumentKind::Html => "text/html",
            DocumentKind::Csv => "text/csv",
            DocumentKind::Json => "application/json",
            DocumentKind::Pdf => "application/pdf",
            DocumentKind::Docx => DOCX_MIME,
            DocumentKind::Png => "image/png",
            DocumentKind::Jpeg => "image/jpeg",
            DocumentKind::Tiff => "image/tiff",
        }
    }

    /// The kind a stored `mime` names.
    pub fn from_mime(mime: &str) -> Option<DocumentKind> {
        [
            DocumentKind::Text,
            DocumentKind::Markdown,
            DocumentKind::Html,
            DocumentKind::Csv,
            DocumentKind::Json,
            DocumentKind::Pdf,
            DocumentKind::Docx,
            DocumentKind::Png,
            DocumentKind::Jpeg,
            DocumentKind::Tiff,
        ]
        .into_iter()
        .find(|k| k.mime() == mime)
    }

    pub fn is_image(self) -> bool {
        matches!(
            self,
            DocumentKind::Png | DocumentKind::Jpeg | DocumentKind::Tiff
        )
    }
}

/// Why an upload cannot be read (the edge answers 415 with this message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unsupported(pub String);

/// What the formats are, for error messages.
pub const SUPPORTED: &str = "plain text, Markdown, HTML, CSV, JSON (UTF-8), PDF, DOCX, \
                             PNG/JPEG/TIFF images (OCR)";

const HEAD_BYTES: usize = 8192;
const DOCX_MARKER: &[u8] = b"word/document.xml";

/// Watches an upload's bytes go by; [`Sniffer::finish`] names its kind.
#[derive(Debug, Default)]
pub struct Sniffer {
    head: Vec<u8>,
    total: u64,
    /// Bytes of an incomplete UTF-8 sequence at the end of the last chunk.
    utf8_carry: Vec<u8>,
    /// Offset of the first byte that is not UTF-8 text (invalid, or NUL).
    not_text_at: Option<u64>,
    /// The last bytes seen, so a marker split across chunks is still found.
    window: Vec<u8>,
    docx_marker: bool,
}

impl Sniffer {
    pub fn new() -> Sniffer {
        Sniffer::default()
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        if self.head.len() < HEAD_BYTES {
            let take = (HEAD_BYTES - self.head.len()).min(chunk.len());
            self.head.extend_from_slice(&chunk[..take]);
        }
        if self.not_text_at.is_none() {
            self.check_text(chunk);
        }
        if !self.docx_marker && self.head.starts_with(b"PK\x03\x04") {
            self.window.extend_from_slice(chunk);
            if self
                .window
                .windows(DOCX_MARKER.len())
                .any(|w| w == DOCX_MARKER)
            {
                self.docx_marker = true;
            }
            let keep = DOCX_MARKER.len() - 1;
            if self.window.len() > keep {
                self.window.drain(..self.window.len() - keep);
            }
        }
        self.total += chunk.len() as u64;
    }

    fn check_text(&mut self, chunk: &[u8]) {
        let base = self.total - self.utf8_carry.len() as u64;
        let mut bytes = std::mem::take(&mut self.utf8_carry);
        bytes.extend_from_slice(chunk);
        if let Some(nul) = bytes.iter().position(|b| *b == 0) {
            self.not_text_at = Some(base + nul as u64);
            return;
        }
        match std::str::from_utf8(&bytes) {
            Ok(_) => {}
            Err(e) if e.error_len().is_none() => {
                // An incomplete sequence at the end: judged with the next chunk.
                self.utf8_carry = bytes[e.valid_up_to()..].to_vec();
            }
            Err(e) => self.not_text_at = Some(base + e.valid_up_to() as u64),
        }
    }

    /// Bytes seen.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The kind of the whole upload named `name`.
    pub fn finish(self, name: &str) -> Result<DocumentKind, Unsupported> {
        let ext = extension(name);
        let head = &self.head;
        let binary = if head.starts_with(b"%PDF-") {
            Some(DocumentKind::Pdf)
        } else if head.starts_with(b"PK\x03\x04") {
            if !self.docx_marker {
                return Err(Unsupported(
                    "a ZIP archive that is not a Word document (.docx has word/document.xml); \
                     supported: "
                        .to_owned()
                        + SUPPORTED,
                ));
            }
            Some(DocumentKind::Docx)
        } else if head.starts_with(b"\x89PNG\r\n\x1a\n") {
            Some(DocumentKind::Png)
        } else if head.starts_with(b"\xFF\xD8\xFF") {
            Some(DocumentKind::Jpeg)
        } else if head.starts_with(b"II*\0") || head.starts_with(b"MM\0*") {
            Some(DocumentKind::Tiff)
        } else {
            None
        };
        if let Some(kind) = binary {
            return Ok(kind);
        }
        // Not a known binary format: it must be text, and not named like one.
        let claimed = match ext.as_str() {
            "pdf" => Some("PDF"),
            "docx" => Some("Word document"),
            "png" | "jpg" | "jpeg" | "tif" | "tiff" => Some("image"),
            "doc" | "xls" | "xlsx" | "ppt" | "pptx" | "odt" | "rtf" | "zip" | "gz" | "exe" => {
                return Err(Unsupported(format!(
                    "`.{ext}` files cannot be read; supported: {SUPPORTED}"
                )));
            }
            _ => None,
        };
        if let Some(claimed) = claimed {
            return Err(Unsupported(format!(
                "the file is named `.{ext}` but its content is not a {claimed}"
            )));
        }
        let not_text = self
            .not_text_at
            .or_else(|| (!self.utf8_carry.is_empty()).then_some(self.total));
        if let Some(at) = not_text {
            return Err(Unsupported(format!(
                "not a readable format: the content is neither a known binary format nor UTF-8 \
                 text (byte {at}); supported: {SUPPORTED}"
            )));
        }
        Ok(match ext.as_str() {
            "md" | "markdown" | "mdown" | "mkd" => DocumentKind::Markdown,
            "html" | "htm" | "xhtml" => DocumentKind::Html,
            "csv" => DocumentKind::Csv,
            "json" => DocumentKind::Json,
            _ => DocumentKind::Text,
        })
    }
}

/// The lower-cased extension of a file name (empty when none).
fn extension(name: &str) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or(name);
    match base.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() => ext.to_ascii_lowercase(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sniff(chunks: &[&[u8]], name: &str) -> Result<DocumentKind, Unsupported> {
        let mut s = Sniffer::new();
        for c in chunks {
            s.feed(c);
        }
        s.finish(name)
    }

    #[test]
    fn text_formats_come_from_the_extension() {
        assert_eq!(sniff(&[b"# Title"], "a.md"), Ok(DocumentKind::Markdown));
        assert_eq!(sniff(&[b"<p>x</p>"], "A.HTML"), Ok(DocumentKind::Html));
        assert_eq!(sniff(&[b"a,b\n1,2"], "t.csv"), Ok(DocumentKind::Csv));
        assert_eq!(sniff(&[b"{}"], "x.json"), Ok(DocumentKind::Json));
        assert_eq!(sniff(&[b"hello"], "notes"), Ok(DocumentKind::Text));
        assert_eq!(sniff(&[b"hello"], ".bashrc"), Ok(DocumentKind::Text));
        assert_eq!(sniff(&[b"fn main() {}"], "main.rs"), Ok(DocumentKind::Text));
    }

    #[test]
    fn binary_formats_come_from_the_content() {
        assert_eq!(sniff(&[b"%PDF-1.4\n..."], "x.txt"), Ok(DocumentKind::Pdf));
        assert_eq!(
            sniff(&[b"\x89PNG\r\n\x1a\n\0\0"], "scan"),
            Ok(DocumentKind::Png)
        );
        assert_eq!(
            sniff(&[b"\xFF\xD8\xFF\xE0"], "a.jpg"),
            Ok(DocumentKind::Jpeg)
        );
    }

    #[test]
    fn docx_needs_its_document_part_even_split_across_chunks() {
        let docx = sniff(
            &[
                b"PK\x03\x04....[Content_Types].xmlPK\x03\x04..wor",
                b"d/docu",
                b"ment.xml..",
            ],
            "a.docx",
        );
        assert_eq!(docx, Ok(DocumentKind::Docx));
        let zip = sniff(&[b"PK\x03\x04....other.txt"], "a.docx").unwrap_err();
        assert!(zip.0.contains("not a Word document"), "{zip}");
    }

    #[test]
    fn utf8_is_checked_across_chunk_boundaries() {
        let e_acute = "é".as_bytes();
        assert_eq!(
            sniff(&[b"caf", &e_acute[..1], &e_acute[1..], b" ok"], "a.txt"),
            Ok(DocumentKind::Text)
        );
        // Latin-1 `é` is not UTF-8.
        let err = sniff(&[b"caf\xE9 au lait"], "a.txt").unwrap_err();
        assert!(err.0.contains("byte 3"), "{err}");
        // A sequence cut off by the end of the file.
        assert!(sniff(&[b"abc", &e_acute[..1]], "a.txt").is_err());
        let nul = sniff(&[b"abc", b"d\0e"], "a.txt").unwrap_err();
        assert!(nul.0.contains("byte 4"), "{nul}");
    }

    #[test]
    fn names_must_not_claim_what_the_content_is_not() {
        let err = sniff(&[b"just text"], "report.pdf").unwrap_err();
        assert!(err.0.contains("`.pdf`"), "{err}");
        assert!(sniff(&[b"text"], "sheet.xlsx").is_err());
        assert!(sniff(&[b"\x7fELF\x02\x01\x01\0"], "program").is_err());
    }

    #[test]
    fn mimes_round_trip() {
        for kind in [DocumentKind::Docx, DocumentKind::Csv, DocumentKind::Tiff] {
            assert_eq!(DocumentKind::from_mime(kind.mime()), Some(kind));
        }
        assert_eq!(DocumentKind::from_mime("application/x-nope"), None);
    }
}
