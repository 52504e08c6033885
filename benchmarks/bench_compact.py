"""Compact re-ranking vectors: IVF-PQ with float32, float16 and uint8 storage.

IVFPQNeighbors keeps a copy of every vector to re-rank its best candidates
(``refine_factor``); ``vector_dtype`` stores it as float32 (4 bytes per
feature), float16 (2) or uint8 (1, per-feature scalar quantization, exact on
8-bit data such as Fashion-MNIST's pixels). For each code configuration of
--configs (nlist,M,nbits) the quantizers are trained once (a joblib.Memory
cache shared by the three storages, so the codes are identical) and every
storage is searched over the grid of --refine and --nprobe, in this one
process, with --threads threads.

    python benchmarks/bench_compact.py
    python benchmarks/bench_compact.py --n-queries 2000 --refine 4,16

Reported per (configuration, storage, refine, nprobe): bytes per vector in
the lists (codes, id and the stored vector), recall@10 against the exact
neighbours (a returned id counts when its float64 distance is at most the
true 10th, so ties count fairly), batch queries per second (best of
--repeats rounds in which the storages take turns) and the ratios of both to
float32 storage at the same point. On 8-bit data uint8 must give exactly
float32's neighbours and distances: the run checks it and says so.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from functools import partial

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    best_time,
    environment,
    exact_ground_truth,
    load_data,
    print_environment,
    print_table,
    tie_aware_recall,
    write_json,
)

STORAGES = ("float32", "float16", "uint8")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", choices=["fashion-mnist", "random"], default="fashion-mnist"
    )
    parser.add_argument("--n-queries", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--configs",
        default="256,98,4;256,28,8",
        help="code configurations nlist,M,nbits separated by ';'",
    )
    parser.add_argument(
        "--cache",
        default=None,
        help="joblib.Memory folder of the training (default: a new temporary "
        "one); a run given the folder of an earlier one skips the training",
    )
    parser.add_argument("--refine", default="4,8,16", help="refine factors")
    parser.add_argument("--nprobe", default="4,8,16", help="cells probed")
    args = parser.parse_args(argv)

    from joblib import Memory

    from annlearn import IVFPQNeighbors

    env = environment()
    print_environment(env)
    X, Q = load_data(args.data, args.n_queries)
    k, threads = 10, args.threads
    print(
        f"# data {args.data}: database {X.shape[0]} x {X.shape[1]}, {len(Q)} "
        f"queries, k={k}, threads={threads}, best of {args.repeats}"
    )
    true_dist, _ = exact_ground_truth(X, Q, k)
    rows, checks = [], []
    cache = args.cache or tempfile.mkdtemp(prefix="annlearn-bench-compact-")
    print(f"# training cache: {cache}")
    for config in args.configs.split(";"):
        nlist, M, nbits = _ints(config)
        label = f"IVF{nlist},PQ{M}x{nbits}"
        indexes = {}
        for storage in STORAGES:
            start = time.perf_counter()
            indexes[storage] = IVFPQNeighbors(
                n_neighbors=k,
                nlist=nlist,
                n_subquantizers=M,
                nbits=nbits,
                refine_factor=4,
                vector_dtype=storage,
                memory=Memory(cache, verbose=0),
                random_state=0,
                n_jobs=threads,
            ).fit(X)
            print(
                f"# {label} {storage}: fit {time.perf_counter() - start:.1f} s",
                flush=True,
            )
        for refine in _ints(args.refine):
            for nprobe in _ints(args.nprobe):
                for index in indexes.values():
                    index.set_params(refine_factor=refine, nprobe=nprobe)
                # The storages take turns, best of --repeats rounds: a slow
                # spell of the machine hits every storage alike.
                seconds = dict.fromkeys(STORAGES, np.inf)
                results = {}
                for _ in range(max(1, args.repeats)):
                    for storage in STORAGES:
                        elapsed, results[storage] = best_time(
                            partial(indexes[storage].kneighbors, Q), 1
                        )
                        seconds[storage] = min(seconds[storage], elapsed)
                for storage in STORAGES:
                    ids = results[storage][1]
                    recall = tie_aware_recall(ids, X, Q, true_dist)
                    summary = indexes[storage].summary()
                    per_vector = int(summary.split("bytes per vector: ")[1].split()[0])
                    qps = len(Q) / seconds[storage]
                    rows.append(
                        dict(
                            config=label,
                            storage=storage,
                            refine=refine,
                            nprobe=nprobe,
                            bytes=per_vector,
                            recall=recall,
                            qps=qps,
                        )
                    )
                    if storage == "float32":
                        base = rows[-1]
                    rows[-1]["qps_ratio"] = qps / base["qps"]
                    rows[-1]["recall_diff"] = recall - base["recall"]
                    print(
                        f"#   {label} {storage} refine {refine} nprobe {nprobe}: "
                        f"recall {recall:.4f}, {qps:.0f} q/s",
                        flush=True,
                    )
                same = all(
                    np.array_equal(a, b)
                    for a, b in zip(results["uint8"], results["float32"], strict=True)
                )
                checks.append(same)
    print()
    print_table(
        rows,
        [
            ("config", "s"),
            ("storage", "s"),
            ("refine", "d"),
            ("nprobe", "d"),
            ("bytes", "d"),
            ("recall", ".4f"),
            ("recall_diff", "+.4f"),
            ("qps", ".0f"),
            ("qps_ratio", ".2f"),
        ],
    )
    print()
    print(
        f"# uint8 gave exactly float32's neighbours and distances at "
        f"{sum(checks)} of {len(checks)} grid points"
    )
    for storage in STORAGES:
        ratios = [r["qps_ratio"] for r in rows if r["storage"] == storage]
        print(
            f"# {storage}: QPS / float32 QPS, geometric mean "
            f"{np.exp(np.mean(np.log(ratios))):.3f} (min {min(ratios):.3f}, max "
            f"{max(ratios):.3f})"
        )
    path = write_json("bench_compact", {"environment": env, "rows": rows})
    print(f"# results: {path}")


if __name__ == "__main__":
    main()
