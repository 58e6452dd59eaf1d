"""The next-token loss, fused with the LM head for training.

    loss = Σ_i [lse(W h_i) − (W h_i)_{t_i}] / n,   over the positions i whose target t_i is not ignored,

with n the number of such targets (or `num_items_in_batch`, as transformers' `ForCausalLMLoss` takes it).
The reference is the unfused form: `logits = h Wᵀ`, then transformers' `ForCausalLMLoss` (float32 logits,
labels shifted left by one, `ignore_index` targets dropped, mean over the rest). It materialises the
[N, V] logits, their log-softmax and, in backward, an [N, V] gradient of each — a few hundred MB of memory
traffic for a 4096-token batch and a 4096-word vocabulary, more than the LM-head matmuls themselves on a CPU.

The fused form (as Liger-kernel's FusedLinearCrossEntropy) walks the rows in chunks small enough to stay
in cache and, for each chunk, computes the logits, their log-sum-exp, the loss, and right away the
gradient of the logits G = (softmax − onehot(t)) / n, which it folds into grad_h = G W and
grad_W += Gᵀ h. Backward then only scales the stored gradients by the incoming one. The same function
as the reference to float32 rounding; positions with an ignored target get exactly zero gradient in both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
# Rows per chunk by default: about 2**21 logits (8 MB of float32: 512 rows of a 4096-word vocabulary,
# cache-sized on a CPU), but never fewer than 256 rows, so that the three matmuls stay efficient.
DEFAULT_CHUNK_ELEMENTS = 2**21
MIN_CHUNK_ROWS = 256


def shift_causal_lm_labels(
    labels: torch.Tensor, ignore_index: int = IGNORE_INDEX, shift_labels: torch.Tensor | None = None
) -> torch.Tensor:
    """Flat next-token targets [N] for hidden states [..., seq, hidden] flattened to [N, hidden].

    As transformers' `ForCausalLMLoss`: position i predicts labels[i + 1]; the last position of each row
    has no target (`ignore_index`). A given `shift_labels` is used as it is.
    """
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return shift_labels.reshape(-1)


def reference_causal_lm_loss(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    num_items_in_batch: torch.Tensor | int | None = None,
    shift_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """The unfused reference: logits = h Wᵀ, then cross-entropy exactly as transformers' `ForCausalLMLoss`."""
    logits = F.linear(hidden_states, weight).float()
    targets = shift_causal_lm_labels(labels, ignore_index, shift_labels).to(logits.device)
    logits = logits.reshape(-1, logits.shape[-1])
    if num_items_in_batch is None:
        return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="mean")
    loss = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def fused_causal_lm_loss(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    num_items_in_batch: torch.Tensor | int | None = None,
    shift_labels: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """`reference_causal_lm_loss` without materialising the logits (the training path).

    hidden_states: [..., seq, hidden]; weight: the LM head [vocab, hidden] (the embedding when tied);
    labels: [..., seq] token ids, `ignore_index` where there is no target. `chunk_size` rows of logits
    are live at a time (default: `DEFAULT_CHUNK_ELEMENTS` logits, at least `MIN_CHUNK_ROWS` rows).
    """
    targets = shift_causal_lm_labels(labels, ignore_index, shift_labels).to(hidden_states.device)
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"labels give {targets.shape[0]} targets for {hidden.shape[0]} positions; labels must have the "
            "shape of input_ids"
        )
    if chunk_size is None:
        chunk_size = max(MIN_CHUNK_ROWS, DEFAULT_CHUNK_ELEMENTS // weight.shape[0])
    # Under no_grad (evaluation) skip the gradient work; autograd's needs_input_grad does not see grad mode.
    with_gradients = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return FusedLinearCrossEntropy.apply(
        hidden, weight, targets, ignore_index, num_items_in_batch, chunk_size, with_gradients
    )


class FusedLinearCrossEntropy(torch.autograd.Function):
    """loss = Σ_i CE(W h_i, t_i) / n with both gradients computed chunk by chunk in the forward.

    hidden [N, d], weight [V, d], targets [N] (flat, already shifted). Rows with an ignored target are
    dropped before any logit is computed: their loss term and gradient are zero by definition.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, num_items_in_batch, chunk_size, with_gradients):
        need_hidden_grad = with_gradients and ctx.needs_input_grad[0]
        need_weight_grad = with_gradients and ctx.needs_input_grad[1]
        valid = targets != ignore_index
        rows = valid.nonzero().squeeze(1)  # positions that have a target
        kept_hidden = hidden.index_select(0, rows)  # [n, d]
        kept_targets = targets.index_select(0, rows)  # [n]
        num_targets = rows.numel()
        compute_dtype = torch.float32  # the reference upcasts the logits to float32
        kept_hidden_compute = kept_hidden.to(compute_dtype)
        weight_compute = weight.to(compute_dtype)

        loss_sum = torch.zeros((), dtype=compute_dtype, device=hidden.device)
        grad_kept_hidden = torch.empty_like(kept_hidden_compute) if need_hidden_grad else None
        grad_weight = torch.zeros_like(weight_compute) if need_weight_grad else None
        logits_buffer = torch.empty(
            min(chunk_size, max(num_targets, 1)), weight.shape[0], dtype=compute_dtype, device=hidden.device
        )
        for start in range(0, num_targets, chunk_size):
            stop = min(start + chunk_size, num_targets)
            chunk_hidden, chunk_targets = kept_hidden_compute[start:stop], kept_targets[start:stop, None]
            logits = torch.mm(chunk_hidden, weight_compute.t(), out=logits_buffer[: stop - start])  # [C, V]
            row_max = logits.amax(dim=1, keepdim=True)
            target_logits = logits.gather(1, chunk_targets)
            probabilities = logits.sub_(row_max).exp_()  # exp(z − max), in place: the logits are done with
            row_sum = probabilities.sum(dim=1, keepdim=True)
            loss_sum += (row_max + row_sum.log() - target_logits).sum()  # lse − z_t
            if grad_kept_hidden is None and grad_weight is None:
                continue
            # dLoss/dz (before the 1/n scale) = softmax − onehot(t)
            probabilities.div_(row_sum)
            probabilities.scatter_add_(1, chunk_targets, probabilities.new_full(chunk_targets.shape, -1.0))
            if grad_kept_hidden is not None:
                torch.mm(probabilities, weight_compute, out=grad_kept_hidden[start:stop])
            if grad_weight is not None:
                grad_weight.addmm_(probabilities.t(), chunk_hidden)

        if num_items_in_batch is None:  # mean over the targets; no target at all gives NaN, as the reference
            loss = loss_sum / num_targets if num_targets else loss_sum / 0.0
            scale = 1.0 / num_targets if num_targets else 0.0
        else:
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(device=hidden.device, dtype=compute_dtype)
            loss, scale = loss_sum / num_items_in_batch, 1.0 / num_items_in_batch
        ctx.save_for_backward(rows, grad_kept_hidden, grad_weight)
        ctx.scale = scale
        ctx.hidden_shape, ctx.hidden_dtype, ctx.weight_dtype = hidden.shape, hidden.dtype, weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        rows, grad_kept_hidden, grad_weight = ctx.saved_tensors
        assert not ctx.needs_input_grad[0] or grad_kept_hidden is not None, "forward ran without gradients"
        assert not ctx.needs_input_grad[1] or grad_weight is not None, "forward ran without gradients"
        scale = grad_loss * ctx.scale  # d out / d (Σ CE) = incoming gradient / n
        grad_hidden = grad_weight_out = None
        if ctx.needs_input_grad[0]:  # out of place: a second backward (retain_graph) must see the same values
            grad_hidden = grad_kept_hidden.new_zeros(ctx.hidden_shape)
            grad_hidden.index_copy_(0, rows, grad_kept_hidden * scale)
            grad_hidden = grad_hidden.to(ctx.hidden_dtype)
        if ctx.needs_input_grad[1]:
            grad_weight_out = (grad_weight * scale).to(ctx.weight_dtype)
        return grad_hidden, grad_weight_out, None, None, None, None, None
