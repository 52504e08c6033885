"""User-guide figure: the inverted file's cells and what nprobe scans.

Built at doc-build time with annlearn itself, on 2-D generated data.
"""

import matplotlib.pyplot as plt
import numpy as np

from annlearn import FlatNeighbors, IVFPQNeighbors

rng = np.random.default_rng(3)
means = rng.uniform(-4, 4, size=(6, 2))
X = np.vstack([m + rng.standard_normal((160, 2)) for m in means]).astype(np.float32)
k = 10
# Re-ranked (refine_factor), so that only the probed cells limit recall here.
ivf = IVFPQNeighbors(
    n_neighbors=k,
    nlist=12,
    n_subquantizers=2,
    nbits=4,
    refine_factor=8,
    random_state=0,
).fit(X)
centres = ivf.cluster_centers_
exact = FlatNeighbors(n_neighbors=k).fit(X)

# Cell of every pixel: the nearest centre.
lo, hi = X.min(axis=0) - 0.5, X.max(axis=0) + 0.5
gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], 300), np.linspace(lo[1], hi[1], 300))
pixels = np.c_[gx.ravel(), gy.ravel()].astype(np.float32)
by_centre = FlatNeighbors(n_neighbors=1).fit(centres)
cell_of_pixel = by_centre.kneighbors(pixels, return_distance=False)[:, 0]

# The query: of candidate points, one near cell borders, whose neighbours
# one probe misses most and three probes find.
candidates = X[::7] + np.float32(0.05)
truth = exact.kneighbors(candidates, return_distance=False)


def recall(nprobe):
    found = ivf.set_params(nprobe=nprobe).kneighbors(candidates, return_distance=False)
    return np.array([np.isin(t, f).mean() for t, f in zip(truth, found, strict=True)])


score = np.where(recall(3) == 1.0, recall(1), np.inf)
query = candidates[[np.argmin(score)]]
true_ids = exact.kneighbors(query, return_distance=False)[0]
order = by_centre.kneighbors(query, n_neighbors=len(centres), return_distance=False)[0]

fig, axes = plt.subplots(1, 2, figsize=(9, 4.4), sharey=True)
for ax, nprobe in zip(axes, (1, 3), strict=True):
    probed = order[:nprobe]
    found = ivf.set_params(nprobe=nprobe).kneighbors(query, return_distance=False)[0]
    shade = np.isin(cell_of_pixel, probed).reshape(gx.shape)
    ax.contourf(gx, gy, shade, levels=[-0.5, 0.5, 1.5], colors=["#f2f2f2", "#cfe3f5"])
    ax.contour(
        gx,
        gy,
        cell_of_pixel.reshape(gx.shape),
        levels=np.arange(12) + 0.5,
        colors="#9a9a9a",
        linewidths=0.6,
    )
    ax.scatter(X[:, 0], X[:, 1], s=4, c="#7f7f7f", alpha=0.6, linewidths=0)
    ax.scatter(
        centres[:, 0], centres[:, 1], marker="x", c="black", s=40, label="cell centres"
    )
    hit = np.isin(true_ids, found)
    ax.scatter(
        X[true_ids[hit], 0],
        X[true_ids[hit], 1],
        s=45,
        facecolors="none",
        edgecolors="tab:green",
        linewidths=1.2,
        label="neighbours found",
    )
    ax.scatter(
        X[true_ids[~hit], 0],
        X[true_ids[~hit], 1],
        s=45,
        marker="s",
        facecolors="none",
        edgecolors="tab:red",
        linewidths=1.2,
        label="neighbours missed",
    )
    ax.scatter(
        query[:, 0],
        query[:, 1],
        marker="*",
        s=180,
        c="tab:orange",
        edgecolors="black",
        label="query",
        zorder=5,
    )
    ax.set_title(
        f"nprobe={nprobe}: scans the {nprobe} shaded cell{'s' * (nprobe > 1)}, "
        f"recall@{k} = {hit.mean():.2f}",
        fontsize=9,
    )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(lo[1], hi[1])
axes[1].legend(loc="lower right", fontsize=7, framealpha=0.9)
fig.suptitle(
    "Inverted file: k-means cells (nlist=12) and the cells a query probes", fontsize=10
)
fig.tight_layout()
