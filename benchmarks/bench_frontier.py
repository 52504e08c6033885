"""The recall/speed frontier: annlearn's indexes against every peer, one run.

Each system runs over its parameter grid in this one process, on the same
data and threads. For every recall@10 level (0.90, 0.95, 0.99) the table gives
each system's best batch queries/s among the configurations reaching it, and
the ratio of annlearn's best to the best peer's. Ratios, not absolute times,
are what compares: the machine is noisy between runs. Within a run too: each
point is timed --repeats times when built, then the points that can win a
level (each system's three fastest reaching it) are timed again in --rounds
rounds that take turns, and the winners' single-query latencies are measured
in turns, so that a slow spell of the machine hits every system alike.

    OPENBLAS_CORETYPE=SkylakeX python benchmarks/bench_frontier.py

FAISS's bundled OpenBLAS picks its SSE3 "Prescott" kernel on CPUs it does not
know, which halves its flat search: set ``OPENBLAS_CORETYPE`` to the kernel
the CPU supports for this benchmark process (the header prints which kernel
each library runs). Peers: faiss-cpu (IVF-PQ + RefineFlat, IVF-PQ fast scan +
RFlat), hnswlib; install them with the ``bench`` extra.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _common import (
    DATA_METRIC,
    DATA_SETS,
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
    recall_qps_axes,
    save_recall_qps_plot,
    tie_aware_recall,
    write_json,
)

LEVELS = (0.90, 0.95, 0.99)


class Point:
    """One configuration of one system: its batch speed and recall, and how to
    set it up again and search one query (for the latency of the winners)."""

    def __init__(self, system, config, build_s, nbytes, n, setup, search, Q, repeats):
        self.system, self.config, self.build_s = system, config, build_s
        self.bytes_per_vector = nbytes / n
        self.setup, self.search = setup, search
        setup()
        seconds, self.ids = best_time(lambda: search(Q), repeats)
        self.qps = len(Q) / seconds

    def latencies(self, Q) -> np.ndarray:
        self.setup()
        return latencies_us(self.search, Q)


# (nprobe, re-ranking depth) points of every IVF with re-ranking, annlearn's
# and FAISS's alike; the full run adds _GRID_FULL.
_GRID_QUICK = [(4, 4), (8, 4), (8, 8), (16, 8), (16, 16), (32, 8), (32, 16), (32, 32)]
_GRID_FULL = [(64, 16), (64, 32), (64, 64), (128, 32), (128, 64)]


def _grid(quick: bool) -> list[tuple[int, int]]:
    return _GRID_QUICK + ([] if quick else _GRID_FULL)


def _m(d: int, features_per_code: int) -> int:
    """The divisor of ``d`` nearest ``d / features_per_code`` (PQ's code
    count must divide the features): 28 -> 28 of 784, 24 of 384."""
    divisors = [m for m in range(1, d + 1) if d % m == 0]
    return min(divisors, key=lambda m: (abs(m - d / features_per_code), m))


def annlearn_points(X, Q, k, metric, threads, repeats, quick):
    from annlearn import FlatNeighbors, IVFPQNeighbors

    metric = "inner_product" if metric == "ip" else "sqeuclidean"
    start = time.perf_counter()
    flat = FlatNeighbors(n_neighbors=k, metric=metric, n_jobs=threads).fit(X)
    build = time.perf_counter() - start
    yield Point(
        "annlearn-Flat",
        "FlatNeighbors(auto)",
        build,
        pickled_bytes(flat),
        len(X),
        lambda: None,
        lambda q: flat.kneighbors(q, return_distance=False),
        Q,
        repeats,
    )
    d = X.shape[1]
    codes = [(_m(d, 28), 8), (_m(d, 8), 4)]
    if not quick:
        codes += [(_m(d, 14), 4), (_m(d, 4), 4)]
    # The re-ranking copy in float32, and for the fast-scan codes of about
    # 8 features also in the smallest storage exact for the data: uint8 for
    # 8-bit data (pixels), float16 otherwise.
    compact = "uint8" if np.array_equal(X[:1000], np.round(X[:1000])) else "float16"
    configs = [(m, nbits, "float32", True) for m, nbits in codes]
    configs.append((_m(d, 8), 4, compact, True))
    # The 4-bit codes of the vectors themselves rather than of their
    # residuals (by_residual=False), which rank text embeddings better.
    configs.append((_m(d, 8), 4, compact, False))
    if not quick:
        configs.append((_m(d, 4), 4, compact, False))
    grid = _grid(quick)
    for nlist in (256,) if quick else (256, 1024):
        for m, nbits, storage, by_residual in configs:
            start = time.perf_counter()
            index = IVFPQNeighbors(
                n_neighbors=k,
                nlist=nlist,
                n_subquantizers=m,
                nbits=nbits,
                metric=metric,
                refine_factor=4,
                vector_dtype=storage,
                by_residual=by_residual,
                random_state=0,
                n_jobs=threads,
            ).fit(X)
            build = time.perf_counter() - start
            nbytes = pickled_bytes(index)
            name = f"IVF{nlist},PQ{m}x{nbits}" + ("" if by_residual else "(direct)")
            name += ",refine" + ("" if storage == "float32" else f"({storage})")
            for nprobe, refine in grid:
                yield Point(
                    "annlearn-IVFPQ",
                    f"{name} nprobe={nprobe} rf={refine}",
                    build,
                    nbytes,
                    len(X),
                    lambda i=index, p=nprobe, r=refine: i.set_params(
                        nprobe=p, refine_factor=r
                    ),
                    lambda q, i=index: i.kneighbors(q, return_distance=False),
                    Q,
                    repeats,
                )


def faiss_points(X, Q, k, metric, threads, repeats, quick):
    import faiss

    faiss.omp_set_num_threads(threads)
    fmetric = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
    d = X.shape[1]
    start = time.perf_counter()
    flat = faiss.IndexFlat(d, fmetric)
    flat.add(X)
    yield Point(
        "faiss-Flat",
        "IndexFlat",
        time.perf_counter() - start,
        len(faiss.serialize_index(flat)),
        len(X),
        lambda: None,
        lambda q: flat.search(q, k)[1],
        Q,
        repeats,
    )
    grid = _grid(quick)
    factories = [f"IVF256,PQ{_m(d, 14)}x4fs,RFlat", f"IVF256,PQ{_m(d, 28)}x8,RFlat"]
    if not quick:
        factories += [
            f"IVF1024,PQ{_m(d, 14)}x4fs,RFlat",
            f"IVF256,PQ{_m(d, 8)}x4fs,RFlat",
            f"IVF1024,PQ{_m(d, 8)}x4fs,RFlat",
            f"IVF256,PQ{_m(d, 4)}x4fs,RFlat",
            "IVF256,Flat",
            "IVF1024,Flat",
        ]
    for factory in factories:
        start = time.perf_counter()
        index = faiss.index_factory(d, factory, fmetric)
        index.train(X)
        index.add(X)
        build = time.perf_counter() - start
        nbytes = len(faiss.serialize_index(index))
        ivf = faiss.extract_index_ivf(index)
        refined = "RFlat" in factory
        # IVF-Flat has no re-ranking: its grid is nprobe alone.
        points = grid if refined else [(p, None) for p in (2, 4, 8, 16, 32, 64, 128)]
        for nprobe, refine in points:

            def setup(ivf=ivf, index=index, nprobe=nprobe, refine=refine):
                ivf.nprobe = nprobe
                if refine is not None:
                    index.k_factor = refine

            name = f"{factory} nprobe={nprobe}"
            if refine is not None:
                name += f" k_factor={refine}"
            yield Point(
                "faiss",
                name,
                build,
                nbytes,
                len(X),
                setup,
                lambda q, index=index: index.search(q, k)[1],
                Q,
                repeats,
            )


def hnswlib_points(X, Q, k, metric, threads, repeats, quick):
    import hnswlib

    for m in (16,) if quick else (16, 32):
        start = time.perf_counter()
        index = hnswlib.Index(space="ip" if metric == "ip" else "l2", dim=X.shape[1])
        index.init_index(max_elements=len(X), ef_construction=200, M=m)
        index.set_num_threads(threads)
        index.add_items(X, np.arange(len(X)))
        build = time.perf_counter() - start
        # Graph links and the float32 vectors (hnswlib has no serialisation
        # to bytes; its own estimate of the level-0 layout).
        nbytes = len(X) * (4 * X.shape[1] + 8 + 4 * (2 * m + 1))
        for ef in (10, 20, 40, 80, 160, 320):
            yield Point(
                "hnswlib",
                f"HNSW M={m} efC=200 ef={ef}",
                build,
                nbytes,
                len(X),
                lambda i=index, ef=ef: i.set_ef(max(ef, k)),
                lambda q, i=index: i.knn_query(q, k=k)[0],
                Q,
                repeats,
            )


def pynndescent_points(X, Q, k, metric, threads, repeats, quick):
    from pynndescent import NNDescent

    for n_neighbors in (30,) if quick else (30, 60):
        start = time.perf_counter()
        index = NNDescent(
            X,
            metric="dot" if metric == "ip" else "euclidean",
            n_neighbors=n_neighbors,
            random_state=0,
            n_jobs=threads,
            parallel_batch_queries=True,
        )
        index.prepare()
        build = time.perf_counter() - start
        nbytes = pickled_bytes(index)
        for epsilon in (0.0, 0.05, 0.1, 0.2, 0.3):
            yield Point(
                "pynndescent",
                f"NNDescent k={n_neighbors} epsilon={epsilon}",
                build,
                nbytes,
                len(X),
                lambda: None,
                lambda q, i=index, e=epsilon: i.query(q, k=k, epsilon=e)[0],
                Q,
                repeats,
            )


RUNNERS = {
    "annlearn": annlearn_points,
    "faiss": faiss_points,
    "hnswlib": hnswlib_points,
    "pynndescent": pynndescent_points,
}
_PEER_MODULES = {"faiss": "faiss", "hnswlib": "hnswlib", "pynndescent": "pynndescent"}


def frontier_table(points, levels, k):
    """Per recall level: each system's best point reaching it, and annlearn's
    best over the best peer's."""
    summary, ratios = [], {}
    for level in levels:
        best = {}
        for p in points:
            if p.recall >= level and p.qps > getattr(best.get(p.system), "qps", 0):
                best[p.system] = p
        for p in sorted(best.values(), key=lambda p: -p.qps):
            summary.append((level, p))
        ours = max(
            (p for s, p in best.items() if s.startswith("annlearn")),
            key=lambda p: p.qps,
            default=None,
        )
        peer = max(
            (p for s, p in best.items() if not s.startswith("annlearn")),
            key=lambda p: p.qps,
            default=None,
        )
        if ours and peer:
            ratios[f"recall@{k} >= {level:.2f}"] = ours.qps / peer.qps
            print(
                f"# recall@{k} >= {level:.2f}: annlearn {ours.qps:.0f} "
                f"({ours.config}) / best peer {peer.qps:.0f} "
                f"({peer.system} {peer.config}) = {ours.qps / peer.qps:.2f}x"
            )
    return summary, ratios


def retime_contenders(points, levels, Q, rounds: int, per_system: int = 3) -> None:
    """Time again, in rounds that take turns, each system's ``per_system``
    fastest points reaching each level; each point keeps its best time."""
    contenders = []
    for level in levels:
        for system in sorted({p.system for p in points}):
            mine = [p for p in points if p.system == system and p.recall >= level]
            for p in sorted(mine, key=lambda p: -p.qps)[:per_system]:
                if all(p is not c for c in contenders):
                    contenders.append(p)
    for _ in range(rounds):
        for p in contenders:
            p.setup()
            seconds, _ = best_time(lambda p=p: p.search(Q), 1)
            p.qps = max(p.qps, len(Q) / seconds)


def interleaved_latencies(winners, Q, rounds: int) -> dict:
    """Single-query latencies (us) of each winner, ``Q`` cut into ``rounds``
    parts that the winners take turns on; by ``id`` of the point."""
    parts = {id(p): [] for p in winners}
    for chunk in np.array_split(Q, max(rounds, 1)):
        for p in winners:
            parts[id(p)].append(p.latencies(chunk))
    return {key: np.concatenate(value) for key, value in parts.items()}


def write_pareto_plot(points, path, title, footer):
    """Recall against queries/s: every point faint, each system's Pareto
    curve drawn. None without matplotlib."""
    axes = recall_qps_axes()
    if axes is None:
        return None
    fig, ax = axes
    for i, system in enumerate(dict.fromkeys(p.system for p in points)):
        mine = sorted(
            (p for p in points if p.system == system), key=lambda p: -p.recall
        )
        pareto, fastest = [], 0.0
        for p in mine:
            if p.qps > fastest:
                pareto.append(p)
                fastest = p.qps
        color = f"C{i % 10}"
        style = "-" if system.startswith("annlearn") else "--"
        ax.scatter(
            [p.recall for p in mine], [p.qps for p in mine], s=8, color=color, alpha=0.3
        )
        ax.plot(
            [p.recall for p in pareto],
            [p.qps for p in pareto],
            style,
            marker="o",
            markersize=4,
            color=color,
            label=system,
        )
    for level in LEVELS:
        ax.axvline(level, color="#999999", linewidth=0.6, linestyle=":")
    ax.set_xlim(left=max(0.5, min(p.recall for p in points) - 0.02), right=1.002)
    return save_recall_qps_plot(fig, ax, path, title, footer)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="fashion-mnist", choices=DATA_SETS)
    parser.add_argument("--n-queries", type=int, default=10_000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds of the contenders' second timing and of the latencies",
    )
    parser.add_argument(
        "--latency-queries",
        type=int,
        default=1000,
        help="queries searched one at a time for the p50/p99 of the winners",
    )
    parser.add_argument("--quick", action="store_true", help="a smaller grid")
    parser.add_argument(
        "--systems",
        default=",".join(RUNNERS),
        help="comma-separated, of " + ", ".join(RUNNERS),
    )
    parser.add_argument(
        "--publish",
        action="store_true",
        help="also copy the results and plot to doc/_static/benchmarks/",
    )
    args = parser.parse_args(argv)
    systems = args.systems.split(",")
    # The peers are imported first, so that the header lists the BLAS each
    # one loaded and the kernel it runs.
    for name in systems:
        if name in _PEER_MODULES:
            __import__(_PEER_MODULES[name])
    env = environment()
    print_environment(env)
    X, Q = load_data(args.data, args.n_queries)
    metric = DATA_METRIC.get(args.data, "l2")
    # Unit rows (the text set) rank the same by inner product and by L2, so
    # one exact L2 ground truth serves both.
    true_dist, _ = exact_ground_truth(X, Q, args.k)
    print(
        f"# data {args.data}: {X.shape[0]} x {X.shape[1]}, {len(Q)} queries, "
        f"k={args.k}, threads={args.threads}, metric={metric}"
    )
    points = []
    for system in systems:
        for point in RUNNERS[system](
            X, Q, args.k, metric, args.threads, args.repeats, args.quick
        ):
            point.recall = tie_aware_recall(point.ids, X, Q, true_dist)
            del point.ids
            points.append(point)
            print(
                f"#   {point.system} {point.config}: {point.qps:.0f} q/s, "
                f"recall {point.recall:.4f}",
                flush=True,
            )
    retime_contenders(points, LEVELS, Q, args.rounds)
    summary, ratios = frontier_table(points, LEVELS, args.k)
    # Single-query latency of each level's winners, one query per call.
    winners = list({id(p): p for _, p in summary}.values())
    lat = interleaved_latencies(winners, Q[: args.latency_queries], args.rounds)
    latency = {
        key: (float(np.percentile(v, 50)), float(np.percentile(v, 99)))
        for key, v in lat.items()
    }
    rows = [
        dict(
            level=level,
            system=p.system,
            config=p.config,
            qps=p.qps,
            recall=p.recall,
            p50_us=latency[id(p)][0],
            p99_us=latency[id(p)][1],
            build_s=p.build_s,
            bytes_per_vector=p.bytes_per_vector,
        )
        for level, p in summary
    ]
    print_table(
        rows,
        [
            ("level", ".2f"),
            ("system", "s"),
            ("config", "s"),
            ("qps", ".0f"),
            ("recall", ".4f"),
            ("p50_us", ".0f"),
            ("p99_us", ".0f"),
            ("build_s", ".1f"),
            ("bytes_per_vector", ".0f"),
        ],
    )
    all_points = [
        dict(
            system=p.system,
            config=p.config,
            qps=p.qps,
            recall=p.recall,
            build_s=p.build_s,
            bytes_per_vector=p.bytes_per_vector,
        )
        for p in points
    ]
    payload = {
        "environment": env,
        "args": vars(args),
        "rows": rows,
        "ratios": ratios,
        "points": all_points,
    }
    path = write_json(f"frontier-{args.data}", payload)
    print("results written to", path)
    png = write_pareto_plot(
        points,
        path[: -len(".json")] + ".png",
        f"{args.data}: {X.shape[0]} x {X.shape[1]}, {len(Q)} queries, k={args.k}, "
        f"{args.threads} threads; each system's Pareto curve",
        environment_line(env),
    )
    if png:
        print("plot written to", png)
    if args.publish:
        for target in publish(f"frontier-{args.data}", path, png):
            print("published", target)


if __name__ == "__main__":
    main()
