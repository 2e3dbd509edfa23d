//! A user's retrieval index, in memory: BM25 over an inverted index and exact cosine over the
//! chunks' embeddings, fused by a weighted sum of normalised scores.
//!
//! One [`UserIndex`] per user, held by the user's home node and rebuilt from the store's chunks
//! when missing. It keeps no text: only postings (term → chunk, term frequency), chunk lengths
//! and the vectors, in one contiguous `f32` matrix. Callers read the text of the hits from the
//! store.
//!
//! - **Lexical**: BM25 (k1 = 1.2, b = 0.75; Lucene's non-negative idf) over [`tokenize`]d text.
//! - **Vector**: the query vector's dot product with every stored (unit) vector — an exact flat
//!   scan; `load-tests/README.md` has its cost at 10k and 100k chunks.
//! - **Hybrid**: each list's best `max(50, 4 × top_k)` candidates are fused ([`Fusion`]). The
//!   default is a convex combination of normalised scores, `0.7 × cos' + 0.3 × bm25'`, where
//!   `bm25' = bm25 / best bm25` (BM25's floor is 0) and `cos'` is the cosine min-max scaled over
//!   the vector candidates (1 for the nearest, 0 for the farthest kept); a chunk missing from a
//!   list gets 0 from it. Unlike reciprocal rank fusion, which only sees ranks, this keeps how
//!   far apart the scores are: a question sharing no word with its answer (found by the vectors
//!   alone) is no longer pushed below chunks that both lists rank middling. On the shipped
//!   corpus it puts every answer in the top 3 where RRF missed 3 of 28 (figures in
//!   `load-tests/README.md`; Bruch, Gai & Ingber, "An Analysis of Fusion Functions for Hybrid
//!   Retrieval", 2023, found the same). [`Fusion::Rrf`] remains for comparison. Without a query
//!   vector, or with no stored vectors, the search is lexical only; with an empty query text it
//!   is vector only.
//!
//! Removal marks chunks dead at once (statistics stay exact) and compacts the storage when a
//! quarter of it is dead.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use uuid::Uuid;

/// Reciprocal rank fusion's constant (Cormack, Clarke & Büttcher, 2009).
pub const RRF_K: f32 = 60.0;

/// The vector list's weight in the default fusion (BM25 gets the rest). 0.6 to 0.9 all put
/// every shipped question's passage in the top 3; 0.7 leaves BM25 enough weight that an exact
/// identifier match still counts.
pub const VECTOR_WEIGHT: f32 = 0.7;

/// How the lexical and the vector candidates become one ranking.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fusion {
    /// `vector_weight × cos' + (1 − vector_weight) × bm25'` over normalised scores (see the
    /// module doc).
    Convex { vector_weight: f32 },
    /// Reciprocal rank fusion: Σ 1 / (k + rank) over the lists a chunk is in.
    Rrf { k: f32 },
}

impl Default for Fusion {
    fn default() -> Self {
        Fusion::Convex {
            vector_weight: VECTOR_WEIGHT,
        }
    }
}

/// A chunk: the `seq`-th piece of a document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId {
    pub document_id: Uuid,
    pub seq: u32,
}

/// What is indexed of a chunk. The text is tokenized and dropped.
#[derive(Debug, Clone)]
pub struct IndexedChunk {
    pub chunk_id: ChunkId,
    pub text: String,
    /// From the user's embedder; normalised on the way in. `None`: lexical only.
    pub embedding: Option<Vec<f32>>,
}

/// One result, best first. Ranks are 1-based positions in each list's best candidates.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    pub chunk_id: ChunkId,
    pub document_id: Uuid,
    /// The fused score ([`Fusion`]): in 0..=1 for the default fusion; for a lexical-only or
    /// vector-only search, the list's own normalised score.
    pub score: f32,
    pub bm25_rank: Option<u32>,
    pub vector_rank: Option<u32>,
    pub bm25_score: Option<f32>,
    /// Cosine similarity with the query vector.
    pub cosine: Option<f32>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum IndexError {
    #[error("embedding has {got} dimensions; this index holds {expected}")]
    Dimensions { expected: usize, got: usize },
    #[error("embedding is empty or holds NaN or infinity")]
    BadEmbedding,
}

/// BM25's parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bm25Params {
    pub k1: f32,
    pub b: f32,
    /// Drop common English words ([`STOPWORDS`]) from texts and queries.
    pub stopwords: bool,
}

impl Default for Bm25Params {
    fn default() -> Self {
        Bm25Params {
            k1: 1.2,
            b: 0.75,
            stopwords: true,
        }
    }
}

/// Sizes of an index, for metrics and the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexStats {
    pub chunks: usize,
    pub dead: usize,
    pub terms: usize,
    pub postings: usize,
    pub vectors: usize,
    pub dimensions: usize,
    /// Heap held by the index, approximately (capacities, not lengths).
    pub approx_bytes: usize,
}

#[derive(Debug, Clone, Copy)]
struct Posting {
    slot: u32,
    tf: u32,
}

#[derive(Debug, Clone)]
struct Slot {
    chunk_id: ChunkId,
    /// Tokens in the chunk (BM25's document length).
    len: u32,
    /// Row in the vector matrix.
    row: Option<u32>,
    alive: bool,
}

/// One user's chunks, searchable by words and by meaning.
#[derive(Debug, Clone, Default)]
pub struct UserIndex {
    params: Bm25Params,
    fusion: Fusion,
    slots: Vec<Slot>,
    by_chunk: HashMap<ChunkId, u32>,
    by_document: HashMap<Uuid, Vec<u32>>,
    terms: HashMap<Box<str>, u32>,
    postings: Vec<Vec<Posting>>,
    /// Row-major, `dimensions` floats per row; `row_slot[row]` is the row's slot.
    vectors: Vec<f32>,
    row_slot: Vec<u32>,
    dimensions: usize,
    live: usize,
    live_tokens: u64,
    dead: usize,
}

impl UserIndex {
    pub fn new() -> UserIndex {
        UserIndex::with_params(Bm25Params::default())
    }

    pub fn with_params(params: Bm25Params) -> UserIndex {
        UserIndex {
            params,
            ..Default::default()
        }
    }

    /// Fuses hybrid results with `fusion` instead of the default.
    pub fn with_fusion(mut self, fusion: Fusion) -> UserIndex {
        self.fusion = fusion;
        self
    }

    pub fn fusion(&self) -> Fusion {
        self.fusion
    }

    /// Live chunks.
    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// The vectors' size; `None` until a chunk with an embedding is added.
    pub fn dimensions(&self) -> Option<usize> {
        (self.dimensions > 0).then_some(self.dimensions)
    }

    /// Adds a chunk, replacing one with the same id. A bad embedding leaves the index unchanged.
    pub fn add(&mut self, chunk: IndexedChunk) -> Result<(), IndexError> {
        if let Some(embedding) = &chunk.embedding {
            if embedding.is_empty() || embedding.iter().any(|x| !x.is_finite()) {
                return Err(IndexError::BadEmbedding);
            }
            if self.dimensions != 0 && embedding.len() != self.dimensions {
                return Err(IndexError::Dimensions {
                    expected: self.dimensions,
                    got: embedding.len(),
                });
            }
        }
        if let Some(&old) = self.by_chunk.get(&chunk.chunk_id) {
            self.kill(old);
        }
        let slot = self.slots.len() as u32;

        let mut counts: HashMap<String, u32> = HashMap::new();
        let mut len = 0u32;
        for token in tokenize_with(&chunk.text, self.params.stopwords) {
            *counts.entry(token).or_default() += 1;
            len += 1;
        }
        for (token, tf) in counts {
            let term = match self.terms.get(token.as_str()) {
                Some(&term) => term,
                None => {
                    let term = self.postings.len() as u32;
                    self.terms.insert(token.into_boxed_str(), term);
                    self.postings.push(Vec::new());
                    term
                }
            };
            self.postings[term as usize].push(Posting { slot, tf });
        }

        let row = match chunk.embedding {
            Some(mut embedding) => {
                crate::indexer::embed::normalize(&mut embedding);
                self.dimensions = embedding.len();
                self.vectors.extend_from_slice(&embedding);
                self.row_slot.push(slot);
                Some((self.row_slot.len() - 1) as u32)
            }
            None => None,
        };
        self.slots.push(Slot {
            chunk_id: chunk.chunk_id,
            len,
            row,
            alive: true,
        });
        self.by_chunk.insert(chunk.chunk_id, slot);
        self.by_document
            .entry(chunk.chunk_id.document_id)
            .or_default()
            .push(slot);
        self.live += 1;
        self.live_tokens += u64::from(len);
        self.maybe_compact();
        Ok(())
    }

    /// Removes every chunk of a document; returns how many there were.
    pub fn remove_document(&mut self, document_id: Uuid) -> usize {
        let Some(slots) = self.by_document.remove(&document_id) else {
            return 0;
        };
        let mut removed = 0;
        for slot in slots {
            if self.slots[slot as usize].alive {
                self.kill(slot);
                removed += 1;
            }
        }
        self.maybe_compact();
        removed
    }

    /// The `top_k` best chunks for a query, optionally only from the `filter` documents.
    ///
    /// `query_embedding` must come from the embedder that made the stored vectors; one of
    /// another size is ignored (lexical only) with a warning.
    pub fn search(
        &self,
        query_text: &str,
        query_embedding: Option<&[f32]>,
        filter: Option<&[Uuid]>,
        top_k: usize,
    ) -> Vec<Hit> {
        if top_k == 0 || self.live == 0 {
            return Vec::new();
        }
        let allowed = filter.map(|documents| self.allowed_slots(documents));
        let depth = top_k.saturating_mul(4).max(50);

        let lexical = self.bm25(query_text, allowed.as_ref(), depth);
        let vector = match query_embedding {
            Some(query) if self.dimensions > 0 && query.len() != self.dimensions => {
                tracing::warn!(
                    got = query.len(),
                    expected = self.dimensions,
                    "query embedding of the wrong size; searching lexically"
                );
                Vec::new()
            }
            Some(query) if self.dimensions > 0 => self.cosine(query, allowed.as_ref(), depth),
            _ => Vec::new(),
        };

        // Each list's weight and how a candidate's score becomes its share.
        let (lexical_weight, vector_weight) = match self.fusion {
            Fusion::Convex { vector_weight } => {
                let w = vector_weight.clamp(0.0, 1.0);
                (1.0 - w, w)
            }
            Fusion::Rrf { .. } => (1.0, 1.0),
        };
        let best_bm25 = lexical.first().map_or(0.0, |&(_, s)| s);
        let (near, far) = match (vector.first(), vector.last()) {
            (Some(&(_, near)), Some(&(_, far))) => (near, far),
            _ => (0.0, 0.0),
        };
        let share = |rank: usize, normalised: f32| match self.fusion {
            Fusion::Convex { .. } => normalised,
            Fusion::Rrf { k } => 1.0 / (k + rank as f32 + 1.0),
        };
        let mut fused: HashMap<u32, Hit> = HashMap::with_capacity(lexical.len() + vector.len());
        for (rank, &(slot, score)) in lexical.iter().enumerate() {
            let hit = fused.entry(slot).or_insert_with(|| self.empty_hit(slot));
            hit.bm25_rank = Some(rank as u32 + 1);
            hit.bm25_score = Some(score);
            let normalised = if best_bm25 > 0.0 {
                score / best_bm25
            } else {
                0.0
            };
            hit.score += lexical_weight * share(rank, normalised);
        }
        for (rank, &(slot, score)) in vector.iter().enumerate() {
            let hit = fused.entry(slot).or_insert_with(|| self.empty_hit(slot));
            hit.vector_rank = Some(rank as u32 + 1);
            hit.cosine = Some(score);
            let normalised = if near > far {
                (score - far) / (near - far)
            } else {
                1.0
            };
            hit.score += vector_weight * share(rank, normalised);
        }
        // A single list is not weighted against anything: its own normalised score.
        if lexical.is_empty() || vector.is_empty() {
            let weight = if lexical.is_empty() {
                vector_weight
            } else {
                lexical_weight
            };
            if weight > 0.0 {
                fused.values_mut().for_each(|hit| hit.score /= weight);
            }
        }
        let mut hits: Vec<(u32, Hit)> = fused.into_iter().collect();
        // Best fused score first; ties go to the better single-list rank, then to the earlier
        // chunk, so results are deterministic.
        hits.sort_by(|(slot_a, a), (slot_b, b)| {
            b.score
                .total_cmp(&a.score)
                .then_with(|| best_rank(a).cmp(&best_rank(b)))
                .then_with(|| slot_a.cmp(slot_b))
        });
        hits.truncate(top_k);
        hits.into_iter().map(|(_, hit)| hit).collect()
    }

    /// Returns spare capacity to the allocator, e.g. after a rebuild from the store (growing
    /// vectors keep up to twice what they hold).
    pub fn shrink_to_fit(&mut self) {
        self.postings.iter_mut().for_each(Vec::shrink_to_fit);
        self.postings.shrink_to_fit();
        self.slots.shrink_to_fit();
        self.vectors.shrink_to_fit();
        self.row_slot.shrink_to_fit();
        self.by_document.values_mut().for_each(Vec::shrink_to_fit);
    }

    pub fn stats(&self) -> IndexStats {
        let postings: usize = self.postings.iter().map(Vec::len).sum();
        let approx_bytes = self.slots.capacity() * size_of::<Slot>()
            + self.postings.iter().map(Vec::capacity).sum::<usize>() * size_of::<Posting>()
            + self.postings.capacity() * size_of::<Vec<Posting>>()
            + self
                .terms
                .keys()
                .map(|k| k.len() + size_of::<(Box<str>, u32)>())
                .sum::<usize>()
            + self.vectors.capacity() * size_of::<f32>()
            + self.row_slot.capacity() * size_of::<u32>()
            + self.by_chunk.capacity() * (size_of::<(ChunkId, u32)>() + 1)
            + self
                .by_document
                .values()
                .map(|v| v.capacity() * 4 + size_of::<(Uuid, Vec<u32>)>())
                .sum::<usize>();
        IndexStats {
            chunks: self.live,
            dead: self.dead,
            terms: self.terms.len(),
            postings,
            vectors: self.row_slot.len(),
            dimensions: self.dimensions,
            approx_bytes,
        }
    }

    fn empty_hit(&self, slot: u32) -> Hit {
        let chunk_id = self.slots[slot as usize].chunk_id;
        Hit {
            chunk_id,
            document_id: chunk_id.document_id,
            score: 0.0,
            bm25_rank: None,
            vector_rank: None,
            bm25_score: None,
            cosine: None,
        }
    }

    /// Marks a slot dead, keeping N and the total length exact.
    fn kill(&mut self, slot: u32) {
        let entry = &mut self.slots[slot as usize];
        if !entry.alive {
            return;
        }
        entry.alive = false;
        self.by_chunk.remove(&entry.chunk_id);
        self.live -= 1;
        self.live_tokens -= u64::from(entry.len);
        self.dead += 1;
    }

    fn allowed_slots(&self, documents: &[Uuid]) -> Bitset {
        let mut allowed = Bitset::new(self.slots.len());
        for document in documents {
            for &slot in self
                .by_document
                .get(document)
                .map_or(&[][..], Vec::as_slice)
            {
                allowed.set(slot);
            }
        }
        allowed
    }

    fn visible(&self, slot: u32, allowed: Option<&Bitset>) -> bool {
        self.slots[slot as usize].alive && allowed.is_none_or(|a| a.get(slot))
    }

    /// The best `depth` chunks by BM25, best first.
    fn bm25(&self, query: &str, allowed: Option<&Bitset>, depth: usize) -> Vec<(u32, f32)> {
        let mut terms: Vec<u32> = tokenize_with(query, self.params.stopwords)
            .iter()
            .filter_map(|t| self.terms.get(t.as_str()).copied())
            .collect();
        terms.sort_unstable();
        terms.dedup();
        if terms.is_empty() {
            return Vec::new();
        }
        let n = self.live as f32;
        let avg_len = (self.live_tokens as f32 / n).max(1.0);
        let Bm25Params { k1, b, .. } = self.params;
        let mut scores = vec![0f32; self.slots.len()];
        let mut touched = Vec::new();
        for term in terms {
            let postings = &self.postings[term as usize];
            // Document frequency among live chunks (of all documents, not only the filter's).
            let df = postings
                .iter()
                .filter(|p| self.slots[p.slot as usize].alive)
                .count() as f32;
            if df == 0.0 {
                continue;
            }
            let idf = (1.0 + (n - df + 0.5) / (df + 0.5)).ln();
            for p in postings {
                if !self.visible(p.slot, allowed) {
                    continue;
                }
                let tf = p.tf as f32;
                let len = self.slots[p.slot as usize].len as f32;
                let score = idf * tf * (k1 + 1.0) / (tf + k1 * (1.0 - b + b * len / avg_len));
                let total = &mut scores[p.slot as usize];
                if *total == 0.0 {
                    touched.push(p.slot);
                }
                *total += score;
            }
        }
        top(touched.into_iter().map(|s| (s, scores[s as usize])), depth)
    }

    /// The best `depth` chunks by cosine similarity with `query`, best first.
    fn cosine(&self, query: &[f32], allowed: Option<&Bitset>, depth: usize) -> Vec<(u32, f32)> {
        let mut query = query.to_vec();
        if query.iter().any(|x| !x.is_finite()) {
            return Vec::new();
        }
        crate::indexer::embed::normalize(&mut query);
        let dims = self.dimensions;
        let score_row = |row: usize| dot(&query, &self.vectors[row * dims..(row + 1) * dims]);
        match allowed {
            // A filter usually names a few documents: score only their chunks.
            Some(allowed) => {
                let rows = allowed.iter().filter_map(|slot| {
                    let entry = &self.slots[slot as usize];
                    let row = entry.row?;
                    entry.alive.then(|| (slot, score_row(row as usize)))
                });
                top(rows, depth)
            }
            None => {
                let rows = self
                    .row_slot
                    .iter()
                    .enumerate()
                    .filter(|&(_, &slot)| self.slots[slot as usize].alive)
                    .map(|(row, &slot)| (slot, score_row(row)));
                top(rows, depth)
            }
        }
    }

    fn maybe_compact(&mut self) {
        if self.dead >= 64 && self.dead * 4 >= self.slots.len() {
            self.compact();
        }
    }

    /// Drops dead chunks: renumbers slots and rows, rewrites postings, drops unused terms.
    fn compact(&mut self) {
        let mut new_slot = vec![u32::MAX; self.slots.len()];
        let mut slots = Vec::with_capacity(self.live);
        let mut vectors = Vec::with_capacity(self.live * self.dimensions);
        let mut row_slot = Vec::new();
        for (old, mut entry) in std::mem::take(&mut self.slots).into_iter().enumerate() {
            if !entry.alive {
                continue;
            }
            let slot = slots.len() as u32;
            new_slot[old] = slot;
            if let Some(row) = entry.row {
                let row = row as usize;
                vectors.extend_from_slice(
                    &self.vectors[row * self.dimensions..(row + 1) * self.dimensions],
                );
                entry.row = Some(row_slot.len() as u32);
                row_slot.push(slot);
            }
            slots.push(entry);
        }
        let mut postings = Vec::new();
        let mut terms = HashMap::new();
        for (term, old) in std::mem::take(&mut self.terms) {
            let list: Vec<Posting> = self.postings[old as usize]
                .iter()
                .filter_map(|p| {
                    let slot = new_slot[p.slot as usize];
                    (slot != u32::MAX).then_some(Posting { slot, tf: p.tf })
                })
                .collect();
            if !list.is_empty() {
                terms.insert(term, postings.len() as u32);
                postings.push(list);
            }
        }
        self.by_chunk = slots
            .iter()
            .enumerate()
            .map(|(slot, entry)| (entry.chunk_id, slot as u32))
            .collect();
        let mut by_document: HashMap<Uuid, Vec<u32>> = HashMap::new();
        for (slot, entry) in slots.iter().enumerate() {
            by_document
                .entry(entry.chunk_id.document_id)
                .or_default()
                .push(slot as u32);
        }
        self.by_document = by_document;
        self.slots = slots;
        self.vectors = vectors;
        self.row_slot = row_slot;
        self.terms = terms;
        self.postings = postings;
        self.dead = 0;
        self.shrink_to_fit();
        if self.row_slot.is_empty() {
            self.dimensions = 0;
        }
    }
}

fn best_rank(hit: &Hit) -> u32 {
    hit.bm25_rank
        .unwrap_or(u32::MAX)
        .min(hit.vector_rank.unwrap_or(u32::MAX))
}

/// Dot product with eight independent accumulators, so the compiler can vectorise it.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (a8, a_rest) = a.split_at(a.len() / 8 * 8);
    let (b8, b_rest) = b.split_at(a8.len());
    for (x, y) in a8.chunks_exact(8).zip(b8.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = a_rest.iter().zip(b_rest).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// A candidate in the bounded heap: the worst kept one on top.
struct Candidate(f32, u32);

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Candidate {}
impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Candidate {
    /// "Greater" is worse: a lower score, or the same score on a later slot.
    fn cmp(&self, other: &Self) -> Ordering {
        other.0.total_cmp(&self.0).then(self.1.cmp(&other.1))
    }
}

/// The `depth` best (slot, score) pairs, best first; ties by slot.
fn top(items: impl Iterator<Item = (u32, f32)>, depth: usize) -> Vec<(u32, f32)> {
    let mut heap = BinaryHeap::with_capacity(depth + 1);
    for (slot, score) in items {
        if heap.len() < depth {
            heap.push(Candidate(score, slot));
        } else if let Some(worst) = heap.peek()
            && Candidate(score, slot) < *worst
        {
            heap.pop();
            heap.push(Candidate(score, slot));
        }
    }
    heap.into_sorted_vec()
        .into_iter()
        .map(|Candidate(score, slot)| (slot, score))
        .collect()
}

struct Bitset(Vec<u64>);

impl Bitset {
    fn new(bits: usize) -> Bitset {
        Bitset(vec![0; bits.div_ceil(64)])
    }
    fn set(&mut self, bit: u32) {
        self.0[bit as usize / 64] |= 1 << (bit % 64);
    }
    fn get(&self, bit: u32) -> bool {
        self.0
            .get(bit as usize / 64)
            .is_some_and(|word| word & (1 << (bit % 64)) != 0)
    }
    fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.iter().enumerate().flat_map(|(i, &word)| {
            (0..64u32)
                .filter(move |b| word & (1 << b) != 0)
                .map(move |b| i as u32 * 64 + b)
        })
    }
}

/// Common English words that carry little meaning for retrieval.
pub const STOPWORDS: &[&str] = &[
    "a", "about", "after", "all", "also", "am", "an", "and", "any", "are", "as", "at", "be",
    "been", "before", "being", "between", "both", "but", "by", "can", "could", "did", "do", "does",
    "doing", "during", "each", "for", "from", "had", "has", "have", "having", "he", "her", "here",
    "hers", "him", "his", "how", "i", "if", "in", "into", "is", "it", "its", "itself", "me",
    "more", "most", "my", "no", "nor", "not", "of", "off", "on", "once", "only", "or", "other",
    "our", "ours", "out", "over", "own", "same", "she", "should", "so", "some", "such", "than",
    "that", "the", "their", "theirs", "them", "then", "there", "these", "they", "this", "those",
    "through", "to", "too", "under", "until", "up", "very", "was", "we", "were", "what", "when",
    "where", "which", "while", "who", "whom", "why", "will", "with", "would", "you", "your",
    "yours",
];

/// Splits text into index terms: runs of letters and digits, lower-cased (Unicode), each Han,
/// Hiragana or Katakana character a term of its own (those scripts do not separate words with
/// spaces), English stopwords dropped, and a light plural stemmer (`ies` → `y`, trailing `s`
/// dropped except after `s`, `u`, `i`; Harman's S-stemmer) so "cats" finds "cat".
pub fn tokenize(text: &str) -> Vec<String> {
    tokenize_with(text, true)
}

/// Terms longer than this many bytes (base64 blobs, hashes) are not indexed.
const MAX_TERM_BYTES: usize = 64;

fn tokenize_with(text: &str, stopwords: bool) -> Vec<String> {
    let mut terms = Vec::new();
    let mut current = String::new();
    let flush = |current: &mut String, terms: &mut Vec<String>| {
        let term = std::mem::take(current);
        if term.is_empty()
            || term.len() > MAX_TERM_BYTES
            || (stopwords && STOPWORDS.binary_search(&term.as_str()).is_ok())
        {
            return;
        }
        terms.push(stem(term));
    };
    for c in text.chars() {
        if is_ideograph(c) {
            flush(&mut current, &mut terms);
            terms.push(c.to_string());
        } else if c.is_alphanumeric() {
            current.extend(c.to_lowercase());
        } else {
            flush(&mut current, &mut terms);
        }
    }
    flush(&mut current, &mut terms);
    terms
}

fn is_ideograph(c: char) -> bool {
    matches!(c,
        '\u{3040}'..='\u{30FF}'     // Hiragana, Katakana
        | '\u{3400}'..='\u{4DBF}'   // CJK Extension A
        | '\u{4E00}'..='\u{9FFF}'   // CJK Unified Ideographs
        | '\u{F900}'..='\u{FAFF}'   // CJK Compatibility Ideographs
        | '\u{20000}'..='\u{2FA1F}' // CJK Extensions B–F, supplement
    )
}

fn stem(mut term: String) -> String {
    if term.len() <= 3 || !term.is_ascii() {
        return term;
    }
    if term.ends_with("ies") && !term.ends_with("eies") && !term.ends_with("aies") {
        term.truncate(term.len() - 3);
        term.push('y');
    } else if term.ends_with('s')
        && !(term.ends_with("ss") || term.ends_with("us") || term.ends_with("is"))
    {
        term.pop();
    }
    term
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    fn chunk(document: u128, seq: u32, text: &str, embedding: Option<Vec<f32>>) -> IndexedChunk {
        IndexedChunk {
            chunk_id: ChunkId {
                document_id: doc(document),
                seq,
            },
            text: text.to_owned(),
            embedding,
        }
    }

    fn ids(hits: &[Hit]) -> Vec<(u128, u32)> {
        hits.iter()
            .map(|h| (h.chunk_id.document_id.as_u128(), h.chunk_id.seq))
            .collect()
    }

    /// A small corpus: documents 1–3, vectors along three axes.
    fn corpus() -> UserIndex {
        let mut index = UserIndex::new();
        let texts = [
            (1, 0, "The cat sat on the mat and purred.", [1.0, 0.0, 0.0]),
            (
                1,
                1,
                "Dogs bark at the mail carrier every morning.",
                [0.0, 1.0, 0.0],
            ),
            (
                2,
                0,
                "Quarterly revenue grew by twelve percent.",
                [0.0, 0.0, 1.0],
            ),
            (
                2,
                1,
                "Revenue and profit both fell in the fourth quarter.",
                [0.1, 0.0, 0.9],
            ),
            (
                3,
                0,
                "Kittens and cats like warm places to sleep.",
                [0.9, 0.1, 0.0],
            ),
        ];
        for (d, s, text, v) in texts {
            index.add(chunk(d, s, text, Some(v.to_vec()))).unwrap();
        }
        index
    }

    #[test]
    fn tokenizer_lowercases_splits_stems_and_drops_stopwords() {
        assert_eq!(
            tokenize("The CATS' cafés, São Paulo's 2 studies: Straße!"),
            vec!["cat", "cafés", "são", "paulo", "s", "2", "study", "straße"]
        );
        assert_eq!(
            tokenize("東京タワー is tall"),
            vec!["東", "京", "タ", "ワ", "ー", "tall"]
        );
        assert_eq!(
            tokenize("class bus analysis"),
            vec!["class", "bus", "analysis"]
        );
        assert!(tokenize("the and of does").is_empty());
        let all = UserIndex::with_params(Bm25Params {
            stopwords: false,
            ..Default::default()
        });
        assert_eq!(
            tokenize_with("the cat", all.params.stopwords),
            vec!["the", "cat"]
        );
    }

    #[test]
    fn stopword_list_is_sorted_for_binary_search() {
        assert!(STOPWORDS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn bm25_ranks_by_term_weight_and_length() {
        let index = corpus();
        let hits = index.search("cat", None, None, 10);
        assert_eq!(ids(&hits), vec![(1, 0), (3, 0)]);
        assert!(
            hits.iter()
                .all(|h| h.vector_rank.is_none() && h.cosine.is_none())
        );
        assert_eq!(hits[0].bm25_rank, Some(1));
        // A rare term outweighs a common one.
        let hits = index.search("revenue quarterly", None, None, 10);
        assert_eq!(ids(&hits), vec![(2, 0), (2, 1)]);
        assert!(hits[0].bm25_score > hits[1].bm25_score);
        assert!(index.search("unrelated words", None, None, 10).is_empty());
    }

    #[test]
    fn bm25_scores_match_the_formula() {
        let mut index = UserIndex::new();
        index.add(chunk(1, 0, "apple banana", None)).unwrap();
        index
            .add(chunk(1, 1, "apple apple cherry date", None))
            .unwrap();
        let hits = index.search("apple", None, None, 10);
        // N = 2, df = 2, avgdl = 3.
        let idf = (1.0f32 + (2.0 - 2.0 + 0.5) / (2.0 + 0.5)).ln();
        let score = |tf: f32, len: f32| idf * tf * 2.2 / (tf + 1.2 * (0.25 + 0.75 * len / 3.0));
        assert_eq!(ids(&hits), vec![(1, 1), (1, 0)]);
        assert!((hits[0].bm25_score.unwrap() - score(2.0, 4.0)).abs() < 1e-6);
        assert!((hits[1].bm25_score.unwrap() - score(1.0, 2.0)).abs() < 1e-6);
    }

    #[test]
    fn vector_search_is_exact_cosine() {
        let index = corpus();
        // Vector only: empty query text.
        let hits = index.search("", Some(&[2.0, 0.0, 0.0]), None, 3);
        assert_eq!(ids(&hits), vec![(1, 0), (3, 0), (2, 1)]);
        assert!((hits[0].cosine.unwrap() - 1.0).abs() < 1e-6);
        let expected = 0.9 / (0.81f32 + 0.01).sqrt();
        assert!((hits[1].cosine.unwrap() - expected).abs() < 1e-6);
        assert!(hits.iter().all(|h| h.bm25_rank.is_none()));
    }

    #[test]
    fn hybrid_fuses_normalised_scores() {
        let index = corpus();
        // Lexically only "kittens" matches (3,0); by vector (1,0) is nearest, (3,0) second.
        let hits = index.search("kittens", Some(&[1.0, 0.0, 0.0]), None, 3);
        assert_eq!(ids(&hits), vec![(3, 0), (1, 0), (2, 1)]);
        assert_eq!(hits[0].bm25_rank, Some(1));
        assert_eq!(hits[0].vector_rank, Some(2));
        // Cosines: (1,0) 1.0, (3,0) 0.9/√0.82, (2,1) 0.1/√0.82, the rest 0 (the farthest).
        let cos_3 = 0.9 / 0.82f32.sqrt();
        assert!((hits[0].score - (0.3 + 0.7 * cos_3)).abs() < 1e-6);
        assert!((hits[1].score - 0.7).abs() < 1e-6);
        assert!((hits[2].score - 0.7 * 0.1 / 0.82f32.sqrt()).abs() < 1e-6);
    }

    #[test]
    fn a_vector_only_answer_beats_middling_agreement() {
        // The answer shares no word with the question; two chunks share a word but are far in
        // meaning. Rank fusion puts the chunks both lists hold first; score fusion the answer.
        let mut index = UserIndex::new();
        index
            .add(chunk(
                1,
                0,
                "Refunds are paid within 30 days.",
                Some(vec![1.0, 0.0, 0.0]),
            ))
            .unwrap();
        index
            .add(chunk(
                1,
                1,
                "Money transfers abroad cost a fee.",
                Some(vec![0.6, 0.8, 0.0]),
            ))
            .unwrap();
        index
            .add(chunk(
                1,
                2,
                "Back pain and money worries.",
                Some(vec![0.5, 0.0, 0.866]),
            ))
            .unwrap();
        index
            .add(chunk(
                1,
                3,
                "Unrelated gardening advice.",
                Some(vec![0.0, 0.0, 1.0]),
            ))
            .unwrap();
        let question = "can I get my money back";
        let vector = [0.95, 0.2, 0.1];
        let hits = index.search(question, Some(&vector), None, 2);
        assert_eq!(ids(&hits)[0], (1, 0));
        assert_eq!(hits[0].bm25_rank, None);
        let rrf = index.clone().with_fusion(Fusion::Rrf { k: RRF_K });
        let hits = rrf.search(question, Some(&vector), None, 2);
        assert!(!ids(&hits).contains(&(1, 0)), "{hits:?}");
    }

    #[test]
    fn reciprocal_rank_fusion_when_chosen() {
        let index = corpus().with_fusion(Fusion::Rrf { k: RRF_K });
        let hits = index.search("kittens", Some(&[1.0, 0.0, 0.0]), None, 3);
        assert_eq!(hits[0].chunk_id.document_id, doc(3));
        let expected = 1.0 / 61.0 + 1.0 / 62.0;
        assert!((hits[0].score - expected).abs() < 1e-7);
        assert_eq!(ids(&hits)[1], (1, 0));
        assert!((hits[1].score - 1.0 / 61.0).abs() < 1e-7);
    }

    #[test]
    fn single_list_scores_are_normalised() {
        let index = corpus();
        let hits = index.search("cat", None, None, 10);
        assert!((hits[0].score - 1.0).abs() < 1e-6);
        assert!(hits[1].score > 0.0 && hits[1].score < 1.0);
        let hits = index.search("", Some(&[1.0, 0.0, 0.0]), None, 10);
        assert!((hits[0].score - 1.0).abs() < 1e-6);
        assert!(hits[4].score.abs() < 1e-6);
    }

    #[test]
    fn lexical_only_without_vectors_and_wrong_sized_queries() {
        let mut index = UserIndex::new();
        index
            .add(chunk(1, 0, "solar panels on the roof", None))
            .unwrap();
        index
            .add(chunk(1, 1, "wind turbines offshore", None))
            .unwrap();
        assert_eq!(index.dimensions(), None);
        let hits = index.search("solar", Some(&[1.0, 0.0]), None, 5);
        assert_eq!(ids(&hits), vec![(1, 0)]);
        let index = corpus();
        let hits = index.search("cat", Some(&[1.0, 0.0]), None, 5);
        assert!(hits.iter().all(|h| h.vector_rank.is_none()));
        assert_eq!(hits.len(), 2);
    }

    #[test]
    fn filter_restricts_both_lists() {
        let index = corpus();
        let only = [doc(3)];
        let hits = index.search("cat", Some(&[1.0, 0.0, 0.0]), Some(&only), 10);
        assert_eq!(ids(&hits), vec![(3, 0)]);
        assert_eq!(hits[0].vector_rank, Some(1));
        let none: [Uuid; 0] = [];
        assert!(
            index
                .search("cat", Some(&[1.0, 0.0, 0.0]), Some(&none), 10)
                .is_empty()
        );
        let unknown = [doc(99)];
        assert!(index.search("cat", None, Some(&unknown), 10).is_empty());
    }

    #[test]
    fn remove_document_and_replace_chunk() {
        let mut index = corpus();
        assert_eq!(index.len(), 5);
        assert_eq!(index.remove_document(doc(1)), 2);
        assert_eq!(index.remove_document(doc(1)), 0);
        assert_eq!(index.len(), 3);
        assert_eq!(ids(&index.search("cat", None, None, 10)), vec![(3, 0)]);
        assert_eq!(
            ids(&index.search("", Some(&[1.0, 0.0, 0.0]), None, 10))[0],
            (3, 0)
        );
        // Replacing a chunk: the old text no longer matches.
        index
            .add(chunk(3, 0, "Parrots can talk.", Some(vec![0.0, 1.0, 0.0])))
            .unwrap();
        assert_eq!(index.len(), 3);
        assert!(index.search("kittens", None, None, 10).is_empty());
        assert_eq!(ids(&index.search("parrots", None, None, 10)), vec![(3, 0)]);
    }

    #[test]
    fn statistics_ignore_removed_chunks() {
        // After removing document 2, "apple" is in every live chunk: its idf is that of an
        // index built without document 2.
        let mut index = UserIndex::new();
        let mut fresh = UserIndex::new();
        for i in 0..3 {
            index.add(chunk(1, i, "apple pie", None)).unwrap();
            fresh.add(chunk(1, i, "apple pie", None)).unwrap();
        }
        index
            .add(chunk(2, 0, "banana bread with a long tail of words", None))
            .unwrap();
        index.remove_document(doc(2));
        assert_eq!(
            index.search("apple", None, None, 1)[0].bm25_score,
            fresh.search("apple", None, None, 1)[0].bm25_score
        );
    }

    #[test]
    fn compaction_keeps_results() {
        let mut index = UserIndex::new();
        for d in 0..200u128 {
            for s in 0..2 {
                let text = format!("document {d} part {s} common words topic{}", d % 7);
                let v = vec![(d % 7) as f32 + 1.0, s as f32, 1.0];
                index.add(chunk(d, s, &text, Some(v))).unwrap();
            }
        }
        let before_stats = index.stats();
        for d in (0..200u128).filter(|d| d % 2 == 0) {
            assert_eq!(index.remove_document(doc(d)), 2);
        }
        let stats = index.stats();
        assert_eq!(stats.chunks, 200);
        assert!(stats.dead < 100, "compacted: {stats:?}");
        assert!(stats.postings < before_stats.postings);
        let hits = index.search("topic3", None, None, 100);
        // Odd documents below 200 with d % 7 == 3: 3, 17, …, 199 — 15 documents, 2 chunks each.
        assert_eq!(hits.len(), 30);
        assert!(hits.iter().all(|h| {
            let d = h.chunk_id.document_id.as_u128();
            d % 2 == 1 && d % 7 == 3
        }));
        let hits = index.search("", Some(&[4.0, 0.0, 1.0]), None, 15);
        assert!(hits.iter().all(|h| {
            let d = h.chunk_id.document_id.as_u128();
            d % 2 == 1 && d % 7 == 3 && h.chunk_id.seq == 0 && h.cosine > Some(0.9999)
        }));
        // Every remaining chunk is still found by id-specific words.
        let hits = index.search("document 101", None, Some(&[doc(101)]), 10);
        assert_eq!(ids(&hits).len(), 2);
    }

    #[test]
    fn bad_embeddings_are_rejected_without_change() {
        let mut index = corpus();
        let err = index
            .add(chunk(9, 0, "new words", Some(vec![1.0, 0.0])))
            .unwrap_err();
        assert_eq!(
            err,
            IndexError::Dimensions {
                expected: 3,
                got: 2
            }
        );
        let err = index
            .add(chunk(9, 0, "new words", Some(vec![f32::NAN, 0.0, 0.0])))
            .unwrap_err();
        assert_eq!(err, IndexError::BadEmbedding);
        assert_eq!(index.len(), 5);
        assert!(index.search("new words", None, None, 5).is_empty());
    }

    #[test]
    fn top_k_and_ties_are_deterministic() {
        let mut index = UserIndex::new();
        for s in 0..10 {
            index
                .add(chunk(1, s, "same text", Some(vec![1.0, 1.0])))
                .unwrap();
        }
        let hits = index.search("same", Some(&[1.0, 1.0]), None, 3);
        assert_eq!(ids(&hits), vec![(1, 0), (1, 1), (1, 2)]);
        assert!(index.search("same", None, None, 0).is_empty());
    }

    #[test]
    fn dot_handles_any_length() {
        let a: Vec<f32> = (0..19).map(|i| i as f32).collect();
        let expected: f32 = a.iter().map(|x| x * x).sum();
        assert_eq!(dot(&a, &a), expected);
    }
}
