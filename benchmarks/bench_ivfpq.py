"""IVF-PQ: IVFPQNeighbors against FAISS IndexIVFPQ, both also with re-ranking.

annlearn.IVFPQNeighbors and ``faiss.IndexIVFPQ`` (each also with exact
re-ranking) run in one process, on the same data and threads.

    python benchmarks/bench_ivfpq.py
    env -u OPENBLAS_CORETYPE python benchmarks/bench_ivfpq.py

For every nprobe: recall@k, batch queries/s, single-query p50, and the ratio
annlearn / FAISS of the queries/s; fit time (train + add) and bytes per vector
of both.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    best_time,
    environment,
    environment_line,
    exact_ground_truth,
    latencies_us,
    load_data,
    pickled_bytes,
    print_environment,
    print_table,
    publish,
    recall_at_k,
    tie_aware_recall,
    write_json,
    write_recall_qps_plot,
)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", choices=["fashion-mnist", "random"], default="fashion-mnist"
    )
    parser.add_argument("--n-queries", type=int, default=10_000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency-queries", type=int, default=200)
    parser.add_argument("--nlist", type=int, default=256)
    parser.add_argument("--m", type=int, default=28, help="n_subquantizers")
    parser.add_argument("--nbits", type=int, default=8)
    parser.add_argument("--nprobes", default="1,2,4,8,16,32,64")
    parser.add_argument("--refine-factors", default="8")
    parser.add_argument("--refine-nprobes", default="4,8,16")
    parser.add_argument(
        "--no-exact",
        action="store_true",
        help="skip the exact baselines (FlatNeighbors, faiss IndexFlatL2)",
    )
    parser.add_argument(
        "--publish",
        action="store_true",
        help="also copy the results and plot to doc/_static/benchmarks/ "
        "(the doc site's benchmark page shows them)",
    )
    args = parser.parse_args(argv)

    import faiss

    from annlearn import IVFPQNeighbors

    env = environment()
    print_environment(env)
    X, Q = load_data(args.data, args.n_queries)
    n, d = X.shape
    k = args.k
    print(
        f"# data {args.data}: database {n} x {d}, {len(Q)} queries, k={k}, "
        f"threads={args.threads}, nlist={args.nlist}, M={args.m}, nbits={args.nbits}"
    )
    true_dist, true_ids = exact_ground_truth(X, Q, k)
    faiss.omp_set_num_threads(args.threads)
    nprobes = [int(v) for v in args.nprobes.split(",")]
    rows = []

    def run(system, config, index_search, set_nprobe, build_s, nbytes, label=None):
        probes = {"ivfpq": nprobes, "refine": refine_nprobes, "exact": [None]}
        for nprobe in probes[config]:
            set_nprobe(nprobe)
            seconds, found = best_time(lambda: index_search(Q), args.repeats)
            lat = latencies_us(index_search, Q[: args.latency_queries])
            rows.append(
                {
                    "system": system,
                    "config": label or config,
                    "nprobe": nprobe,
                    "build_s": build_s,
                    "bytes_per_vector": nbytes / n if config != "exact" else nbytes,
                    "qps": len(Q) / seconds,
                    "p50_us": float(np.percentile(lat, 50)),
                    "recall": recall_at_k(found, true_ids),
                    "recall_tie": tie_aware_recall(found, X, Q, true_dist),
                }
            )
            print(
                f"#   {system} nprobe={nprobe or '-'}: {rows[-1]['qps']:.0f} q/s, "
                f"recall {rows[-1]['recall']:.4f}",
                flush=True,
            )

    refine_nprobes = [int(v) for v in args.refine_nprobes.split(",")]
    # --- exact baselines: the recall = 1 end of the plot -----------------------
    if not args.no_exact:
        from annlearn import FlatNeighbors

        for system, build, search in (
            (
                "faiss IndexFlatL2",
                lambda: _faiss_flat(faiss, X),
                lambda index, q: index.search(q, k)[1],
            ),
            (
                "annlearn FlatNeighbors",
                lambda: FlatNeighbors(
                    n_neighbors=k, metric="sqeuclidean", n_jobs=args.threads
                ).fit(X),
                lambda index, q: index.kneighbors(q, return_distance=False),
            ),
        ):
            start = time.perf_counter()
            index = build()
            build_s = time.perf_counter() - start
            run(
                system,
                "exact",
                lambda q, index=index, search=search: search(index, q),
                lambda p: None,
                build_s,
                4 * d + 8,
            )

    # --- plain IVF-PQ --------------------------------------------------------
    start = time.perf_counter()
    quantizer = faiss.IndexFlatL2(d)
    fidx = faiss.IndexIVFPQ(quantizer, d, args.nlist, args.m, args.nbits)
    fidx.train(X)
    fidx.add(X)
    faiss_build = time.perf_counter() - start
    faiss_bytes = len(faiss.serialize_index(fidx))

    start = time.perf_counter()
    est = IVFPQNeighbors(
        n_neighbors=k,
        nlist=args.nlist,
        n_subquantizers=args.m,
        nbits=args.nbits,
        random_state=0,
        n_jobs=args.threads,
    ).fit(X)
    ours_build = time.perf_counter() - start

    run(
        "faiss IVFPQ",
        "ivfpq",
        lambda q: fidx.search(q, k)[1],
        lambda p: setattr(fidx, "nprobe", p),
        faiss_build,
        faiss_bytes,
    )
    run(
        "annlearn IVFPQ",
        "ivfpq",
        lambda q: est.kneighbors(q, return_distance=False),
        lambda p: est.set_params(nprobe=p),
        ours_build,
        pickled_bytes(est),
    )

    # --- with exact re-ranking ----------------------------------------------
    for factor in (int(v) for v in args.refine_factors.split(",")):
        start = time.perf_counter()
        base = faiss.IndexIVFPQ(faiss.IndexFlatL2(d), d, args.nlist, args.m, args.nbits)
        refine = faiss.IndexRefineFlat(base)
        refine.train(X)
        refine.add(X)
        refine.k_factor = factor
        f_build = time.perf_counter() - start
        f_bytes = len(faiss.serialize_index(refine))
        ivf = faiss.extract_index_ivf(refine)
        start = time.perf_counter()
        est_r = IVFPQNeighbors(
            n_neighbors=k,
            nlist=args.nlist,
            n_subquantizers=args.m,
            nbits=args.nbits,
            refine_factor=factor,
            random_state=0,
            n_jobs=args.threads,
        ).fit(X)
        o_build = time.perf_counter() - start
        run(
            f"faiss IVFPQ+RefineFlat k_factor={factor}",
            "refine",
            lambda q, index=refine: index.search(q, k)[1],
            lambda p, index=ivf: setattr(index, "nprobe", p),
            f_build,
            f_bytes,
            label=f"refine {factor}",
        )
        run(
            f"annlearn IVFPQ refine_factor={factor}",
            "refine",
            lambda q, est=est_r: est.kneighbors(q, return_distance=False),
            lambda p, est=est_r: est.set_params(nprobe=p),
            o_build,
            pickled_bytes(est_r),
            label=f"refine {factor}",
        )

    print()
    print_table(
        rows,
        [
            ("system", "s"),
            ("nprobe", "d"),
            ("build_s", ".2f"),
            ("bytes_per_vector", ".1f"),
            ("qps", ".0f"),
            ("p50_us", ".0f"),
            ("recall", ".4f"),
            ("recall_tie", ".4f"),
        ],
    )
    print("\nratios annlearn / faiss (same run, same nprobe):")
    by_key = {(r["system"], r["nprobe"]): r for r in rows}
    pairs = [("annlearn FlatNeighbors", "faiss IndexFlatL2")] * (not args.no_exact)
    pairs += [("annlearn IVFPQ", "faiss IVFPQ")] + [
        (f"annlearn IVFPQ refine_factor={f}", f"faiss IVFPQ+RefineFlat k_factor={f}")
        for f in args.refine_factors.split(",")
    ]
    ratios = []
    for ours_name, theirs_name in pairs:
        for nprobe in sorted({p for s, p in by_key if s == ours_name}):
            a, b = by_key[(ours_name, nprobe)], by_key[(theirs_name, nprobe)]
            probe = "exact" if nprobe is None else nprobe
            ratios.append(
                {
                    "annlearn": ours_name,
                    "faiss": theirs_name,
                    "nprobe": probe,
                    "qps_ratio": a["qps"] / b["qps"],
                    "recall_annlearn": a["recall"],
                    "recall_faiss": b["recall"],
                    "fit_ratio": a["build_s"] / b["build_s"],
                }
            )
            print(
                f"  {ours_name:<34} nprobe={probe:<5} qps x{a['qps'] / b['qps']:.2f}  "
                f"recall {a['recall']:.4f} vs {b['recall']:.4f} "
                f"({a['recall'] - b['recall']:+.4f})  "
                f"fit x{a['build_s'] / b['build_s']:.2f}"
            )
    path = write_json(
        "ivfpq",
        {"args": vars(args), "environment": env, "rows": rows, "ratios": ratios},
    )
    print(f"\nresults written to {path}")
    title = (
        f"{args.data}: {n} x {d} database, {len(Q)} queries, k={k}, "
        f"{args.threads} threads. IVF-PQ nlist={args.nlist}, M={args.m}, "
        f"nbits={args.nbits}; point labels: nprobe"
    )
    png = write_recall_qps_plot(
        rows, path[: -len(".json")] + ".png", title, footer=environment_line(env)
    )
    if png:
        print(f"plot written to {png}")
    if args.publish:
        for target in publish("ivfpq", path, png):
            print(f"published {target}")


def _faiss_flat(faiss, X):
    index = faiss.IndexFlatL2(X.shape[1])
    index.add(X)
    return index


if __name__ == "__main__":
    main()
