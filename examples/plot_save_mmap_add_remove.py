"""
===========================================================
Save, memory-map, add and remove
===========================================================

Save an index atomically with ``annlearn.save``, load it memory-mapped (the
codes and ids stay on disk until read), keep adding and removing vectors by
id, and check that removed ids are never returned again and that the saved
file did not change.
"""

import argparse
import hashlib
import os
import tempfile
import time

import numpy as np
from _data import load

import annlearn
from annlearn import IVFPQNeighbors


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--n-train", type=int, default=60_000)
    parser.add_argument("--n-test", type=int, default=1_000)
    parser.add_argument("--nlist", type=int, default=256)
    # 28 sub-vectors of 28 features (the default, 98 of 8, trains 3 times
    # longer) trained on 20,000 rows: under a minute on two cores.
    parser.add_argument("--n-subquantizers", type=int, default=28)
    parser.add_argument("--nbits", type=int, default=8)
    parser.add_argument("--max-train-samples", type=int, default=20_000)
    args = parser.parse_args(argv)
    pq = dict(
        n_subquantizers=args.n_subquantizers,
        nbits=args.nbits,
        max_train_samples=args.max_train_samples,
    )
    X, Q = load(args.n_train, args.n_test)
    ids = np.arange(len(X), dtype=np.int64) * 10  # user ids, not positions

    index = IVFPQNeighbors(
        n_neighbors=5, nlist=args.nlist, nprobe=16, random_state=0, **pq
    ).fit(X, ids=ids)
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "index.joblib")
        annlearn.save(index, path)
        digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
        start = time.perf_counter()
        mapped = annlearn.load(path, mmap_mode="r")
        print(
            f"saved {os.path.getsize(path) / 1e6:.1f} MB; memory-mapped load in "
            f"{1e3 * (time.perf_counter() - start):.1f} ms"
        )

        found = mapped.kneighbors(Q[:10], return_distance=False)
        print("neighbours of the first query:", found[0])
        mapped.remove(np.unique(found[:, 0]))
        again = mapped.kneighbors(Q[:10], return_distance=False)
        assert not np.isin(found[:, 0], again).any()
        print("after remove:                 ", again[0])

        mapped.add(Q[:10], ids=np.arange(10) + 10 * len(X))
        print("after adding the queries:     ", mapped.kneighbors(Q[:1])[1][0])
        unchanged = hashlib.sha256(open(path, "rb").read()).hexdigest() == digest
        print(f"{mapped.n_samples_fit_} vectors indexed; file unchanged: {unchanged}")


if __name__ == "__main__":
    main()
