//! The local embedder against reference all-MiniLM-L6-v2 vectors.
//!
//! Needs the model files: `scripts/fetch-minilm` installs them into
//! `data/models/all-MiniLM-L6-v2` (the default; `CHORUS_MINILM_DIR` points elsewhere), and
//! `.ci/run` runs it before the tests. Without them these tests fail, saying so.
//!
//! The reference values come from `scripts/minilm-reference.py`, an independent float64 numpy
//! implementation of what sentence-transformers computes (its first sentence reproduces
//! sentence-transformers' published example vector).

use std::path::PathBuf;
use std::sync::OnceLock;

use chorus_actors::indexer::embed::Embedder;
use chorus_actors::indexer::embed::local::{ID, LocalEmbedder};

fn model_dir() -> PathBuf {
    match std::env::var_os("CHORUS_MINILM_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../data/models/all-MiniLM-L6-v2"
        )),
    }
}

fn embedder() -> &'static LocalEmbedder {
    static EMBEDDER: OnceLock<LocalEmbedder> = OnceLock::new();
    EMBEDDER.get_or_init(|| {
        let dir = model_dir();
        match LocalEmbedder::load(&dir, 8) {
            Ok(embedder) => embedder,
            Err(err) => panic!(
                "the all-MiniLM-L6-v2 model is needed in {}: run scripts/fetch-minilm \
                 (or set CHORUS_MINILM_DIR). {err}",
                dir.display()
            ),
        }
    })
}

struct Reference {
    text: String,
    first8: [f32; 8],
    sum: f32,
}

fn long_text() -> String {
    vec!["Retrieval augmented generation grounds answers in uploaded documents."; 40].join(" ")
}

/// `python3 scripts/minilm-reference.py data/models/all-MiniLM-L6-v2`
fn references() -> Vec<Reference> {
    let r = |text: &str, first8: [f32; 8], sum: f32| Reference {
        text: text.to_owned(),
        first8,
        sum,
    };
    vec![
        r(
            "This is an example sentence",
            [
                0.067657, 0.063496, 0.048713, 0.079305, 0.037448, 0.002653, 0.039375, -0.007098,
            ],
            0.271751,
        ),
        r(
            "The cat sits on the mat.",
            [
                0.134177, -0.032900, -0.024804, 0.041439, -0.036348, 0.041814, 0.031217, 0.037202,
            ],
            0.087549,
        ),
        r(
            "A cat is sitting on a rug.",
            [
                0.100130, -0.019275, 0.017466, 0.055746, -0.072660, 0.040779, 0.030093, 0.040514,
            ],
            0.151991,
        ),
        r(
            "Quarterly revenue grew by twelve percent.",
            [
                0.089042, 0.002117, -0.052243, -0.066734, -0.014047, -0.014082, -0.026275, 0.009938,
            ],
            0.040117,
        ),
        // 256 tokens after truncation.
        r(
            &long_text(),
            [
                -0.051789, -0.031963, -0.029534, 0.044741, 0.047968, 0.058186, 0.015353, 0.046990,
            ],
            -0.025483,
        ),
    ]
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

const TOLERANCE: f32 = 1e-4;

#[tokio::test]
async fn local_embedder_matches_sentence_transformers() {
    let embedder = embedder();
    assert_eq!(embedder.id(), ID);
    assert_eq!(embedder.dimensions(), 384);
    let references = references();
    let texts: Vec<String> = references.iter().map(|r| r.text.clone()).collect();
    // One call with inputs of very different lengths: padding must not change any vector.
    let vectors = embedder.embed(&texts).await.unwrap();
    assert_eq!(vectors.len(), references.len());
    for (reference, vector) in references.iter().zip(&vectors) {
        assert_eq!(vector.len(), 384);
        let norm = cosine(vector, vector).sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "norm {norm}");
        for (i, (got, want)) in vector.iter().zip(reference.first8).enumerate() {
            assert!(
                (got - want).abs() < TOLERANCE,
                "{:?}: component {i} is {got}, reference {want}",
                &reference.text[..reference.text.len().min(40)]
            );
        }
        let sum: f32 = vector.iter().sum();
        assert!(
            (sum - reference.sum).abs() < TOLERANCE,
            "{:?}: sum {sum}, reference {}",
            &reference.text[..reference.text.len().min(40)],
            reference.sum
        );
    }
    // Reference cosines: cat/cat-paraphrase 0.768879, cat/revenue -0.016183.
    assert!((cosine(&vectors[1], &vectors[2]) - 0.768879).abs() < TOLERANCE);
    assert!((cosine(&vectors[1], &vectors[3]) - -0.016183).abs() < TOLERANCE);
}

#[test]
fn batched_and_single_inputs_give_the_same_vectors() {
    let embedder = embedder();
    let texts: Vec<String> = [
        "short",
        "a somewhat longer sentence about databases and indexes",
        "",
        "Ünïcödé and emoji 🚀 are tokenized too",
        "short",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // Batch size 8 holds all five in one padded batch.
    let together = embedder.embed_blocking(&texts).unwrap();
    for (text, vector) in texts.iter().zip(&together) {
        let alone = embedder.embed_blocking(std::slice::from_ref(text)).unwrap();
        let max_diff = alone[0]
            .iter()
            .zip(vector)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(max_diff < 1e-5, "{text:?}: differs by {max_diff}");
    }
    assert_eq!(together[0], together[4]);
    assert!(embedder.embed_blocking(&[]).unwrap().is_empty());
}

#[tokio::test]
async fn paraphrases_are_closer_than_unrelated_texts() {
    let texts: Vec<String> = [
        "How do I reset my password?",
        "I forgot my login credentials and need to change them.",
        "The recipe needs two cups of flour and an egg.",
        "Mix flour, eggs and milk to make the batter.",
        "Jupiter is the largest planet in the solar system.",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let v = embedder().embed(&texts).await.unwrap();
    let (password, recipe, planet) = (0, 2, 4);
    assert!(cosine(&v[password], &v[1]) > cosine(&v[password], &v[recipe]));
    assert!(cosine(&v[password], &v[1]) > cosine(&v[password], &v[planet]));
    assert!(cosine(&v[recipe], &v[3]) > cosine(&v[recipe], &v[password]));
    assert!(cosine(&v[recipe], &v[3]) > cosine(&v[recipe], &v[planet]));
}
