"""``--k auto``: choose the number of clusters without labels.

For each K in the range, FAISS k-means clusters a probe embedding of the images (their pixels
projected on 50 principal axes, on a seeded sample of at most 20,000 images) and the mean
silhouette of the result is computed on 5,000 of them; the K with the highest silhouette
wins. The probe is the same whatever method then trains with that K, so choosing K costs
seconds rather than one training per K. How often it finds the true K on the benchmark sets
is measured in docs/benchmarks.md: on raw pixels, not often.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import UsageError
from .methods.kmeans import faiss_kmeans, fit_pixel_pca
from .metrics import silhouette
from .model import embed_images
from .report import Reporter

DEFAULT_RANGE = (2, 20)
PROBE_DIM, PROBE_SAMPLE = 50, 20_000


@dataclass
class AutoK:
    k: int
    criterion: str
    scores: dict[int, float] = field(default_factory=dict)

    def to_record(self) -> dict[str, object]:
        return {
            "k": self.k,
            "criterion": self.criterion,
            "range": [min(self.scores), max(self.scores)],
            "scores": {str(k): round(v, 5) for k, v in self.scores.items()},
        }


def parse_range(text: str) -> tuple[int, int]:
    """``LO:HI`` (inclusive) with 1 <= LO <= HI."""
    try:
        lo, hi = (int(part) for part in text.split(":"))
    except ValueError:
        raise UsageError(f"--k-range takes LO:HI, e.g. 2:30, got {text!r}") from None
    if not 1 <= lo <= hi:
        raise UsageError(f"--k-range needs 1 <= LO <= HI, got {text!r}")
    return lo, hi


def choose_k(
    images: np.ndarray,
    k_range: tuple[int, int] = DEFAULT_RANGE,
    seed: int = 0,
    reporter: Reporter | None = None,
) -> AutoK:
    """The K in ``k_range`` whose k-means clustering of the probe embedding has the highest
    silhouette (K = 1 has none; it is chosen only when the range holds nothing else)."""
    reporter = reporter or Reporter(quiet=True)
    lo, hi = k_range
    z = probe_embedding(images, seed)
    hi = min(hi, len(z) - 1)
    if hi < max(lo, 2):
        return AutoK(max(1, min(lo, len(z))), "silhouette", {max(1, lo): 0.0})
    scores: dict[int, float] = {}
    with reporter.task("choosing K", total=hi - max(lo, 2) + 1) as bar:
        for k in range(max(lo, 2), hi + 1):
            km = faiss_kmeans(z, k, seed=seed, epochs=30, restarts=2)
            scores[k] = silhouette(z, km.labels, sample=5000, seed=seed) or -1.0
            bar.advance()
    best = max(scores, key=lambda k: (scores[k], -k))  # ties: the smaller K
    return AutoK(best, "silhouette", scores)


def probe_embedding(images: np.ndarray, seed: int = 0) -> np.ndarray:
    """Pixels on their first 50 principal axes, for a seeded sample of at most 20,000 images."""
    rows = np.sort(np.random.default_rng(seed).permutation(len(images))[:PROBE_SAMPLE])
    sample = np.asarray(images[rows])
    return embed_images(fit_pixel_pca(sample, PROBE_DIM, seed), sample, 4096).numpy()
