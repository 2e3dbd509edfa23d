//! Extracted text → chunks of about `target_tokens`, each an exact slice of the text.
//!
//! Structure first: the text is read as blocks — Markdown-style `#` headings (when the format has
//! headings; not inside ``` fences) and paragraphs (lines up to a blank line). A chunk never
//! spans two sections (a heading and what follows it, up to the next heading) nor two pages; a
//! heading directly followed by another heading joins the section that follows rather than
//! standing alone as a chunk of one line (the chunk takes the later heading path).
//! Within a section, whole paragraphs are packed while they fit; a paragraph longer than the
//! target is split at sentence ends (`.`, `!`, `?` and their CJK forms, followed by white
//! space), and a sentence longer than the target at word boundaries.
//!
//! Consecutive chunks of a section overlap by up to `overlap_tokens`: the next chunk starts with
//! the last whole sentences of the previous one that fit in the overlap.
//!
//! Tokens are counted with `cl100k_base` (tiktoken), the encoding of the embedding and chat
//! models this is sized for; sizes are exact for the chunk text (`token_count`), while packing
//! adds up the tokens of the pieces (a few tokens off where pieces join).
//!
//! Positions: `char_start..char_end` are Unicode-scalar offsets into the extracted text, which is
//! the pages' texts joined by `"\n\n"` (for plain text and Markdown: the file with CRLF as LF).

use crate::store::ChunkPosition;

use super::extract::Extracted;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkParams {
    pub target_tokens: usize,
    pub overlap_tokens: usize,
}

impl Default for ChunkParams {
    fn default() -> Self {
        ChunkParams {
            target_tokens: 400,
            overlap_tokens: 60,
        }
    }
}

/// A chunk before it is stored.
#[derive(Debug, Clone, PartialEq)]
pub struct ChunkDraft {
    pub text: String,
    pub position: ChunkPosition,
    pub token_count: usize,
}

/// Separator between pages in the extracted text.
pub const PAGE_SEPARATOR: &str = "\n\n";

/// Tokens of `text` in `cl100k_base`.
pub fn count_tokens(text: &str) -> usize {
    tiktoken_rs::cl100k_base_singleton()
        .encode_ordinary(text)
        .len()
}

/// The whole extracted text, as positions refer to it.
pub fn full_text(extracted: &Extracted) -> String {
    extracted
        .pages
        .iter()
        .map(|p| p.text.as_str())
        .collect::<Vec<_>>()
        .join(PAGE_SEPARATOR)
}

pub fn chunk(extracted: &Extracted, params: &ChunkParams) -> Vec<ChunkDraft> {
    chunk_from(extracted, params, &mut Vec::new(), 0)
}

/// Chunks `extracted` as the continuation of a text: `path` is the heading path in force where
/// it starts (left as it is where it ends), `chars_before` the characters before it.
fn chunk_from(
    extracted: &Extracted,
    params: &ChunkParams,
    path: &mut Vec<String>,
    chars_before: u64,
) -> Vec<ChunkDraft> {
    let target = params.target_tokens.max(1);
    let overlap = params.overlap_tokens.min(target / 2);
    let text = full_text(extracted);
    let sections = merge_heading_only(sections(extracted, path));
    let mut chars = CharIndex::new(&text);
    let mut drafts = Vec::new();
    for section in sections {
        let units = units(&text, &section.blocks, target);
        for (start, end) in pack(&text, &units, target, overlap) {
            let slice = &text[start..end];
            drafts.push(ChunkDraft {
                text: slice.to_owned(),
                position: ChunkPosition {
                    page: section.page,
                    heading_path: section.heading_path.clone(),
                    char_start: chars_before + chars.at(start),
                    char_end: chars_before + chars.at(end),
                },
                token_count: count_tokens(slice),
            });
        }
    }
    drafts
}

/// Chunks a text that arrives in pieces (a streamed document) while holding about `window`
/// bytes of it.
///
/// Text is cut into windows of at most `window` bytes, each chunked as [`chunk`] does, from the
/// heading path in force where the window starts and with positions counted from the start of
/// the whole text. The cut is made, in the window's second half, at the latest section start (a
/// heading after something other than a heading) if there is one, else at the latest paragraph
/// break, else at a line break or a space, never inside a code fence when avoidable. Chunks
/// never cross sections, so a cut at a section start yields exactly the chunks of the whole
/// text; a cut at a paragraph break ends a chunk there without overlap into the next window
/// (at most once per window).
#[derive(Debug)]
pub struct StreamChunker {
    params: ChunkParams,
    headings: bool,
    window: usize,
    buffer: String,
    path: Vec<String>,
    chars_before: u64,
}

impl StreamChunker {
    pub fn new(params: ChunkParams, headings: bool, window: usize) -> StreamChunker {
        StreamChunker {
            params,
            headings,
            window: window.max(64),
            buffer: String::new(),
            path: Vec::new(),
            chars_before: 0,
        }
    }

    /// Appends the next piece of text; the chunks of every window it completes.
    pub fn push(&mut self, text: &str) -> Vec<ChunkDraft> {
        self.buffer.push_str(text);
        let mut drafts = Vec::new();
        while self.buffer.len() > self.window {
            let cut = cut_point(&self.buffer, self.window, self.headings);
            drafts.extend(self.chunk_prefix(cut));
        }
        drafts
    }

    /// The chunks of what is left.
    pub fn finish(mut self) -> Vec<ChunkDraft> {
        let all = self.buffer.len();
        self.chunk_prefix(all)
    }

    fn chunk_prefix(&mut self, cut: usize) -> Vec<ChunkDraft> {
        let rest = self.buffer.split_off(cut);
        let window = std::mem::replace(&mut self.buffer, rest);
        let chars = window.chars().count() as u64;
        let extracted = Extracted {
            pages: vec![super::extract::ExtractedPage {
                number: None,
                text: window,
            }],
            headings: self.headings,
        };
        let drafts = chunk_from(&extracted, &self.params, &mut self.path, self.chars_before);
        self.chars_before += chars;
        drafts
    }
}

/// Where to end the next window of `text` (longer than `window`): a byte offset in
/// `window / 2 ..= window` on a char boundary (see [`StreamChunker`]).
fn cut_point(text: &str, window: usize, headings: bool) -> usize {
    let floor = window / 2;
    let (mut section, mut paragraph, mut line) = (None, None, None);
    let mut in_fence = false;
    let mut previous_blank = false;
    let mut previous_heading = false;
    let mut line_start = 0;
    while line_start <= window && line_start < text.len() {
        let line_end = text[line_start..]
            .find('\n')
            .map_or(text.len(), |n| line_start + n);
        let current = &text[line_start..line_end];
        let trimmed = current.trim();
        let fence = trimmed.starts_with("```") || trimmed.starts_with("~~~");
        let heading = headings && !in_fence && !fence && parse_heading(current).is_some();
        if line_start >= floor && line_start > 0 && !in_fence {
            if heading && !previous_heading {
                section = Some(line_start);
            }
            if previous_blank && !trimmed.is_empty() && !previous_heading {
                paragraph = Some(line_start);
            }
            line = Some(line_start);
        }
        if fence {
            in_fence = !in_fence;
        }
        previous_blank = trimmed.is_empty();
        if !trimmed.is_empty() {
            previous_heading = heading;
        }
        line_start = line_end + 1;
    }
    if let Some(cut) = section.or(paragraph).or(line) {
        return cut;
    }
    // One long line: after the last space in the second half, else anywhere on a char boundary.
    let mut end = window.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    match text[..end].rfind(char::is_whitespace) {
        Some(space) if space >= floor => space + 1,
        _ if end > 0 => end,
        _ => text.chars().next().map_or(text.len(), char::len_utf8),
    }
}

/// A heading or a paragraph: a byte range of the full text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Block {
    start: usize,
    end: usize,
    heading: bool,
}

#[derive(Debug, Clone, PartialEq)]
struct Section {
    page: Option<u32>,
    heading_path: Vec<String>,
    blocks: Vec<Block>,
}

/// Splits every page into sections of blocks; `path` is the heading path in force at the start
/// and, after, at the end.
fn sections(extracted: &Extracted, path: &mut Vec<String>) -> Vec<Section> {
    let mut sections: Vec<Section> = Vec::new();
    let mut offset = 0;
    for (i, page) in extracted.pages.iter().enumerate() {
        if i > 0 {
            offset += PAGE_SEPARATOR.len();
        }
        let mut current = Section {
            page: page.number,
            heading_path: path.clone(),
            blocks: Vec::new(),
        };
        let mut paragraph: Option<(usize, usize)> = None;
        let mut in_fence = false;
        let mut line_start = 0;
        let text = &page.text;
        while line_start <= text.len() {
            let line_end = text[line_start..]
                .find('\n')
                .map_or(text.len(), |n| line_start + n);
            let line = &text[line_start..line_end];
            let trimmed = line.trim();
            let fence = trimmed.starts_with("```") || trimmed.starts_with("~~~");
            let heading = (extracted.headings && !in_fence && !fence)
                .then(|| parse_heading(line))
                .flatten();
            if fence {
                in_fence = !in_fence;
            }
            if let Some((level, title)) = heading {
                if let Some((s, e)) = paragraph.take() {
                    current.blocks.push(block(offset, s, e, false));
                }
                if !current.blocks.is_empty() {
                    sections.push(current);
                }
                path.truncate(level - 1);
                path.push(title);
                current = Section {
                    page: page.number,
                    heading_path: path.clone(),
                    blocks: vec![block(offset, line_start, line_end, true)],
                };
            } else if trimmed.is_empty() && !in_fence {
                if let Some((s, e)) = paragraph.take() {
                    current.blocks.push(block(offset, s, e, false));
                }
            } else if !trimmed.is_empty() || in_fence {
                paragraph = Some(match paragraph {
                    Some((s, _)) => (s, line_end),
                    None => (line_start, line_end),
                });
            }
            line_start = line_end + 1;
        }
        if let Some((s, e)) = paragraph.take() {
            current.blocks.push(block(offset, s, e, false));
        }
        if !current.blocks.is_empty() {
            sections.push(current);
        }
        offset += text.len();
    }
    // Leading and trailing white space of a block is not part of it.
    for section in &mut sections {
        for b in &mut section.blocks {
            let whole = full_slice(extracted, b.start, b.end);
            let lead = whole.len() - whole.trim_start().len();
            let trail = whole.len() - whole.trim_end().len();
            b.start += lead;
            b.end = (b.end - trail).max(b.start);
        }
        section.blocks.retain(|b| b.end > b.start);
    }
    sections.retain(|s| !s.blocks.is_empty());
    sections
}

fn block(offset: usize, start: usize, end: usize, heading: bool) -> Block {
    Block {
        start: offset + start,
        end: offset + end,
        heading,
    }
}

/// `text[start..end]` of the full text, without building it.
fn full_slice(extracted: &Extracted, start: usize, end: usize) -> &str {
    let mut offset = 0;
    for (i, page) in extracted.pages.iter().enumerate() {
        if i > 0 {
            offset += PAGE_SEPARATOR.len();
        }
        if start >= offset && end <= offset + page.text.len() {
            return &page.text[start - offset..end - offset];
        }
        offset += page.text.len();
    }
    ""
}

/// `## Title ##` → `(2, "Title")`.
fn parse_heading(line: &str) -> Option<(usize, String)> {
    let indent = line.len() - line.trim_start_matches(' ').len();
    if indent > 3 {
        return None;
    }
    let rest = &line[indent..];
    let level = rest.len() - rest.trim_start_matches('#').len();
    if !(1..=6).contains(&level) {
        return None;
    }
    let after = &rest[level..];
    if !(after.is_empty() || after.starts_with([' ', '\t'])) {
        return None;
    }
    let title = after.trim().trim_end_matches('#').trim_end().to_owned();
    if title.is_empty() {
        return None;
    }
    Some((level, title))
}

/// A section holding only its heading joins the next section on the same page, so "# A"
/// directly followed by "## B" (or a DOCX title followed by "Heading 1") is not a chunk of its
/// own.
fn merge_heading_only(sections: Vec<Section>) -> Vec<Section> {
    let mut out: Vec<Section> = Vec::new();
    let mut pending: Option<Section> = None;
    for mut section in sections {
        if let Some(prefix) = pending.take() {
            if prefix.page == section.page {
                let mut blocks = prefix.blocks;
                blocks.append(&mut section.blocks);
                section.blocks = blocks;
            } else {
                out.push(prefix);
            }
        }
        if section.blocks.iter().all(|b| b.heading) {
            pending = Some(section);
        } else {
            out.push(section);
        }
    }
    out.extend(pending);
    out
}

/// A piece to pack: a byte range and its tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Unit {
    start: usize,
    end: usize,
    tokens: usize,
}

/// Whole blocks where they fit the target, else their sentences (else their words).
fn units(text: &str, blocks: &[Block], target: usize) -> Vec<Unit> {
    let mut out = Vec::new();
    for b in blocks {
        let tokens = count_tokens(&text[b.start..b.end]);
        if tokens <= target {
            out.push(Unit {
                start: b.start,
                end: b.end,
                tokens,
            });
            continue;
        }
        for (s, e) in sentences(text, b.start, b.end) {
            let tokens = count_tokens(&text[s..e]);
            if tokens <= target {
                out.push(Unit {
                    start: s,
                    end: e,
                    tokens,
                });
            } else {
                out.extend(split_words(text, s, e, target));
            }
        }
    }
    out
}

/// Sentence ranges within `start..end` (trimmed, non-empty).
fn sentences(text: &str, start: usize, end: usize) -> Vec<(usize, usize)> {
    let slice = &text[start..end];
    let mut out = Vec::new();
    let mut sentence_start = 0;
    let mut chars = slice.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        let ends = matches!(c, '.' | '!' | '?' | '。' | '！' | '？');
        if !ends {
            continue;
        }
        // Closing quotes and brackets belong to the sentence they end.
        let mut end_at = i + c.len_utf8();
        while let Some(&(j, next)) = chars.peek() {
            if matches!(next, '"' | '\'' | ')' | ']' | '”' | '’' | '»') {
                end_at = j + next.len_utf8();
                chars.next();
            } else {
                break;
            }
        }
        let cjk = matches!(c, '。' | '！' | '？');
        let followed_by_space = chars.peek().is_none_or(|&(_, n)| n.is_whitespace());
        if cjk || followed_by_space {
            push_trimmed(slice, start, sentence_start, end_at, &mut out);
            sentence_start = end_at;
        }
    }
    push_trimmed(slice, start, sentence_start, slice.len(), &mut out);
    out
}

fn push_trimmed(slice: &str, base: usize, s: usize, e: usize, out: &mut Vec<(usize, usize)>) {
    let piece = &slice[s..e];
    let lead = piece.len() - piece.trim_start().len();
    let trail = piece.len() - piece.trim_end().len();
    if piece.trim().is_empty() {
        return;
    }
    out.push((base + s + lead, base + e - trail));
}

/// Greedy word packing of one over-long sentence; a single word longer than the target is cut
/// at character boundaries.
fn split_words(text: &str, start: usize, end: usize, target: usize) -> Vec<Unit> {
    let slice = &text[start..end];
    let mut words: Vec<(usize, usize)> = Vec::new();
    let mut word_start = None;
    for (i, c) in slice.char_indices() {
        match (c.is_whitespace(), word_start) {
            (false, None) => word_start = Some(i),
            (true, Some(s)) => {
                words.push((s, i));
                word_start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = word_start {
        words.push((s, slice.len()));
    }
    let mut out: Vec<Unit> = Vec::new();
    let mut current: Option<Unit> = None;
    for (ws, we) in words {
        let (ws, we) = (start + ws, start + we);
        let tokens = count_tokens(&text[ws..we]);
        if tokens > target {
            out.extend(current.take());
            out.extend(split_chars(text, ws, we, target));
            continue;
        }
        current = match current {
            Some(mut unit) => {
                let joined = count_tokens(&text[unit.start..we]);
                if joined <= target {
                    unit.end = we;
                    unit.tokens = joined;
                    Some(unit)
                } else {
                    out.push(unit);
                    Some(Unit {
                        start: ws,
                        end: we,
                        tokens,
                    })
                }
            }
            None => Some(Unit {
                start: ws,
                end: we,
                tokens,
            }),
        };
    }
    out.extend(current);
    out
}

fn split_chars(text: &str, start: usize, end: usize, target: usize) -> Vec<Unit> {
    let mut out = Vec::new();
    let mut piece_start = start;
    let mut last_fit = start;
    for (i, c) in text[start..end].char_indices() {
        let here = start + i + c.len_utf8();
        if count_tokens(&text[piece_start..here]) > target && last_fit > piece_start {
            out.push(Unit {
                start: piece_start,
                end: last_fit,
                tokens: count_tokens(&text[piece_start..last_fit]),
            });
            piece_start = last_fit;
        }
        last_fit = here;
    }
    if end > piece_start {
        out.push(Unit {
            start: piece_start,
            end,
            tokens: count_tokens(&text[piece_start..end]),
        });
    }
    out
}

/// Packs units into chunk ranges of at most `target` tokens (by the units' sum), each chunk
/// after the first starting with up to `overlap` tokens of whole sentences from the one before.
fn pack(text: &str, units: &[Unit], target: usize, overlap: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut current: Vec<Unit> = Vec::new();
    let mut tokens = 0;
    let mut fresh = false;
    for unit in units {
        if fresh && tokens + unit.tokens > target {
            out.push(range(&current));
            current = overlap_tail(text, &current, overlap);
            tokens = current.iter().map(|u| u.tokens).sum();
            if tokens + unit.tokens > target {
                current.clear();
                tokens = 0;
            }
        }
        current.push(*unit);
        tokens += unit.tokens;
        fresh = true;
    }
    if fresh {
        out.push(range(&current));
    }
    out
}

fn range(units: &[Unit]) -> (usize, usize) {
    match (units.first(), units.last()) {
        (Some(first), Some(last)) => (first.start, last.end),
        _ => (0, 0),
    }
}

/// The last whole sentences of `units` that fit in `overlap` tokens.
fn overlap_tail(text: &str, units: &[Unit], overlap: usize) -> Vec<Unit> {
    if overlap == 0 {
        return Vec::new();
    }
    let mut tail: Vec<Unit> = Vec::new();
    let mut budget = overlap;
    for unit in units.iter().rev() {
        if unit.tokens <= budget {
            tail.push(*unit);
            budget -= unit.tokens;
            continue;
        }
        for (s, e) in sentences(text, unit.start, unit.end).into_iter().rev() {
            let tokens = count_tokens(&text[s..e]);
            if tokens > budget {
                break;
            }
            tail.push(Unit {
                start: s,
                end: e,
                tokens,
            });
            budget -= tokens;
        }
        break;
    }
    tail.reverse();
    tail
}

/// Byte offset → char offset, for offsets that mostly grow.
struct CharIndex<'a> {
    text: &'a str,
    byte: usize,
    chars: u64,
}

impl<'a> CharIndex<'a> {
    fn new(text: &'a str) -> Self {
        CharIndex {
            text,
            byte: 0,
            chars: 0,
        }
    }

    fn at(&mut self, byte: usize) -> u64 {
        if byte < self.byte {
            self.byte = 0;
            self.chars = 0;
        }
        self.chars += self.text[self.byte..byte].chars().count() as u64;
        self.byte = byte;
        self.chars
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::indexer::extract::ExtractedPage;

    fn doc(text: &str, headings: bool) -> Extracted {
        Extracted {
            pages: vec![ExtractedPage {
                number: None,
                text: text.to_owned(),
            }],
            headings,
        }
    }

    fn params(target: usize, overlap: usize) -> ChunkParams {
        ChunkParams {
            target_tokens: target,
            overlap_tokens: overlap,
        }
    }

    /// Every chunk's text is the slice its char range names.
    fn assert_slices(extracted: &Extracted, drafts: &[ChunkDraft]) {
        let full: Vec<char> = full_text(extracted).chars().collect();
        for d in drafts {
            let slice: String = full[d.position.char_start as usize..d.position.char_end as usize]
                .iter()
                .collect();
            assert_eq!(slice, d.text);
            assert_eq!(d.token_count, count_tokens(&d.text));
        }
    }

    #[test]
    fn counts_cl100k_tokens() {
        assert_eq!(count_tokens("hello world"), 2);
        assert_eq!(count_tokens(""), 0);
    }

    #[test]
    fn markdown_headings_build_paths_and_bound_chunks() {
        let md = "# Guide\n\nIntro text here.\n\n## Install\n\nRun the installer.\n\n\
                  ## Use\n\nOpen the app.\n\n# Appendix\n\nMore.\n";
        let e = doc(md, true);
        let drafts = chunk(&e, &params(400, 60));
        assert_slices(&e, &drafts);
        let got: Vec<(&str, Vec<&str>, u64, u64)> = drafts
            .iter()
            .map(|d| {
                (
                    d.text.as_str(),
                    d.position.heading_path.iter().map(String::as_str).collect(),
                    d.position.char_start,
                    d.position.char_end,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("# Guide\n\nIntro text here.", vec!["Guide"], 0, 25),
                (
                    "## Install\n\nRun the installer.",
                    vec!["Guide", "Install"],
                    27,
                    57
                ),
                ("## Use\n\nOpen the app.", vec!["Guide", "Use"], 59, 80),
                ("# Appendix\n\nMore.", vec!["Appendix"], 82, 99),
            ]
        );
        assert!(drafts.iter().all(|d| d.position.page.is_none()));
    }

    #[test]
    fn a_bare_heading_joins_its_first_sub_section() {
        let md = "# Top\n## Sub\nBody text.\n";
        let e = doc(md, true);
        let drafts = chunk(&e, &params(400, 0));
        assert_eq!(drafts.len(), 1);
        assert_eq!(drafts[0].text, "# Top\n## Sub\nBody text.");
        assert_eq!(drafts[0].position.heading_path, vec!["Top", "Sub"]);
    }

    #[test]
    fn a_bare_heading_joins_the_next_section_even_a_sibling() {
        let md = "# Title\n\n# Chapter\n\nText.";
        let drafts = chunk(&doc(md, true), &params(400, 0));
        assert_eq!(drafts.len(), 1);
        assert_eq!(drafts[0].text, md);
        assert_eq!(drafts[0].position.heading_path, vec!["Chapter"]);
        // At the very end, a bare heading is still kept.
        let drafts = chunk(&doc("Text.\n\n# Last", true), &params(400, 0));
        assert_eq!(drafts.len(), 2);
        assert_eq!(drafts[1].text, "# Last");
    }

    #[test]
    fn hashes_in_plain_text_and_code_fences_are_not_headings() {
        let text = "# not a heading\n\nbody";
        let plain = chunk(&doc(text, false), &params(400, 0));
        assert_eq!(plain.len(), 1);
        assert!(plain[0].position.heading_path.is_empty());

        let md = "# Real\n\n```\n# comment in code\n\nstill code\n```\n\nAfter.";
        let drafts = chunk(&doc(md, true), &params(400, 0));
        assert_eq!(drafts.len(), 1);
        assert_eq!(drafts[0].position.heading_path, vec!["Real"]);
    }

    #[test]
    fn paragraphs_are_packed_whole() {
        // Each paragraph is 4 tokens ("Alpha beta gamma."): 3 fit in 12, the 4th starts anew.
        let para = "Alpha beta gamma.";
        assert_eq!(count_tokens(para), 4);
        let text = [para; 5].join("\n\n");
        let e = doc(&text, false);
        let drafts = chunk(&e, &params(12, 0));
        assert_slices(&e, &drafts);
        let ranges: Vec<(u64, u64)> = drafts
            .iter()
            .map(|d| (d.position.char_start, d.position.char_end))
            .collect();
        assert_eq!(ranges, vec![(0, 55), (57, 93)]);
        assert_eq!(drafts[0].text, [para; 3].join("\n\n"));
    }

    #[test]
    fn long_paragraphs_split_at_sentences_with_overlap() {
        // Six 4-token sentences in one paragraph of 24 tokens; target 10, overlap 4: each chunk
        // takes two sentences, and the next one repeats the last of them.
        let sentences = ["One two three.", "Four five six.", "Seven eight nine."];
        let s: Vec<String> = (0..6).map(|i| sentences[i % 3].to_owned()).collect();
        for x in &s {
            assert_eq!(count_tokens(x), 4, "{x}");
        }
        let text = s.join(" ");
        let e = doc(&text, false);
        let drafts = chunk(&e, &params(10, 4));
        assert_slices(&e, &drafts);
        let texts: Vec<&str> = drafts.iter().map(|d| d.text.as_str()).collect();
        assert_eq!(
            texts,
            vec![
                "One two three. Four five six.",
                "Four five six. Seven eight nine.",
                "Seven eight nine. One two three.",
                "One two three. Four five six.",
                "Four five six. Seven eight nine.",
            ]
        );
        assert_eq!(drafts[1].position.char_start, 15);
        assert_eq!(drafts[1].position.char_end, 47);
    }

    #[test]
    fn a_sentence_longer_than_the_target_splits_at_words() {
        let words: Vec<String> = (0..30).map(|i| format!("w{i}")).collect();
        let text = words.join(" ");
        let e = doc(&text, false);
        let drafts = chunk(&e, &params(10, 0));
        assert_slices(&e, &drafts);
        assert!(drafts.len() >= 3, "{drafts:#?}");
        assert!(drafts.iter().all(|d| d.token_count <= 10), "{drafts:#?}");
        // Nothing lost, nothing repeated without overlap.
        let rejoined: Vec<&str> = drafts.iter().flat_map(|d| d.text.split(' ')).collect();
        assert_eq!(
            rejoined,
            words.iter().map(String::as_str).collect::<Vec<_>>()
        );
    }

    #[test]
    fn pages_bound_chunks_and_are_recorded() {
        let e = Extracted {
            pages: vec![
                ExtractedPage {
                    number: Some(1),
                    text: "First page text.".into(),
                },
                ExtractedPage {
                    number: Some(2),
                    text: "   ".into(),
                },
                ExtractedPage {
                    number: Some(3),
                    text: "Third page: ünïcode.".into(),
                },
            ],
            headings: false,
        };
        let drafts = chunk(&e, &params(400, 60));
        assert_slices(&e, &drafts);
        let got: Vec<(Option<u32>, u64, u64)> = drafts
            .iter()
            .map(|d| (d.position.page, d.position.char_start, d.position.char_end))
            .collect();
        // "First page text." (16) + "\n\n" + "   " + "\n\n" = 23.
        assert_eq!(got, vec![(Some(1), 0, 16), (Some(3), 23, 43)]);
    }

    #[test]
    fn sentence_ends() {
        let text = "He said \"stop.\" Then left! Why? Version 1.5 is out。次の文";
        let got: Vec<&str> = sentences(text, 0, text.len())
            .into_iter()
            .map(|(s, e)| &text[s..e])
            .collect();
        assert_eq!(
            got,
            vec![
                "He said \"stop.\"",
                "Then left!",
                "Why?",
                "Version 1.5 is out。",
                "次の文"
            ]
        );
    }

    #[test]
    fn empty_text_has_no_chunks() {
        assert!(chunk(&doc("", true), &ChunkParams::default()).is_empty());
        assert!(chunk(&doc("\n\n  \n", false), &ChunkParams::default()).is_empty());
    }

    /// Markdown sections of a few paragraphs, some with code fences, headings at two levels.
    fn long_markdown(sections: usize) -> String {
        let mut text = String::from("# Book\n\n");
        for i in 0..sections {
            text.push_str(&format!("## Part {i}\n\n"));
            for j in 0..(i % 4 + 1) {
                text.push_str(&format!(
                    "Paragraph {j} of part {i} says something. It has two sentences — ünïcödé.\n\n"
                ));
            }
            if i % 5 == 0 {
                text.push_str("```\n# not a heading\n\ncode\n```\n\n");
            }
        }
        text
    }

    fn stream(
        text: &str,
        headings: bool,
        params: ChunkParams,
        window: usize,
        piece: usize,
    ) -> Vec<ChunkDraft> {
        let mut chunker = StreamChunker::new(params, headings, window);
        let mut drafts = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let mut at = piece.min(rest.len());
            while !rest.is_char_boundary(at) {
                at += 1;
            }
            drafts.extend(chunker.push(&rest[..at]));
            rest = &rest[at..];
        }
        drafts.extend(chunker.finish());
        drafts
    }

    #[test]
    fn streamed_windows_cut_at_sections_give_the_whole_documents_chunks() {
        let text = long_markdown(60);
        let whole = chunk(&doc(&text, true), &params(40, 10));
        // Windows much larger than a section: every cut falls on a section start.
        for (window, piece) in [(600, 100), (1000, 7), (4096, 4096)] {
            let streamed = stream(&text, true, params(40, 10), window, piece);
            assert_eq!(streamed, whole, "window {window}, piece {piece}");
        }
    }

    #[test]
    fn streamed_windows_keep_positions_and_paths_whatever_the_cut() {
        // Plain text without headings and one section longer than the window: cuts fall on
        // paragraph breaks, lines or spaces. Each chunk is still the slice its range names,
        // within the window's bound, and heading paths carry over the cuts.
        let mut text = String::from("# Only\n\n");
        for i in 0..200 {
            text.push_str(&format!("Line {i} of ünïcödé text, with words.\n"));
            if i % 7 == 0 {
                text.push('\n');
            }
        }
        text.push_str(&"averyveryveryverylongwordwithoutspaces".repeat(20));
        for headings in [true, false] {
            let drafts = stream(&text, headings, params(30, 8), 256, 50);
            assert_slices(&doc(&text, headings), &drafts);
            assert!(drafts.iter().all(|d| d.text.len() <= 256), "window bound");
            let covered: String = drafts.iter().map(|d| d.text.as_str()).collect();
            assert!(covered.contains("Line 199"));
            if headings {
                assert!(
                    drafts
                        .iter()
                        .skip(1)
                        .all(|d| d.position.heading_path == ["Only"])
                );
            }
        }
    }

    #[test]
    fn cut_points_prefer_sections_then_paragraphs_and_avoid_fences() {
        let text = "intro line is long\n\n# A\n\ntext a\n\npara b\n```\n\n# in fence\n\n```\nend";
        let (a, para_b) = (text.find("# A").unwrap(), text.find("para b").unwrap());
        let window = para_b + 2;
        assert!(a >= window / 2);
        // A section start in the second half wins over a later paragraph break.
        assert_eq!(cut_point(text, window, true), a);
        // Without headings, the latest paragraph break.
        assert_eq!(cut_point(text, window, false), para_b);
        // Inside the fence nothing is a candidate: the cut comes before it.
        let fenced = text.find("# in fence").unwrap();
        assert!(cut_point(text, fenced + 2, true) < text.find("```").unwrap() + 1);
    }
}
