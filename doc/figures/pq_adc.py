"""User-guide figure: product quantization of residuals, and the ADC table.

Built at doc-build time with annlearn itself, on 2-D generated data: two
sub-quantizers of one dimension each, 16 centres (nbits=4) per sub-space.
"""

import matplotlib.pyplot as plt
import numpy as np

from annlearn import FlatNeighbors, IVFPQNeighbors

rng = np.random.default_rng(0)
X = (rng.standard_normal((2000, 2)) @ [[1.0, 0.4], [0.0, 0.7]]).astype(np.float32)
ivf = IVFPQNeighbors(nlist=4, nprobe=4, n_subquantizers=2, nbits=4, random_state=0).fit(
    X
)
centres = ivf.cluster_centers_
books = ivf.pq_codebooks_[:, :, 0]  # (2 sub-quantizers, 16 centres)
cell = FlatNeighbors(n_neighbors=1).fit(centres).kneighbors(X, return_distance=False)
residuals = X - centres[cell[:, 0]]

# One stored vector: its residual, its code and the residual the code decodes to.
row = int(np.argmin(np.abs(residuals - [0.45, -0.3]).sum(axis=1)))
r = residuals[row]
code = [int(np.argmin((books[j] - r[j]) ** 2)) for j in range(2)]
decoded = np.array([books[0, code[0]], books[1, code[1]]])
query = np.array([1.6, 0.9], dtype=np.float32)
c = centres[cell[row, 0]]

fig, (left, right) = plt.subplots(
    1, 2, figsize=(9.5, 4.2), gridspec_kw={"width_ratios": [1, 1.5]}
)
left.scatter(
    residuals[:, 0], residuals[:, 1], s=3, c="#9a9a9a", alpha=0.5, linewidths=0
)
for value in books[0]:
    left.axvline(value, color="tab:blue", lw=0.5, alpha=0.6)
for value in books[1]:
    left.axhline(value, color="tab:purple", lw=0.5, alpha=0.6)
grid = np.array(np.meshgrid(books[0], books[1])).reshape(2, -1)
left.scatter(*grid, s=4, c="black", alpha=0.8, label="the 16 x 16 decodable residuals")
left.annotate("", decoded, r, arrowprops={"arrowstyle": "->", "color": "tab:red"})
left.scatter(*r, c="tab:red", s=30, label=f"a residual, code ({code[0]}, {code[1]})")
left.set_title(
    "Residuals x - c(x), cut into 2 sub-vectors:\n"
    "16 centres per sub-space (blue: first, purple: second)",
    fontsize=9,
)
left.legend(loc="lower right", fontsize=7, framealpha=0.9)
left.set_xlim(np.percentile(residuals[:, 0], [0.5, 99.5]))
left.set_ylim(np.percentile(residuals[:, 1], [0.5, 99.5]))

# ADC: the query is never quantized. For the stored vector's cell, one table
# entry per (sub-space, centre): the squared distance between the query's
# sub-vector (relative to the cell centre) and that centre.
table = (query - c)[:, None] - books
table = table**2
image = right.imshow(table, cmap="viridis_r", aspect="auto")
for j in range(2):
    right.add_patch(
        plt.Rectangle((code[j] - 0.5, j - 0.5), 1, 1, fill=False, ec="tab:red", lw=2)
    )
right.set_yticks([0, 1], ["sub-space 1", "sub-space 2"])
right.set_xticks(range(16))
right.set_xlabel("centre (code value)")
approx = table[0, code[0]] + table[1, code[1]]
true = float(((query - c - r) ** 2).sum())
right.set_title(
    "ADC table of one query for that cell: distance ~ sum of the coded entries\n"
    f"T[1, {code[0]}] + T[2, {code[1]}] = {approx:.3f}  (exact {true:.3f})",
    fontsize=9,
)
fig.colorbar(image, ax=right, label="squared distance")
fig.tight_layout()
