"""Loading a 1,000,000-vector index: time and memory, mapped or not.

Builds ``IVFPQNeighbors`` on 1,000,000 generated 96-d vectors (nlist=1024,
12 x 8-bit codes; once without and once with stored vectors for re-ranking),
saves each with ``annlearn.save`` (and with ``joblib.dump``, the pickle
format annlearn used before, for comparison), then loads it in a fresh
process and prints the load time, the growth of the process's resident
memory, and the time of a first search of 100 queries, for:

- ``annlearn.load(path)``: read into memory, every checksum verified;
- ``annlearn.load(path, mmap_mode="r")``: mapped, the header and the arrays
  up to 1 MiB verified;
- ``annlearn.load(path, mmap_mode="r", verify=True)``: mapped, every
  checksum verified (one read of the file through the page cache);
- ``joblib.load(path)`` and ``joblib.load(path, mmap_mode="r")``.

The files are freshly written, so they sit in the page cache: the times are
those of a warm load, not of a disk read.

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

import annlearn, joblib
path, reader, mmap_mode, verify = sys.argv[1:5]
mmap_mode = None if mmap_mode == "None" else mmap_mode
queries = np.random.default_rng(5).standard_normal((100, 96)).astype(np.float32)
before = rss_mb()
start = time.perf_counter()
if reader == "annlearn":
    index = annlearn.load(path, mmap_mode=mmap_mode, verify=json.loads(verify))
else:
    index = joblib.load(path, mmap_mode=mmap_mode)
load_s = time.perf_counter() - start
after_load = rss_mb()
start = time.perf_counter()
index.kneighbors(queries)
search_s = time.perf_counter() - start
print(json.dumps({"load_s": load_s, "rss_load_mb": after_load - before,
                  "search_s": search_s, "rss_search_mb": rss_mb() - before}))
"""

# (file format, mmap_mode, verify): the loads measured for each index.
LOADS = [
    ("annlearn", None, None),
    ("annlearn", "r", None),
    ("annlearn", "r", True),
    ("joblib", None, None),
    ("joblib", "r", None),
]


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()

    import joblib

    from annlearn import IVFPQNeighbors, save
    from annlearn.datasets import make_embeddings

    X = make_embeddings(args.n, 96, n_clusters=1000, random_state=0)
    print(f"# {args.n} x 96 float32 vectors, nlist=1024, 12 x 8-bit codes")
    print(
        "\n| index | format | file MB | save s | mmap_mode | verify | load s "
        "| RSS after load MB | first search (100 q) s | RSS after search MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
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
            paths, save_s = {}, {}
            for fmt, write in (("annlearn", save), ("joblib", joblib.dump)):
                paths[fmt] = os.path.join(directory, f"index-{refine}.{fmt}")
                start = time.perf_counter()
                write(index, paths[fmt])
                save_s[fmt] = time.perf_counter() - start
            del index
            name = "codes only" if refine is None else "codes + vectors"
            for fmt, mmap_mode, verify in LOADS:
                out = subprocess.run(
                    [
                        sys.executable,
                        "-c",
                        CHILD,
                        paths[fmt],
                        fmt,
                        str(mmap_mode),
                        json.dumps(verify),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                r = json.loads(out.stdout.strip().splitlines()[-1])
                size = os.path.getsize(paths[fmt]) / 1e6
                print(
                    f"| {name} (fit {fit_s:.0f} s) | {fmt} | {size:.0f} | "
                    f"{save_s[fmt]:.2f} | {mmap_mode} | "
                    f"{'' if fmt == 'joblib' else verify} | {r['load_s']:.3f} | "
                    f"{r['rss_load_mb']:.0f} | {r['search_s']:.3f} | "
                    f"{r['rss_search_mb']:.0f} |"
                )


if __name__ == "__main__":
    main()
