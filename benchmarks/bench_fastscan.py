"""Fast-scan micro-benchmark: the 4-bit PQ scan kernel against the 8-bit scan.

The scan alone, on one IVF layout (a coarse k-means of nlist cells, codes of
the residuals sorted by cell) and the same probed cells for every code: the
8-bit scan of today's IVFPQNeighbors (``_ivf.ivfpq_scan``, which computes its
float lookup tables inside) and the 4-bit fast scan (``_fastscan.ivf_fastscan``)
for each M of --m4, with the kernels this CPU runs and, for the first M, the
AVX2 and portable kernels too. Both keep the --k best candidates per query.

    python benchmarks/bench_fastscan.py
    python benchmarks/bench_fastscan.py --data random --nprobe 32

Each 4-bit code set is also scanned by the 8-bit kernel with float tables
(same codes, exact ADC), which shows the speed-up on identical codes and the
recall lost to the uint8 tables. Reported per configuration: the scan time
and codes scanned per second (probed rows are the same for every code), the
speed-up over the first row, the time of ``_fastscan.ivf_tables`` (the 4-bit
tables, which ivfpq_scan builds inside its scan time), the scan plus tables
and its speed-up, and recall@10 after exact re-ranking of the k candidates
(``_ivf.refine``), so that speed is read next to candidate quality. A last
row per M times ``_fastscan.ivf_fastscan_queries``, tables and scan fused one
query at a time (what IVFPQNeighbors runs; its scan time includes the
tables). Times are the best of --repeats runs in this process.
"""

from __future__ import annotations

import argparse
import os
import sys
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
    recall_at_k,
)


def build_layout(X, nlist, n_train, threads, seed):
    """Coarse quantizer, the rows sorted by cell and the list offsets."""
    from annlearn._quantizers import CoarseQuantizer

    rng = np.random.default_rng(seed)
    train = X[np.sort(rng.choice(len(X), min(n_train, len(X)), replace=False))]
    coarse = CoarseQuantizer.train(
        train, nlist, max_iter=10, random_state=seed, n_threads=threads
    )
    assign = coarse.assign(X, threads)
    order = np.argsort(assign, kind="stable")
    offsets = np.searchsorted(assign[order], np.arange(nlist + 1)).astype(np.int64)
    residuals = np.ascontiguousarray(X[order] - coarse.centers[assign[order]])
    return coarse, order, offsets, residuals


def train_pq(residuals, M, nbits, n_train, threads, seed):
    from annlearn._quantizers import ProductQuantizer

    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(residuals), min(n_train, len(residuals)), False))
    pq = ProductQuantizer.train(
        np.ascontiguousarray(residuals[rows]),
        M,
        nbits,
        max_iter=10,
        random_state=seed,
        n_threads=threads,
    )
    return pq, pq.encode(residuals, threads)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", choices=["fashion-mnist", "random"], default="fashion-mnist"
    )
    parser.add_argument("--n-queries", type=int, default=2000)
    parser.add_argument("--k", type=int, default=40, help="candidates kept per query")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--nlist", type=int, default=256)
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--m8", type=int, default=28, help="M of the 8-bit codes")
    parser.add_argument("--m4", default="28,56,98", help="M of the 4-bit codes")
    parser.add_argument("--n-train", type=int, default=20_000)
    args = parser.parse_args(argv)

    from annlearn import _fastscan, _ivf

    env = environment()
    print_environment(env)
    X, Q = load_data(args.data, args.n_queries)
    n, d = X.shape
    threads, k = args.threads, args.k
    print(
        f"# data {args.data}: database {n} x {d}, {len(Q)} queries, k={k} "
        f"candidates, threads={threads}, nlist={args.nlist}, nprobe={args.nprobe}, "
        f"fast-scan ISA {_fastscan.fastscan_isa()}"
    )
    _, true_ids = exact_ground_truth(X, Q, 10)
    start = time.perf_counter()
    coarse, order, offsets, residuals = build_layout(
        X, args.nlist, args.n_train, threads, 0
    )
    sorted_X = np.ascontiguousarray(X[order])
    base, cells = coarse.search(Q, args.nprobe, threads)
    probed = int(np.diff(offsets)[cells].sum())
    print(
        f"# layout built in {time.perf_counter() - start:.1f} s; {probed} probed rows"
    )

    def recall(positions):
        _, best = _ivf.refine(Q, sorted_X, positions, 10, False, threads)
        return recall_at_k(order[np.maximum(best, 0)], true_ids)

    rows = []

    def scan8(pq, codes):
        """Today's kernel (float tables, one lookup per code and sub-space)."""
        term2 = pq.term2_tables(coarse.centers)
        return partial(
            _ivf.ivfpq_scan,
            Q,
            cells,
            base,
            pq.codebooks_t,
            term2,
            offsets,
            codes,
            k,
            False,
            threads,
        )

    def add_row(codes, nbytes, kernel, isa, fn, **extra):
        seconds, (_, positions) = best_time(fn, args.repeats)
        row = {"codes": codes, "bytes": nbytes, "kernel": kernel, "isa": isa}
        row.update(scan_ms=1e3 * seconds, Mcodes_per_s=probed / seconds / 1e6)
        row.update(extra, recall10=recall(positions))
        rows.append(row)
        print(f"#   {codes} {kernel} {isa}: {row['scan_ms']:.1f} ms", flush=True)

    pq8, codes8 = train_pq(residuals, args.m8, 8, args.n_train, threads, 0)
    add_row(f"{args.m8}x8", args.m8, "ivfpq_scan", "-", scan8(pq8, codes8))
    # The narrower kernels (what other CPUs run) for the first M only.
    narrower = {"avx512": ["avx2", "none"], "avx2": ["none"], "none": []}
    for i, M in enumerate(int(m) for m in args.m4.split(",")):
        pq4, codes4 = train_pq(residuals, M, 4, args.n_train, threads, 0)
        # The same 4-bit codes through today's kernel: float tables, so the
        # recall lost to the uint8 tables shows, and the speed-up on the
        # same codes.
        add_row(f"{M}x4", M / 2, "ivfpq_scan", "-", scan8(pq4, codes4))
        packed, blocks = _fastscan.pack_lists(codes4, offsets)
        term2 = pq4.term2_tables(coarse.centers)
        table_args = (Q, pq4.codebooks_t, term2, cells, base, False)
        tables_s, (qt, scale, bias) = best_time(
            partial(_fastscan.ivf_tables, *table_args, threads), args.repeats
        )
        scan_args = (qt, scale, bias, cells, packed, blocks, offsets, k, threads)
        for isa in [None] + (narrower[_fastscan.fastscan_isa()] if i == 0 else []):
            add_row(
                f"{M}x4",
                M / 2,
                "ivf_fastscan",
                isa or _fastscan.fastscan_isa(),
                partial(_fastscan.ivf_fastscan, *scan_args, isa),
                tables_ms=1e3 * tables_s,
            )
        # Tables and scan fused, one query at a time (what IVFPQNeighbors
        # runs): its scan_ms includes the tables.
        add_row(
            f"{M}x4",
            M / 2,
            "ivf_fastscan_queries",
            _fastscan.fastscan_isa(),
            partial(
                _fastscan.ivf_fastscan_queries,
                *table_args,
                packed,
                blocks,
                offsets,
                k,
                threads,
            ),
        )
    for row in rows:
        row["speedup"] = rows[0]["scan_ms"] / row["scan_ms"]
        row["with_tables_ms"] = row["scan_ms"] + row.get("tables_ms", 0)
        row["speedup_with_tables"] = rows[0]["scan_ms"] / row["with_tables_ms"]
    print_table(
        rows,
        [
            ("codes", ""),
            ("bytes", "g"),
            ("kernel", ""),
            ("isa", ""),
            ("scan_ms", ".1f"),
            ("Mcodes_per_s", ".0f"),
            ("speedup", ".2f"),
            ("tables_ms", ".1f"),
            ("with_tables_ms", ".1f"),
            ("speedup_with_tables", ".2f"),
            ("recall10", ".4f"),
        ],
    )
    print(
        "# scan_ms: ivfpq_scan builds its float tables inside, ivf_fastscan takes "
        "quantized ones: tables_ms is ivf_tables (4-bit tables from the queries), "
        "with_tables_ms the sum; speedup and speedup_with_tables: the first row's "
        "scan_ms over this row's scan_ms / with_tables_ms (same probed rows); "
        "recall10: recall@10 after exact re-ranking of the k candidates."
    )


if __name__ == "__main__":
    main()
