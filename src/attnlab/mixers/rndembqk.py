"""`rndembqk`: input-independent maps from a fixed random sequence (docs/method.md §3).

A buffer ε ∈ R^{L_max × d}, drawn once from N(0, 1) with `config.shadow_noise_seed` and saved with the
model, runs through the same decoder stack as a *shadow stream* (X_0 = ε, X_l = Block_l(X_{l-1}), with
gradients). Layer l takes q, k from RMSNorm_l(X_{l-1}) with its own W_q, W_k and RoPE, and v from the real
input; the map is one per head, shared by every sequence of the batch, and its top-left L×L block serves a
length-L input. The model runs the shadow stream once per forward and passes RMSNorm_l(X_{l-1}) as
`inputs.qk_source` (batch 1); `fast_softmax_attention` then computes the shared map once.

The map is indexed by position in the input (0..L−1), not by `position_ids`: in a left-padded batch
the real tokens of a short row see a shifted block of the map. Pad on the right for these mixers.
"""

from ..cache import SharedMapLayer
from .standard import StandardAttention, shared_map_cost


class RandomEmbeddingQK(StandardAttention):
    name = "rndembqk"
    qk_source = "shadow_noise"

    @classmethod
    def cache_layer(cls, config, layer_idx):
        """The shared shadow query/key tables and the batch's values (`attnlab.cache.SharedMapLayer`)."""
        return SharedMapLayer()

    @classmethod
    def cost(cls, config, batch, seq_len, dtype_bytes=2, cached=True):
        """Maps shared by the batch, Q/K tables precomputed once (`standard.shared_map_cost`)."""
        return shared_map_cost(config, batch, seq_len, dtype_bytes, cached)
