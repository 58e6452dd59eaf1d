"""`staticembqk`: queries and keys from the static input embeddings (docs/method.md §3).

    e = Emb(t) (the embedding output, before layer 1),  q, k = W_q RMSNorm_l(e) + b_q, W_k RMSNorm_l(e) + b_k,
    RoPE and softmax as in `standard`, v from the layer's own input x.

The map depends on the input tokens but not on context: every layer's map could be computed up front.
The decoder layer supplies `RMSNorm_l(e)` as `inputs.qk_source`; the computation is `standard`'s, and so
is its analytic cost (`cost`, inherited: every token's q, k are still projected, from e instead of x).
"""

from .standard import StandardAttention


class StaticEmbeddingQK(StandardAttention):
    name = "staticembqk"
    qk_source = "static_embeddings"
