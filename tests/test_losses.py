"""The fused LM-head cross-entropy (`attnlab.losses`) against transformers' `ForCausalLMLoss`.

Both on the loss value and on the gradients with respect to the hidden states and the head weight, with
ignored targets, tied and untied heads, and chunk sizes that do not divide the number of positions; then
inside real models of every mixer (`return_logits=False` against the default logits path).
"""

from __future__ import annotations

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from attnlab import BUILTIN_MIXERS, AttnLabConfig, AttnLabForCausalLM
from attnlab.losses import fused_causal_lm_loss, reference_causal_lm_loss

VOCAB, WIDTH = 53, 24


def labelled_batch(batch: int = 3, seq_len: int = 17, ignored: bool = True, seed: int = 0):
    """Hidden states, a head weight (logits of order 1) and labels with some -100 targets."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq_len, WIDTH, generator=generator)
    weight = torch.randn(VOCAB, WIDTH, generator=generator) * 0.5
    labels = torch.randint(0, VOCAB, (batch, seq_len), generator=generator)
    if ignored:
        labels[0, 3:8] = -100  # a run of ignored targets inside a row
        labels[1, -1] = -100  # the last label (never a target after the shift) ignored too
        labels[2, 0] = -100  # the first label (never a target either)
    return hidden, weight, labels


def transformers_loss(hidden, weight, labels, **kwargs):
    """What `Qwen2ForCausalLM` computes: logits = h Wᵀ, then transformers' `ForCausalLMLoss`."""
    return ForCausalLMLoss(hidden @ weight.t(), labels, vocab_size=weight.shape[0], **kwargs)


def loss_and_grads(loss_fn, hidden, weight, labels, **kwargs):
    hidden, weight = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss = loss_fn(hidden, weight, labels, **kwargs)
    grad_hidden, grad_weight = torch.autograd.grad(loss, (hidden, weight))
    return loss.detach(), grad_hidden, grad_weight


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 1000, None])  # 51 positions: no chunk size divides them
@pytest.mark.parametrize("ignored", [True, False])
def test_fused_loss_matches_transformers(chunk_size, ignored):
    hidden, weight, labels = labelled_batch(ignored=ignored)
    expected = loss_and_grads(transformers_loss, hidden, weight, labels)
    fused = loss_and_grads(fused_causal_lm_loss, hidden, weight, labels, chunk_size=chunk_size)
    reference = loss_and_grads(reference_causal_lm_loss, hidden, weight, labels)
    for got in (fused, reference):
        torch.testing.assert_close(got[0], expected[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got[2], expected[2], rtol=1e-5, atol=1e-7)
    if ignored:  # a position without a target gets no gradient at all
        assert fused[1][0, 2:7].abs().max() == 0  # targets labels[0, 3:8] are ignored
        assert fused[1][:, -1].abs().max() == 0


@pytest.mark.parametrize("num_items_in_batch", [40, torch.tensor(40)], ids=["int", "tensor"])
def test_fused_loss_takes_num_items_in_batch_as_transformers(num_items_in_batch):
    hidden, weight, labels = labelled_batch()
    expected = loss_and_grads(transformers_loss, hidden, weight, labels, num_items_in_batch=num_items_in_batch)
    fused = loss_and_grads(
        fused_causal_lm_loss, hidden, weight, labels, num_items_in_batch=num_items_in_batch, chunk_size=7
    )
    for got, want in zip(fused, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_fused_loss_takes_shift_labels_and_ignore_index():
    hidden, weight, labels = labelled_batch(ignored=False)
    shift_labels = torch.roll(labels, -2, dims=-1)  # any per-position targets, given already shifted
    shift_labels[:, :4] = 7
    options = {"shift_labels": shift_labels, "ignore_index": 7}
    expected = loss_and_grads(transformers_loss, hidden, weight, labels, **options)
    fused = loss_and_grads(fused_causal_lm_loss, hidden, weight, labels, chunk_size=6, **options)
    for got, want in zip(fused, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_fused_loss_with_a_tied_head():
    """The head weight is also the embedding table the hidden states come from: its gradient is the sum of
    both uses, as for a tied `lm_head`."""
    _, weight, labels = labelled_batch()
    mixing = torch.randn(WIDTH, WIDTH) / WIDTH**0.5
    grads = []
    for loss_fn, options in ((transformers_loss, {}), (fused_causal_lm_loss, {"chunk_size": 5})):
        embedding = weight.clone().requires_grad_(True)
        states = torch.tanh(embedding[labels.clamp(min=0)] @ mixing)  # h = f(Emb[t])
        loss = loss_fn(states, embedding, labels, **options)
        loss.backward()
        grads.append((loss.detach(), embedding.grad))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-5, atol=1e-7)


def test_fused_loss_backward_twice_and_without_gradients():
    hidden, weight, labels = labelled_batch()
    hidden.requires_grad_(True)
    loss = fused_causal_lm_loss(hidden, weight, labels, chunk_size=4)
    (first,) = torch.autograd.grad(loss, hidden, retain_graph=True)
    (second,) = torch.autograd.grad(loss, hidden)
    assert torch.equal(first, second)  # backward does not scale its stored gradients in place
    with torch.no_grad():  # evaluation: the loss only
        torch.testing.assert_close(fused_causal_lm_loss(hidden, weight, labels), loss.detach())


def test_fused_loss_with_every_target_ignored_is_nan_as_transformers():
    hidden, weight, labels = labelled_batch()
    labels[:] = -100
    assert transformers_loss(hidden, weight, labels).isnan()
    hidden.requires_grad_(True)
    loss = fused_causal_lm_loss(hidden, weight, labels)
    assert loss.isnan()
    loss.backward()
    assert hidden.grad.abs().max() == 0


def test_fused_loss_rejects_labels_of_the_wrong_shape():
    hidden, weight, labels = labelled_batch()
    with pytest.raises(ValueError, match="labels must have the shape of input_ids"):
        fused_causal_lm_loss(hidden, weight, labels[:, :-1])


# ------------------------------------------------------------------------------------------- in the model


def make_model(layers: str, tie: bool) -> AttnLabForCausalLM:
    torch.manual_seed(0)
    config = AttnLabConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        layers=layers,
        tie_word_embeddings=tie,
        initializer_range=0.2,
    )
    return AttnLabForCausalLM(config)


def model_loss_and_grads(model, input_ids, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    output = model(input_ids, labels=labels, **kwargs)
    output.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return output, grads


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("mixer", BUILTIN_MIXERS)
def test_model_fused_loss_equals_logits_loss(mixer, tie):
    """`return_logits=False` gives the loss of the default path and the same gradient for every parameter."""
    model = make_model(f"uniform:{mixer}", tie)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (3, 13), generator=generator)
    labels = input_ids.clone()
    labels[1, 4:9] = -100
    default, default_grads = model_loss_and_grads(model, input_ids, labels)
    fused, fused_grads = model_loss_and_grads(model, input_ids, labels, return_logits=False)
    assert fused.logits is None and default.logits.shape == (3, 13, VOCAB)
    torch.testing.assert_close(fused.loss, default.loss, rtol=1e-6, atol=1e-6)
    assert fused_grads.keys() == default_grads.keys()
    assert ("lm_head.weight" in default_grads) == (not tie)
    for name, grad in default_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_model_without_logits_or_labels_returns_neither():
    model = make_model("uniform:standard", tie=True).eval()
    output = model(torch.randint(0, VOCAB, (2, 5)), return_logits=False)
    assert output.logits is None and output.loss is None
