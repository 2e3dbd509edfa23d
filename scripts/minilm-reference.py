#!/usr/bin/env python3
"""Reference sentence embeddings of all-MiniLM-L6-v2, for actors/tests/embed_local.rs.

An independent re-implementation of what sentence-transformers computes (BERT forward pass,
mean pooling over the attention mask, L2 normalisation; inputs truncated to 256 tokens, as
its `max_seq_length`), in float64 numpy from the same model files. torch is not needed.

    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install numpy safetensors tokenizers
    /tmp/ref/bin/python scripts/minilm-reference.py data/models/all-MiniLM-L6-v2

Prints, per sentence: the first 8 components, the sum of all 384, and the pairwise cosines.
"""

import json
import math
import sys

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

SENTENCES = [
    # sentence-transformers' own example; its published first components are
    # 0.0676569, 0.0634959, 0.0487131, 0.0793049, ...
    "This is an example sentence",
    "The cat sits on the mat.",
    "A cat is sitting on a rug.",
    "Quarterly revenue grew by twelve percent.",
    # Longer than 256 tokens: checks truncation.
    " ".join(["Retrieval augmented generation grounds answers in uploaded documents."] * 40),
]
MAX_TOKENS = 256

erf = np.vectorize(math.erf)


def layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def embed(model_dir, text):
    cfg = json.load(open(f"{model_dir}/config.json"))
    w = {k: v.astype(np.float64) for k, v in load_file(f"{model_dir}/model.safetensors").items()}
    tok = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
    tok.no_padding()
    tok.enable_truncation(MAX_TOKENS)
    ids = np.array(tok.encode(text).ids)
    n = len(ids)
    eps = cfg["layer_norm_eps"]
    heads = cfg["num_attention_heads"]
    x = (
        w["embeddings.word_embeddings.weight"][ids]
        + w["embeddings.position_embeddings.weight"][:n]
        + w["embeddings.token_type_embeddings.weight"][0]
    )
    x = layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
    d = x.shape[1] // heads
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        lin = lambda h, name: h @ w[p + name + ".weight"].T + w[p + name + ".bias"]
        q = lin(x, "attention.self.query").reshape(n, heads, d).transpose(1, 0, 2)
        k = lin(x, "attention.self.key").reshape(n, heads, d).transpose(1, 0, 2)
        v = lin(x, "attention.self.value").reshape(n, heads, d).transpose(1, 0, 2)
        s = q @ k.transpose(0, 2, 1) / math.sqrt(d)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        ctx = (s @ v).transpose(1, 0, 2).reshape(n, heads * d)
        x = layer_norm(
            lin(ctx, "attention.output.dense") + x,
            w[p + "attention.output.LayerNorm.weight"],
            w[p + "attention.output.LayerNorm.bias"],
            eps,
        )
        h = lin(x, "intermediate.dense")
        h = 0.5 * h * (1.0 + erf(h / math.sqrt(2.0)))
        x = layer_norm(
            lin(h, "output.dense") + x,
            w[p + "output.LayerNorm.weight"],
            w[p + "output.LayerNorm.bias"],
            eps,
        )
    pooled = x.mean(0)
    return pooled / np.linalg.norm(pooled), n


def main():
    model_dir = sys.argv[1] if len(sys.argv) > 1 else "data/models/all-MiniLM-L6-v2"
    vectors = []
    for text in SENTENCES:
        v, n = embed(model_dir, text)
        vectors.append(v)
        print(f"{text[:60]!r} tokens={n}")
        print("  first8 =", "[" + ", ".join(f"{c:.6f}" for c in v[:8]) + "]")
        print(f"  sum = {v.sum():.6f}")
    for i in range(len(vectors)):
        for j in range(i + 1, len(vectors)):
            print(f"cos({i},{j}) = {vectors[i] @ vectors[j]:.6f}")


if __name__ == "__main__":
    main()
