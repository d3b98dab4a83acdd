"""raysparse: recommenders for sparse users — a BERT text tower fused with Deep Matrix Factorization.

The core (config, data, model, step, loop, metrics, artifact, recommender, http_api, sweep) needs neither Ray
nor DeepSpeed; engine (DeepSpeed, imported where an engine starts) and preflight need no Ray; the Ray shells live
in raysparse.ray_data / ray_train / ray_tune / ray_placement / ray_serve.
"""

from raysparse.recommender import Recommendation, Recommender

__all__ = ["Recommender", "Recommendation"]
__version__ = "0.1.0"
