"""Quality metrics, implemented once and shared by nodes, server and benchmarks.

* :mod:`common.metrics.embeddings` - Fréchet distance, k-NN precision / recall / density /
  coverage (Naeem et al. 2020) and diversity of generated vs real audio embeddings.
"""

from common.metrics.embeddings import (
    diversity,
    embedding_features,
    embedding_quality,
    frechet_distance,
    prdc,
)

__all__ = ["diversity", "embedding_features", "embedding_quality", "frechet_distance", "prdc"]
