"""Shared helpers of annlearn's benchmarks: data, timing, recall, reports.

Every benchmark runs annlearn and its peers in one process on the same data
and reports ratios from that one run (the machine is noisy: absolute times
from different runs are not comparable).
"""

from __future__ import annotations

import json
import os
import pickle
import platform
import shutil
import time
from collections.abc import Callable
from datetime import datetime, timezone

import numpy as np

# The data sets the benchmarks know, and the metric each is searched by
# ("ip": inner product, the text embeddings' unit rows; "l2" otherwise).
DATA_SETS = ("fashion-mnist", "debian-minilm", "random")
DATA_METRIC = {"debian-minilm": "ip"}
TEXT_EMBEDDINGS = os.path.join(os.path.dirname(__file__), "data", "debian-minilm.npz")


def load_data(name: str, n_queries: int | None = None):
    """(database, queries) float32: "fashion-mnist", "debian-minilm" (built
    by ``make_text_embeddings.py``) or "random"."""
    from annlearn.datasets import load_fashion_mnist, make_embeddings

    if name == "fashion-mnist":
        X, Q = load_fashion_mnist()
    elif name == "debian-minilm":
        if not os.path.exists(TEXT_EMBEDDINGS):
            raise SystemExit(
                f"{TEXT_EMBEDDINGS} is missing: build it with "
                "benchmarks/make_text_embeddings.py (see its docstring)."
            )
        with np.load(TEXT_EMBEDDINGS) as f:
            X, Q = f["X"], f["Q"]
    else:
        X = make_embeddings(60_000, 784, random_state=0)
        Q = make_embeddings(10_000, 784, random_state=1)
    if n_queries is not None:
        Q = Q[:n_queries]
    return np.ascontiguousarray(X), np.ascontiguousarray(Q)


def pickled_bytes(est) -> int:
    """Bytes of a fitted index as pickled (codes, ids, vectors, tables)."""
    return len(pickle.dumps(est, protocol=5))


def best_time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Best wall time of ``repeats`` calls, and the last result."""
    best, result = np.inf, None
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def latencies_us(
    search_one: Callable[[np.ndarray], object], Q: np.ndarray
) -> np.ndarray:
    """Single-query latencies in microseconds, after a short warm-up."""
    for q in Q[:5]:
        search_one(q[None, :])
    out = np.empty(len(Q))
    for i, q in enumerate(Q):
        start = time.perf_counter()
        search_one(q[None, :])
        out[i] = (time.perf_counter() - start) * 1e6
    return out


def exact_ground_truth(X: np.ndarray, Q: np.ndarray, k: int):
    """Exact squared distances and ids of the k nearest, in float64 blocks."""
    X64 = X.astype(np.float64)
    x_sq = np.einsum("ij,ij->i", X64, X64)
    dist = np.empty((len(Q), k))
    ids = np.empty((len(Q), k), dtype=np.int64)
    for start in range(0, len(Q), 500):
        q = Q[start : start + 500].astype(np.float64)
        d = x_sq[None, :] - 2 * q @ X64.T + np.einsum("ij,ij->i", q, q)[:, None]
        part = np.argpartition(d, k - 1, axis=1)[:, :k]
        dpart = np.take_along_axis(d, part, axis=1)
        order = np.argsort(dpart, axis=1, kind="stable")
        ids[start : start + 500] = np.take_along_axis(part, order, axis=1)
        dist[start : start + 500] = np.take_along_axis(dpart, order, axis=1)
    return np.maximum(dist, 0), ids


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of the true k nearest ids found (ids only)."""
    k = truth.shape[1]
    hits = sum(len(np.intersect1d(a[:k], b)) for a, b in zip(found, truth, strict=True))
    return hits / truth.size


def tie_aware_recall(found, X, Q, true_dist, rtol: float = 1e-6) -> float:
    """Recall where a returned id counts if its exact distance is <= the true
    k-th distance (ties at the k-th distance are all correct answers)."""
    k = true_dist.shape[1]
    kth = true_dist[:, -1]
    hits = 0
    for i, row in enumerate(found[:, :k]):
        row = row[row >= 0]
        diff = X[row].astype(np.float64) - Q[i].astype(np.float64)
        d = np.einsum("ij,ij->i", diff, diff)
        hits += int(np.sum(d <= kth[i] * (1 + rtol) + 1e-9))
    return hits / true_dist.size


def numpy_gemm_gflops(m: int = 4096, n: int = 60_000, k: int = 784, repeats: int = 3):
    """float32 ``A @ B.T`` GFLOP/s of numpy's BLAS, output preallocated."""
    rng = np.random.default_rng(0)
    A = rng.random((m, k), dtype=np.float32)
    B = rng.random((n, k), dtype=np.float32)
    C = np.ones((m, n), dtype=np.float32)
    seconds, _ = best_time(lambda: np.dot(A, B.T, out=C), repeats)
    return 2.0 * m * n * k / seconds / 1e9


def environment() -> dict:
    """What the figures were measured on."""
    from importlib.metadata import PackageNotFoundError, version

    from threadpoolctl import threadpool_info

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {}
    for pkg in (
        "annlearn",
        "numpy",
        "scipy",
        "scikit-learn",
        "faiss-cpu",
        "hnswlib",
        "pynndescent",
    ):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    pools = [
        {
            key: info.get(key)
            for key in (
                "internal_api",
                "version",
                "architecture",
                "num_threads",
                "filepath",
            )
        }
        for info in threadpool_info()
    ]
    from annlearn._flat_search import DEFAULT_GEMM
    from annlearn._utils._packed_gemm import _simd_isa

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "n_cpus": os.cpu_count(),
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE", "unset"),
        "annlearn_gemm": DEFAULT_GEMM,
        "annlearn_isa": _simd_isa(),
        "versions": versions,
        "threadpools": pools,
    }


def print_environment(env: dict) -> None:
    print(f"# {env['date']}  CPU: {env['cpu']} ({env['n_cpus']} CPUs)")
    print(
        f"# OPENBLAS_CORETYPE={env['OPENBLAS_CORETYPE']}  "
        f"annlearn GEMM: {env['annlearn_gemm']}"
    )
    print("# " + "  ".join(f"{k} {v}" for k, v in env["versions"].items() if v))
    for pool in env["threadpools"]:
        lib = os.path.basename(pool["filepath"] or "?")
        print(
            f"#   {pool['internal_api']} {pool['version'] or ''} "
            f"arch={pool['architecture'] or '-'} threads={pool['num_threads']} ({lib})"
        )


def start_with_peers(systems) -> dict:
    """Import the peers among ``systems`` (faiss, hnswlib), then print the
    environment header and return it: imported first, the peers' BLAS and the
    kernel it runs are in the header."""
    for name in ("faiss", "hnswlib"):
        if name in systems:
            __import__(name)
    env = environment()
    print_environment(env)
    return env


def print_table(rows: list[dict], columns: list[tuple[str, str]]) -> None:
    """Markdown table; ``columns`` are (key, format) pairs."""
    print("| " + " | ".join(key for key, _ in columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        cells = []
        for key, fmt in columns:
            value = row.get(key)
            cells.append("-" if value is None else format(value, fmt))
        print("| " + " | ".join(cells) + " |")


def write_json(name: str, payload: dict) -> str:
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(folder, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(folder, f"{name}-{stamp}.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    return path


# Where --publish puts a benchmark's latest results for the doc site
# (doc/benchmarks.rst shows them).
PUBLISHED = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "doc",
    "_static",
    "benchmarks",
)


def publish(name: str, *paths: str) -> list[str]:
    """Copy a run's result files to ``doc/_static/benchmarks/<name>-latest.*``."""
    os.makedirs(PUBLISHED, exist_ok=True)
    out = []
    for path in paths:
        if path is None:
            continue
        target = os.path.join(PUBLISHED, f"{name}-latest{os.path.splitext(path)[1]}")
        shutil.copyfile(path, target)
        out.append(target)
    return out


def environment_line(env: dict) -> str:
    """One line naming the machine and the versions a run was measured with."""
    return (
        f"{env['cpu']} ({env['n_cpus']} CPUs, annlearn ISA {env.get('annlearn_isa')},"
        f" OPENBLAS_CORETYPE={env['OPENBLAS_CORETYPE']}), {env['date']}; "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    )


def recall_qps_axes():
    """A figure and axes for a recall/queries-per-second plot, or None
    without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt.subplots(figsize=(7.5, 5))


def save_recall_qps_plot(fig, ax, path: str, title: str, footer: str) -> str:
    """Label the axes (recall@10 against log queries/s), print ``footer``
    (the machine and versions) under them, save to ``path`` and close."""
    import textwrap

    import matplotlib.pyplot as plt

    ax.set_yscale("log")
    ax.set_xlabel("recall@10")
    ax.set_ylabel("queries / second (log)")
    ax.set_title(textwrap.fill(title, 90), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    if footer:
        wrapped = textwrap.fill(footer, 120)
        lines = wrapped.count("\n") + 1
        fig.subplots_adjust(bottom=fig.subplotpars.bottom + 0.03 * lines)
        fig.text(0.01, 0.01, wrapped, fontsize=6, color="#555555", va="bottom")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_recall_qps_plot(
    rows: list[dict], path: str, title: str, footer: str = ""
) -> str | None:
    """Recall against queries/second (log scale), one curve per system and
    configuration, each point labelled with its nprobe (exact search is a
    star); systems of the same ``config`` share a colour, annlearn solid and
    the peer dashed. ``footer`` (the machine and versions) is printed under
    the axes. None without matplotlib."""
    axes = recall_qps_axes()
    if axes is None:
        return None
    fig, ax = axes
    configs = list(dict.fromkeys(r.get("config", r["system"]) for r in rows))
    for system in dict.fromkeys(r["system"] for r in rows):
        points = sorted(
            (r for r in rows if r["system"] == system),
            key=lambda r: -1 if r["nprobe"] is None else r["nprobe"],
        )
        exact = all(r["nprobe"] is None for r in points)
        style = "-" if system.startswith("annlearn") else "--"
        line = ax.plot(
            [r["recall"] for r in points],
            [r["qps"] for r in points],
            style,
            marker="*" if exact else "o",
            markersize=12 if exact else 6,
            markerfacecolor=None if style == "-" else "white",
            color=f"C{configs.index(points[0].get('config', system)) % 10}",
            label=system,
        )[0]
        for r in points:
            if r["nprobe"] is None:
                continue
            ax.annotate(
                str(r["nprobe"]),
                (r["recall"], r["qps"]),
                fontsize=7,
                color=line.get_color(),
                xytext=(3, 3),
                textcoords="offset points",
            )
    return save_recall_qps_plot(fig, ax, path, title, footer)
