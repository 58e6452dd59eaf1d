"""`fixedseqqk`: input-independent maps from a fixed natural-language sequence (docs/method.md §3).

As `rndembqk`, but the shadow stream starts from X_0 = Emb(t_s): the trainable embeddings of a fixed
sequence of token ids t_s of length L_max, stored in the checkpoint (`model.shadow_token_ids`). The
training command sets t_s to the first L_max tokens of the training corpus; a model created without a
corpus gets ids drawn uniformly from the vocabulary with `config.fixed_sequence_seed`. As for
`rndembqk`, maps are indexed by position in the input: pad batches on the right.
"""

from ..cache import SharedMapLayer
from .standard import StandardAttention, shared_map_cost


class FixedSequenceQK(StandardAttention):
    name = "fixedseqqk"
    qk_source = "shadow_tokens"

    @classmethod
    def cache_layer(cls, config, layer_idx):
        """The shared shadow query/key tables and the batch's values (`attnlab.cache.SharedMapLayer`)."""
        return SharedMapLayer()

    @classmethod
    def cost(cls, config, batch, seq_len, dtype_bytes=2, cached=True):
        """Maps shared by the batch, Q/K tables precomputed once (`standard.shared_map_cost`)."""
        return shared_map_cost(config, batch, seq_len, dtype_bytes, cached)
