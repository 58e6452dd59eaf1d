"""The reference tests of `slidingwindow`: its fast path against its explicit one, and two closed forms."""

import pytest
import torch
from my_mixer import SlidingWindowAttention

from attnlab import AttnLabConfig, AttnLabForCausalLM


def model(layers: str, window: int, seed: int = 0) -> AttnLabForCausalLM:
    torch.manual_seed(seed)
    config = AttnLabConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        initializer_range=0.2,
        layers=layers,
        mixer_options={"slidingwindow": {"window": window}},
    )
    return AttnLabForCausalLM(config).eval()


TOKENS = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("window", [1, 3, 20])
def test_the_fast_path_equals_the_reference_outputs_and_gradients(window):
    net = model("uniform:slidingwindow", window).train()
    results = []
    for implementation in ("fast", "reference"):
        net.zero_grad()
        loss = net(TOKENS, labels=TOKENS, mixer_implementation=implementation).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in net.parameters()]))
    (fast_loss, fast_grads), (reference_loss, reference_grads) = results
    torch.testing.assert_close(fast_loss, reference_loss, rtol=1e-5, atol=1e-6)
    for fast, reference in zip(fast_grads, reference_grads):
        torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-6)


def test_a_window_as_long_as_the_sequence_is_standard_attention():
    standard, sliding = model("uniform:standard", 20), model("uniform:slidingwindow", 20)
    sliding.load_state_dict(standard.state_dict())  # the same q/k/v/o parameter names
    torch.testing.assert_close(sliding(TOKENS).logits, standard(TOKENS).logits, rtol=1e-5, atol=1e-5)


def test_each_row_of_the_map_covers_exactly_its_window():
    net = model("uniform:slidingwindow", 3)
    weights = net(TOKENS, output_attentions=True).attentions[0]  # [batch, heads, query, key]
    query, key = torch.arange(20)[:, None], torch.arange(20)
    inside = (key <= query) & (key > query - 3)
    assert torch.all(weights[..., ~inside] == 0) and torch.all(weights[..., inside] > 0)
    torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights.sum(-1)))


def test_cached_decoding_equals_recomputation():
    net = model("hybrid:slidingwindow", 4)
    prompt = TOKENS[:, :6]
    cached = net.generate(prompt, max_new_tokens=8, do_sample=False)
    recomputed = net.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, recomputed)


def test_the_window_comes_from_the_saved_config(tmp_path):
    model("uniform:slidingwindow", 5).save_pretrained(tmp_path)
    loaded = AttnLabForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded.model.layers[0].self_attn, SlidingWindowAttention)
    assert loaded.model.layers[0].self_attn.window == 5
