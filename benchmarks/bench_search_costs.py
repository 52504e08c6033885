"""Fit the cost model that IVFPQNeighbors(target_recall=...) chooses by.

``annlearn/_calibration.py`` picks, among the ``(nprobe, refine_factor)``
settings that reach a recall target, the one a cost model says is fastest:
seconds per query = ``cost_features(...) @ COSTS`` plus a part that does not
depend on the settings (the coarse search, the query's tables). This script
times IVF-PQ searches over a grid of both settings on several data sets and
code sizes (4-bit fast scan and 8-bit codes), computes each search's
features, and fits ``COSTS`` by non-negative least squares on relative
errors, with one free constant per index. It prints the fitted constants
next to those in use and, per index, how well each set predicts the times.

    python benchmarks/bench_search_costs.py
    python benchmarks/bench_search_costs.py --text     # and the text embeddings

Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from scipy.optimize import nnls

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import environment, load_data, print_environment  # noqa: E402

from annlearn import IVFPQNeighbors, _calibration  # noqa: E402
from annlearn.datasets import make_embeddings  # noqa: E402

NPROBE = (1, 2, 4, 8, 16, 32, 64)
REFINE = (None, 1, 2, 4, 8, 16, 32)


def indexes(text: bool):
    """(label, X, Q, estimator parameters)."""
    X, Q = load_data("fashion-mnist", 2000)
    yield "fashion 4-bit M98", X, Q, dict(nbits=4)
    yield "fashion 8-bit M98", X, Q, dict(nbits=8, n_subquantizers=98)
    yield "fashion 4-bit M196", X, Q, dict(nbits=4, n_subquantizers=196)
    E = make_embeddings(62_000, 256, random_state=0)
    yield "embeddings 256-d 4-bit", E[2000:], E[:2000], dict(nbits=4)
    yield "embeddings 256-d 8-bit", E[2000:], E[:2000], dict(nbits=8)
    if text:
        X, Q = load_data("debian-minilm", 2000)
        yield "text 4-bit", X, Q, dict(nbits=4, metric="inner_product")


def measure(label, X, Q, params, repeats, threads):
    index = IVFPQNeighbors(
        n_neighbors=10, refine_factor=4, random_state=0, n_jobs=threads, **params
    ).fit(X)
    codec, store = index._codec, index._store
    Xq = index._prepare(Q)
    cells, _ = codec.probe(Xq, max(NPROBE), threads)
    sizes = np.append(store.sizes(), 0)
    scanned = np.cumsum(sizes[cells], axis=1).mean(axis=0)
    rows = []
    for nprobe in NPROBE:
        for refine in REFINE:
            best = np.inf
            for _ in range(repeats):
                start = time.perf_counter()
                codec.search(
                    store,
                    Xq,
                    10,
                    nprobe=nprobe,
                    refine_factor=refine,
                    n_threads=threads,
                )
                best = min(best, time.perf_counter() - start)
            features = _calibration.cost_features(
                scanned=scanned[nprobe - 1],
                nprobe=nprobe,
                refine_factor=refine,
                n_neighbors=10,
                n_features=X.shape[1],
                n_subquantizers=index.n_subquantizers_,
                nbits=index.nbits,
            )
            rows.append(dict(index=label, seconds=best / len(Q), features=features))
    print(f"# {label}: {len(rows)} searches timed", flush=True)
    return rows


def fit(rows):
    labels = sorted({r["index"] for r in rows})
    n_terms = len(rows[0]["features"])
    A = np.zeros((len(rows), n_terms + len(labels)))
    b = np.array([r["seconds"] for r in rows])
    for i, r in enumerate(rows):
        A[i, :n_terms] = r["features"]
        A[i, n_terms + labels.index(r["index"])] = 1.0
    # Relative errors: every search counts alike, slow or fast.
    weights = 1.0 / b
    solution, _ = nnls(A * weights[:, None], b * weights)
    return solution[:n_terms], dict(zip(labels, solution[n_terms:], strict=True))


def report(rows, costs, constants, name):
    print(f"\n# {name}: " + ", ".join(f"{c:.3g}" for c in costs))
    for label, constant in constants.items():
        mine = [r for r in rows if r["index"] == label]
        predicted = np.array([r["features"] @ costs for r in mine]) + constant
        measured = np.array([r["seconds"] for r in mine])
        error = np.abs(predicted / measured - 1)
        print(
            f"#   {label}: constant {constant * 1e6:.1f} us, relative error "
            f"median {np.median(error):.2f}, max {error.max():.2f}"
        )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--text", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    print_environment(environment())
    rows = []
    for label, X, Q, params in indexes(args.text):
        rows += measure(label, X, Q, params, args.repeats, args.threads)
    costs, constants = fit(rows)
    report(rows, costs, constants, "fitted COSTS")
    # The constants in use, each index's constant refitted for them.
    used = _calibration.COSTS
    refit = {}
    for label in constants:
        mine = [r for r in rows if r["index"] == label]
        rest = np.array([r["seconds"] - r["features"] @ used for r in mine])
        refit[label] = max(float(np.median(rest)), 0.0)
    report(rows, used, refit, "COSTS in use")
    print(f"\nCOSTS = np.array([{', '.join(f'{c:.2e}' for c in costs)}])")


if __name__ == "__main__":
    main()
