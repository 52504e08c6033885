"""Loading a 1,000,000-vector index: time and resident memory, with and
without memory-mapping.

Builds ``IVFPQNeighbors`` on 1,000,000 generated 96-d vectors (nlist=1024,
12 x 8-bit codes; once without and once with stored vectors for re-ranking),
saves each with ``annlearn.save``, then loads it in a fresh process with
``annlearn.load(path)`` and ``annlearn.load(path, mmap_mode="r")``, printing
the load time, the growth of the process's resident memory, and the time of
a first search of 100 queries.

    python benchmarks/bench_persistence.py [--n 1000000] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, sys, time
import numpy as np

def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

import annlearn
path, mmap_mode = sys.argv[1], (sys.argv[2] if sys.argv[2] != "None" else None)
queries = np.random.default_rng(5).standard_normal((100, 96)).astype(np.float32)
before = rss_mb()
start = time.perf_counter()
index = annlearn.load(path, mmap_mode=mmap_mode)
load_s = time.perf_counter() - start
after_load = rss_mb()
start = time.perf_counter()
index.kneighbors(queries)
search_s = time.perf_counter() - start
print(json.dumps({"load_s": load_s, "rss_load_mb": after_load - before,
                  "search_s": search_s, "rss_search_mb": rss_mb() - before}))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()

    from annlearn import IVFPQNeighbors, save
    from annlearn.datasets import make_embeddings

    X = make_embeddings(args.n, 96, n_clusters=1000, random_state=0)
    print(f"# {args.n} x 96 float32 vectors, nlist=1024, 12 x 8-bit codes")
    print(
        "\n| index | file MB | mmap_mode | load s | RSS after load MB "
        "| first search (100 q) s | RSS after search MB |"
    )
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        for refine in (None, 4):
            start = time.perf_counter()
            index = IVFPQNeighbors(
                n_neighbors=10,
                nlist=1024,
                nprobe=16,
                n_subquantizers=12,
                refine_factor=refine,
                random_state=0,
            ).fit(X)
            fit_s = time.perf_counter() - start
            path = os.path.join(directory, f"index-{refine}.joblib")
            save(index, path)
            del index
            size = os.path.getsize(path) / 1e6
            name = "codes only" if refine is None else "codes + vectors"
            for mmap_mode in (None, "r"):
                out = subprocess.run(
                    [sys.executable, "-c", CHILD, path, str(mmap_mode)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                r = json.loads(out.stdout.strip().splitlines()[-1])
                print(
                    f"| {name} (fit {fit_s:.0f} s) | {size:.0f} | {mmap_mode} | "
                    f"{r['load_s']:.3f} | {r['rss_load_mb']:.0f} | "
                    f"{r['search_s']:.3f} | {r['rss_search_mb']:.0f} |"
                )


if __name__ == "__main__":
    main()
