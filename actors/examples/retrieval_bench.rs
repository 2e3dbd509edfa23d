//! Benchmark: the per-user retrieval index and the local embedder (`load-tests/retrieval.sh`).
//!
//! 1. Search latency over 10k and 100k synthetic chunks of one user: ~150 words each drawn from
//!    a Zipf-distributed vocabulary of 30k words, random unit vectors of 384 dimensions (the
//!    scan's cost does not depend on what the vectors mean). QUERIES queries of 2–6 words from
//!    the same distribution, top 10, lexical / vector / hybrid: p50, p99, max. Also the build
//!    time and the index's size.
//! 2. Recall@5 and MRR on the shipped corpus (`tests/fixtures/retrieval/`), with the real
//!    all-MiniLM-L6-v2 (`scripts/fetch-minilm`): BM25 only, vectors only, hybrid.
//! 3. Local embedding throughput on 2 cores: corpus passages (short) and 256-token chunks.
//!
//!   cargo run --release -p chorus-actors --example retrieval_bench -- [QUERIES] [SIZES]
//!   (defaults: 300 queries, sizes 10000,100000)

// A benchmark prints its figures: that is its output, not logging.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use chorus_actors::indexer::embed::local::LocalEmbedder;
use chorus_actors::indexer::search::{ChunkId, Fusion, Hit, IndexedChunk, RRF_K, UserIndex};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use uuid::Uuid;

const DIMS: usize = 384;
const VOCABULARY: usize = 30_000;
const WORDS_PER_CHUNK: usize = 150;
const CHUNKS_PER_DOCUMENT: usize = 50;
const TOP_K: usize = 10;

/// Samples word ranks with probability ∝ 1/rank (Zipf, s = 1), as in natural text.
struct Zipf {
    cumulative: Vec<f64>,
}

impl Zipf {
    fn new(n: usize) -> Zipf {
        let mut total = 0.0;
        let cumulative = (1..=n)
            .map(|rank| {
                total += 1.0 / rank as f64;
                total
            })
            .collect();
        Zipf { cumulative }
    }

    fn sample(&self, rng: &mut StdRng) -> usize {
        let total = self.cumulative.last().copied().unwrap_or(1.0);
        let x = rng.random::<f64>() * total;
        self.cumulative.partition_point(|&c| c < x)
    }
}

/// A pronounceable word for a rank, so the tokenizer sees ordinary terms.
fn word(rank: usize) -> String {
    const SYLLABLES: [&str; 16] = [
        "ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "de", "po", "gu", "fa", "ze", "bo", "li",
        "xu",
    ];
    let mut n = rank;
    let mut w = String::new();
    loop {
        w.push_str(SYLLABLES[n % 16]);
        n /= 16;
        if n == 0 {
            break;
        }
    }
    w.push('r'); // no word ends in "s": the plural stemmer leaves them alone
    w
}

fn random_unit(rng: &mut StdRng) -> Vec<f32> {
    let mut v: Vec<f32> = (0..DIMS).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= norm);
    v
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn latency_run(chunks: usize, queries: usize) {
    let mut rng = StdRng::seed_from_u64(42);
    let zipf = Zipf::new(VOCABULARY);
    let words: Vec<String> = (0..VOCABULARY).map(word).collect();
    let documents: Vec<Uuid> = (0..chunks.div_ceil(CHUNKS_PER_DOCUMENT))
        .map(|i| Uuid::from_u128(i as u128 + 1))
        .collect();

    let texts: Vec<(ChunkId, String, Vec<f32>)> = (0..chunks)
        .map(|i| {
            let text = (0..WORDS_PER_CHUNK)
                .map(|_| words[zipf.sample(&mut rng)].as_str())
                .collect::<Vec<_>>()
                .join(" ");
            let id = ChunkId {
                document_id: documents[i / CHUNKS_PER_DOCUMENT],
                seq: (i % CHUNKS_PER_DOCUMENT) as u32,
            };
            (id, text, random_unit(&mut rng))
        })
        .collect();
    let rss_before = rss_kb();
    let mut index = UserIndex::new();
    let started = Instant::now();
    for (chunk_id, text, embedding) in texts {
        if let Err(err) = index.add(IndexedChunk {
            chunk_id,
            text,
            embedding: Some(embedding),
        }) {
            eprintln!("add failed: {err}");
            std::process::exit(1);
        }
    }
    index.shrink_to_fit();
    let build = started.elapsed();
    let stats = index.stats();
    let rss_after = rss_kb();
    println!(
        "\n## {chunks} chunks ({} documents, {WORDS_PER_CHUNK} words and a {DIMS}-d vector each)",
        documents.len()
    );
    println!(
        "build: {:.2} s ({:.0} chunks/s); {} terms, {} postings; index ≈ {:.1} MiB \
         (vectors {:.1} MiB); RSS grew {:.1} MiB",
        build.as_secs_f64(),
        chunks as f64 / build.as_secs_f64(),
        stats.terms,
        stats.postings,
        stats.approx_bytes as f64 / (1 << 20) as f64,
        (stats.vectors * DIMS * 4) as f64 / (1 << 20) as f64,
        rss_after.saturating_sub(rss_before) as f64 / 1024.0,
    );

    let query_set: Vec<(String, Vec<f32>)> = (0..queries)
        .map(|_| {
            let n = rng.random_range(2..=6);
            let text = (0..n)
                .map(|_| words[zipf.sample(&mut rng)].as_str())
                .collect::<Vec<_>>()
                .join(" ");
            (text, random_unit(&mut rng))
        })
        .collect();
    let filter: Vec<Uuid> = documents.iter().take(3).copied().collect();

    println!("| mode | p50 | p99 | max | mean hits |");
    println!("| --- | --- | --- | --- | --- |");
    type Run<'a> = (&'a str, Box<dyn Fn(&str, &[f32]) -> Vec<Hit> + 'a>);
    let modes: Vec<Run> = vec![
        (
            "lexical (BM25)",
            Box::new(|q, _| index.search(q, None, None, TOP_K)),
        ),
        (
            "vector (exact cosine)",
            Box::new(|_, v| index.search("", Some(v), None, TOP_K)),
        ),
        (
            "hybrid (score fusion)",
            Box::new(|q, v| index.search(q, Some(v), None, TOP_K)),
        ),
        (
            "hybrid, filter: 3 documents",
            Box::new(|q, v| index.search(q, Some(v), Some(&filter), TOP_K)),
        ),
    ];
    for (name, run) in modes {
        // Warm up, then time each query.
        for (q, v) in query_set.iter().take(20) {
            std::hint::black_box(run(q, v));
        }
        let mut times = Vec::with_capacity(query_set.len());
        let mut hits = 0;
        for (q, v) in &query_set {
            let started = Instant::now();
            let result = std::hint::black_box(run(q, v));
            times.push(started.elapsed());
            hits += result.len();
        }
        times.sort();
        println!(
            "| {name} | {} | {} | {} | {:.1} |",
            ms(percentile(&times, 0.50)),
            ms(percentile(&times, 0.99)),
            ms(percentile(&times, 1.0)),
            hits as f64 / query_set.len() as f64
        );
    }
}

#[derive(serde::Deserialize)]
struct Passage {
    id: String,
    text: String,
}

#[derive(serde::Deserialize)]
struct Question {
    question: String,
    answer: String,
}

fn read_jsonl<T: serde::de::DeserializeOwned>(path: &PathBuf) -> Vec<T> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| {
        eprintln!("{}: {e}", path.display());
        std::process::exit(1)
    });
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| {
                eprintln!("{}: {e}", path.display());
                std::process::exit(1)
            })
        })
        .collect()
}

fn model_dir() -> PathBuf {
    std::env::var_os("CHORUS_MINILM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../data/models/all-MiniLM-L6-v2"
            ))
        })
}

fn embed(embedder: &LocalEmbedder, texts: &[String]) -> Vec<Vec<f32>> {
    embedder.embed_blocking(texts).unwrap_or_else(|e| {
        eprintln!("embedding failed: {e}");
        std::process::exit(1)
    })
}

fn recall(embedder: &LocalEmbedder) {
    let dir = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/retrieval"
    ));
    let passages: Vec<Passage> = read_jsonl(&dir.join("passages.jsonl"));
    let questions: Vec<Question> = read_jsonl(&dir.join("questions.jsonl"));
    let texts: Vec<String> = passages.iter().map(|p| p.text.clone()).collect();
    let vectors = embed(embedder, &texts);
    let mut index = UserIndex::new();
    let id_of = |i: usize| Uuid::from_u128(i as u128 + 1);
    for (i, (passage, vector)) in passages.iter().zip(vectors).enumerate() {
        let chunk = IndexedChunk {
            chunk_id: ChunkId {
                document_id: id_of(i),
                seq: 0,
            },
            text: passage.text.clone(),
            embedding: Some(vector),
        };
        if let Err(err) = index.add(chunk) {
            eprintln!("add failed: {err}");
            std::process::exit(1);
        }
    }
    let query_texts: Vec<String> = questions.iter().map(|q| q.question.clone()).collect();
    let query_vectors = embed(embedder, &query_texts);

    println!(
        "\n## Recall on tests/fixtures/retrieval ({} passages, {} questions, all-MiniLM-L6-v2)",
        passages.len(),
        questions.len()
    );
    println!("| mode | recall@1 | recall@3 | recall@5 | MRR@10 | missed at 3 |");
    println!("| --- | --- | --- | --- | --- | --- |");
    let rrf = index.clone().with_fusion(Fusion::Rrf { k: RRF_K });
    let hybrid_name = match index.fusion() {
        Fusion::Convex { vector_weight } => format!(
            "hybrid (score fusion, {vector_weight:.1}·cos + {:.1}·BM25; default)",
            1.0 - vector_weight
        ),
        Fusion::Rrf { k } => format!("hybrid (RRF, k = {k}; default)"),
    };
    type Mode<'a> = (String, Box<dyn Fn(&str, &[f32]) -> Vec<Hit> + 'a>);
    let modes: Vec<Mode> = vec![
        (
            "BM25 only".into(),
            Box::new(|q, _| index.search(q, None, None, 10)),
        ),
        (
            "vector only".into(),
            Box::new(|_, v| index.search("", Some(v), None, 10)),
        ),
        (
            format!("hybrid (RRF, k = {RRF_K})"),
            Box::new(|q, v| rrf.search(q, Some(v), None, 10)),
        ),
        (
            hybrid_name,
            Box::new(|q, v| index.search(q, Some(v), None, 10)),
        ),
    ];
    for (name, run) in modes {
        let (mut at1, mut at3, mut at5, mut rr) = (0, 0, 0, 0.0);
        let mut missed = Vec::new();
        for (question, vector) in questions.iter().zip(&query_vectors) {
            let hits = run(&question.question, vector);
            let rank = hits.iter().position(|h| {
                passages[(h.document_id.as_u128() - 1) as usize].id == question.answer
            });
            match rank {
                Some(r) => {
                    at1 += usize::from(r == 0);
                    at3 += usize::from(r < 3);
                    at5 += usize::from(r < 5);
                    rr += 1.0 / (r as f64 + 1.0);
                    if r >= 3 {
                        missed.push(question.answer.as_str());
                    }
                }
                None => missed.push(question.answer.as_str()),
            }
        }
        let n = questions.len() as f64;
        println!(
            "| {name} | {:.2} ({at1}/{}) | {:.2} ({at3}/{}) | {:.2} ({at5}/{}) | {:.3} | {} |",
            at1 as f64 / n,
            questions.len(),
            at3 as f64 / n,
            questions.len(),
            at5 as f64 / n,
            questions.len(),
            rr / n,
            if missed.is_empty() {
                "—".to_owned()
            } else {
                missed.join(", ")
            }
        );
    }
}

fn throughput(embedder: &LocalEmbedder) {
    let dir = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/retrieval"
    ));
    let passages: Vec<Passage> = read_jsonl(&dir.join("passages.jsonl"));
    let short: Vec<String> = (0..256)
        .map(|i| passages[i % passages.len()].text.clone() + &format!(" ({i})"))
        .collect();
    // Eight passages joined make a chunk longer than 256 tokens: truncated to exactly 256.
    let long: Vec<String> = (0..128)
        .map(|i| {
            (0..8)
                .map(|j| passages[(i * 8 + j) % passages.len()].text.as_str())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    println!("\n## Local embedding throughput (all-MiniLM-L6-v2, candle on the CPU, batch 32)");
    println!("| input | chunks | tokens | time | chunks/s | tokens/s |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for (name, texts) in [
        ("corpus passages", &short),
        ("long chunks (8 passages, cut at 256 tokens)", &long),
    ] {
        let tokens: usize = embedder
            .token_counts(texts)
            .map(|counts| counts.iter().sum())
            .unwrap_or(0);
        // Warm-up.
        embed(embedder, &texts[..8]);
        let started = Instant::now();
        let vectors = embed(embedder, texts);
        let elapsed = started.elapsed();
        std::hint::black_box(vectors);
        println!(
            "| {name} | {} | {tokens} | {:.2} s | {:.1} | {:.0} |",
            texts.len(),
            elapsed.as_secs_f64(),
            texts.len() as f64 / elapsed.as_secs_f64(),
            tokens as f64 / elapsed.as_secs_f64()
        );
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let queries: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(300);
    let sizes: Vec<usize> = args
        .next()
        .map(|a| a.split(',').filter_map(|s| s.parse().ok()).collect())
        .unwrap_or_else(|| vec![10_000, 100_000]);

    println!(
        "# Retrieval benchmark ({} cores)",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    for &size in &sizes {
        latency_run(size, queries);
    }

    let dir = model_dir();
    let started = Instant::now();
    let embedder = match LocalEmbedder::load(&dir, 32) {
        Ok(embedder) => embedder,
        Err(err) => {
            eprintln!("{err}");
            std::process::exit(1);
        }
    };
    println!(
        "\nmodel loaded from {} in {:.2} s",
        dir.display(),
        started.elapsed().as_secs_f64()
    );
    recall(&embedder);
    throughput(&embedder);
}
