"""Incremental decoding: every mixer's cache gives the function that full recomputation gives.

Each test compares cached decoding (`AttnLabCache`, one state per layer) with `use_cache=False`, which
re-runs the whole sequence every step, on tokens and on the logits of every step.
"""

from __future__ import annotations

import warnings
from unittest import mock

import pytest
import torch
from transformers import DynamicCache

from attnlab import BUILTIN_MIXERS, AttnLabForCausalLM
from attnlab.cache import CACHE_NAME, AttnLabCache, RecurrentStateLayer, SharedMapLayer
from attnlab.model import AttnLabModel

from .conftest import tiny_config
from .test_inspection import assert_attention_matters
from .test_mixers import set_chunk_size

RUNNING_SUM_MIXERS = ("approximate", "nonapprox")  # decode states that are running sums (no rollback)
PATTERNS = [f"uniform:{mixer}" for mixer in BUILTIN_MIXERS] + [
    ["standard", "nonapprox", "standard", "mlp"],
    ["staticembqk", "approximate", "fixedseqqk", "rndembqk"],
]


def _model(layers, **overrides) -> AttnLabForCausalLM:
    depth = len(layers) if isinstance(layers, list) else 2
    # A wider initialisation than the default gives varied greedy continuations and logits of order 1.
    options = {"layers": layers, "num_hidden_layers": depth, "initializer_range": 0.1}
    options.update(overrides)
    return AttnLabForCausalLM(tiny_config(**options)).eval()


def _model_for(layers) -> AttnLabForCausalLM:
    overrides = {"qk_norm": True, "num_key_value_heads": 2} if "staticembqk" in layers else {}
    return _model(layers, **overrides)


def _greedy(model, prompt, use_cache, max_new_tokens=12, **kwargs):
    return model.generate(
        prompt,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=0,
        use_cache=use_cache,
        output_logits=True,
        return_dict_in_generate=True,
        **kwargs,
    )


def _assert_same_generation(cached, recomputed, atol=1e-5, rtol=0.0):
    assert torch.equal(cached.sequences, recomputed.sequences)
    assert len(cached.logits) == len(recomputed.logits)
    for step, (mine, expected) in enumerate(zip(cached.logits, recomputed.logits)):
        assert torch.isfinite(mine).all(), step
        torch.testing.assert_close(mine, expected, atol=atol, rtol=rtol, msg=f"decode step {step}")


@pytest.mark.parametrize("layers", PATTERNS, ids=str)
def test_cached_greedy_generation_equals_recomputation(layers):
    model = _model_for(layers)
    prompt = torch.randint(1, 61, (2, 6))
    cached = _greedy(model, prompt, use_cache=True)
    assert isinstance(getattr(cached, CACHE_NAME), AttnLabCache)
    assert getattr(cached, CACHE_NAME).get_seq_length() == 6 + 12 - 1  # the last token is never fed back
    _assert_same_generation(cached, _greedy(model, prompt, use_cache=False))


def test_generate_uses_the_cache_by_default_and_feeds_one_token_per_step():
    model = _model(["standard", "approximate"])
    lengths = []
    hook = model.model.register_forward_pre_hook(
        lambda _, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        output = model.generate(
            torch.randint(1, 61, (2, 5)),
            max_new_tokens=4,
            do_sample=False,
            pad_token_id=0,
            return_dict_in_generate=True,
        )
    finally:
        hook.remove()
    assert isinstance(getattr(output, CACHE_NAME), AttnLabCache)
    assert lengths == [5, 1, 1, 1]


@pytest.mark.parametrize("layers", PATTERNS, ids=str)
def test_beam_search_reorders_every_kind_of_state(layers):
    model = _model_for(layers)
    prompt = torch.randint(1, 61, (2, 5))
    options = {"max_new_tokens": 8, "do_sample": False, "num_beams": 3, "num_return_sequences": 2, "pad_token_id": 0}
    cached = model.generate(prompt, use_cache=True, **options)
    assert torch.equal(cached, model.generate(prompt, use_cache=False, **options))


@pytest.mark.parametrize("layers", PATTERNS, ids=str)
def test_left_padded_generation_equals_recomputation(layers):
    model = _model_for(layers)
    prompt = torch.randint(1, 61, (2, 7))
    attention_mask = torch.ones_like(prompt)
    attention_mask[0, :3] = 0  # left padding
    prompt[0, :3] = 0
    cached = _greedy(model, prompt, use_cache=True, attention_mask=attention_mask)
    _assert_same_generation(cached, _greedy(model, prompt, use_cache=False, attention_mask=attention_mask))


PREFILL_PATHS = {  # the forward options that select each way a recurrent layer builds its state from a prompt
    "fast": {},  # the chunked path, which returns its final running sums
    "reference": {"mixer_implementation": "reference"},  # explicit map, then the prompt folded into the sums
    "attentions": {"output_attentions": True},  # the reference path, returning the map
    "mixer_scores": {"output_mixer_scores": True},  # the reference path, returning the scores
}


@pytest.mark.parametrize("prefill", PREFILL_PATHS)
@pytest.mark.parametrize("mixer", RUNNING_SUM_MIXERS)
def test_decoding_after_every_prefill_path_equals_the_full_forward(mixer, prefill):
    """Prefill 20 tokens through each path, then decode 8 one at a time with the cache: the prompt's and every
    step's logits equal the uncached forward of the whole sequence (row 0 left-padded by 3).

    Weights of std 0.2 make attention matter (mean row max ≈ 0.28 / 0.32 for approximate / nonapprox); the fast
    prefill crosses chunks of 4. Measured float32 error ≤ 2.4e-6 (logits of std ≈ 1.1), tolerance 1e-5.
    """
    prompt_len, steps = 20, 8
    model = _model(f"uniform:{mixer}", initializer_range=0.2)
    set_chunk_size(model, 4)
    input_ids = torch.randint(1, 61, (2, prompt_len + steps))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0
    with torch.no_grad():
        assert_attention_matters(model(input_ids, output_attentions=True).attentions)
        expected = model(input_ids, attention_mask=attention_mask).logits  # [batch, seq, vocab]
        prompt_mask = attention_mask[:, :prompt_len]
        output = model(input_ids[:, :prompt_len], attention_mask=prompt_mask, use_cache=True, **PREFILL_PATHS[prefill])
        cache = getattr(output, CACHE_NAME)
        real = prompt_mask.bool()
        torch.testing.assert_close(output.logits[real], expected[:, :prompt_len][real], atol=1e-5, rtol=0)
        for position in range(prompt_len, prompt_len + steps):
            output = model(
                input_ids[:, position : position + 1], attention_mask=attention_mask[:, : position + 1], cache=cache
            )
            torch.testing.assert_close(
                output.logits[:, 0], expected[:, position], atol=1e-5, rtol=0, msg=lambda m: f"position {position}: {m}"
            )


def test_long_context_nonapprox_decoding_stays_finite_where_naive_exponentials_overflow():
    model = _model("uniform:nonapprox", max_position_embeddings=2048)
    with torch.no_grad():  # scores s_j of order 10³: exp(s_j) overflows float32 (> 88.7)
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(300)
            layer.self_attn.k_proj.weight.mul_(300)
    prompt = torch.randint(1, 61, (2, 1500))
    with torch.no_grad():
        scores = model(prompt, output_mixer_scores=True).mixer_scores
    assert max(layer_scores.max().item() for layer_scores in scores) > 200
    assert any(torch.isinf(torch.exp(layer_scores)).any() for layer_scores in scores)
    cached = _greedy(model, prompt, use_cache=True, max_new_tokens=6)
    _assert_same_generation(cached, _greedy(model, prompt, use_cache=False, max_new_tokens=6))
    for state in getattr(cached, CACHE_NAME).layers[0].get_states():
        assert torch.isfinite(state).all()


def test_recurrent_states_keep_their_size_while_the_kv_cache_grows():
    model = _model(["standard", "approximate", "nonapprox", "mlp"])
    prompt = torch.randint(1, 61, (2, 5))
    with torch.no_grad():
        output = model(prompt, use_cache=True)
        cache = getattr(output, CACHE_NAME)
        first_shapes = [cache.state_shapes(layer) for layer in range(4)]
        sequence = prompt
        for step in range(1, 9):
            next_token = output.logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], dim=1)
            output = model(next_token, cache=cache)
            assert getattr(output, CACHE_NAME) is cache
            shapes = [cache.state_shapes(layer) for layer in range(4)]
            assert shapes[0]["keys"] == shapes[0]["values"] == (2, 4, 5 + step, 8)  # one position per token
            assert shapes[1] == first_shapes[1] and shapes[2] == first_shapes[2]  # constant-size state
            assert shapes[3] == {}  # mlp: position-wise, nothing cached
            expected = model(sequence, use_cache=False).logits[:, -1]
            torch.testing.assert_close(output.logits[:, -1], expected, atol=1e-5, rtol=0)
    head_dim = 8
    assert isinstance(cache.layers[1], RecurrentStateLayer) and isinstance(cache.layers[2], RecurrentStateLayer)
    assert first_shapes[1]["key2_value_sum"] == (2, 4, head_dim**2, head_dim)
    assert first_shapes[2] == {"running_max": (2, 4), "weighted_sum": (2, 4, head_dim), "weight_sum": (2, 4)}


def test_shadow_maps_are_computed_once_per_generate_call_and_equal_the_full_forward_maps():
    model = _model(["rndembqk", "fixedseqqk"])
    prompt = torch.randint(1, 61, (2, 5))
    original = AttnLabModel._shadow_stream
    with mock.patch.object(AttnLabModel, "_shadow_stream", autospec=True, side_effect=original) as shadow_stream:
        cached = _greedy(model, prompt, use_cache=True, max_new_tokens=10)
    assert shadow_stream.call_count == 2  # one batch-1 pass per shadow source, for the whole generate call
    with mock.patch.object(AttnLabModel, "_shadow_stream", autospec=True, side_effect=original) as shadow_stream:
        recomputed = _greedy(model, prompt, use_cache=False, max_new_tokens=10)
    assert shadow_stream.call_count == 2 * 10  # recomputation: both streams at every step
    _assert_same_generation(cached, recomputed)

    cache, sequence = getattr(cached, CACHE_NAME), cached.sequences
    length = sequence.shape[1]
    with torch.no_grad():
        full_maps = model(sequence, output_attentions=True).attentions
    for layer_idx in range(2):
        layer_cache = cache.layers[layer_idx]
        assert isinstance(layer_cache, SharedMapLayer)
        assert layer_cache.query_table.shape == (1, 4, model.config.shadow_seq_len, 8)
        query = layer_cache.query_table[:, :, :length]
        key = layer_cache.key_table[:, :, :length]
        scores = query @ key.transpose(-1, -2) / 8**0.5
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        shared_map = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)[0]  # [heads, L, L]
        for row in range(2):  # one input-independent map, shared by the batch
            torch.testing.assert_close(full_maps[layer_idx][row], shared_map, atol=1e-5, rtol=0)


def test_a_new_cache_sees_new_weights():
    model = _model("uniform:rndembqk")
    prompt = torch.randint(1, 61, (1, 4))
    _greedy(model, prompt, use_cache=True, max_new_tokens=3)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.mul_(3)
    _assert_same_generation(_greedy(model, prompt, use_cache=True), _greedy(model, prompt, use_cache=False))


def test_cached_decode_of_kv_mixers_returns_the_last_rows_of_the_recomputed_maps():
    model = _model(["standard", "rndembqk"])
    prompt = torch.randint(1, 61, (2, 7))
    with torch.no_grad():
        cache = getattr(model(prompt[:, :5], use_cache=True), CACHE_NAME)
        cached = model(prompt[:, 5:], cache=cache, output_attentions=True, mixer_implementation="reference")
        full = model(prompt, output_attentions=True)
    for layer_idx in range(2):  # two new queries at once: [batch, heads, 2, 7]
        torch.testing.assert_close(
            cached.attentions[layer_idx], full.attentions[layer_idx][:, :, 5:], atol=1e-5, rtol=0
        )
    torch.testing.assert_close(cached.logits, full.logits[:, 5:], atol=1e-5, rtol=0)


def test_wrong_caches_are_refused_with_a_useful_message():
    model = _model(["standard", "nonapprox"])
    prompt = torch.randint(1, 61, (1, 4))
    with pytest.raises(ValueError, match="AttnLabCache"):
        model(prompt, past_key_values=DynamicCache())
    with pytest.raises(ValueError, match="AttnLabCache"):
        model.generate(prompt, max_new_tokens=2, pad_token_id=0, **{CACHE_NAME: DynamicCache()})
    with pytest.raises(ValueError, match="cache_implementation"):
        model.generate(prompt, max_new_tokens=2, cache_implementation="static", pad_token_id=0)
    with torch.no_grad():
        cache = getattr(model(prompt, use_cache=True), CACHE_NAME)
        with pytest.raises(ValueError, match="use_cache=False"):
            model(prompt[:, :1], cache=cache, output_attentions=True)


ROLLBACK_PATTERNS = [f"uniform:{mixer}" for mixer in BUILTIN_MIXERS if mixer not in RUNNING_SUM_MIXERS]


@pytest.mark.parametrize("layers", ROLLBACK_PATTERNS + ["hybrid:nonapprox", "hybrid:approximate"], ids=str)
def test_prompt_lookup_decoding_equals_recomputation_where_states_can_be_rolled_back(layers):
    """Assisted decoding crops rejected draft tokens from the cache: KV caches can, a running sum cannot —
    unless its layer never runs (skip mode), so the skip model decodes like an all-standard one."""
    model = _model_for(layers)
    model.config.skip_nonstandard = layers.startswith("hybrid")
    prompt = torch.tensor([[3, 5, 7, 3, 5, 7, 3, 5]])
    recomputed = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=False)
    assisted = model.generate(prompt, max_new_tokens=10, do_sample=False, prompt_lookup_num_tokens=3)
    assert torch.equal(assisted, recomputed)


@pytest.mark.parametrize("layers", ["uniform:approximate", "uniform:nonapprox", "hybrid:nonapprox"])
def test_prompt_lookup_decoding_is_refused_up_front_for_running_state_layers(layers):
    model = _model(layers)
    prompt = torch.tensor([[3, 5, 7, 3, 5, 7, 3, 5]])
    with mock.patch.object(AttnLabModel, "forward", autospec=True) as forward:
        with pytest.raises(ValueError, match="cannot be rolled back, so assisted decoding"):
            model.generate(prompt, max_new_tokens=10, do_sample=False, prompt_lookup_num_tokens=3)
    assert forward.call_count == 0  # refused before the prefill


def test_only_an_empty_recurrent_state_is_croppable():
    model = _model(["standard", "nonapprox"])
    cache = AttnLabCache(model.config)
    assert cache.layers[1].is_croppable and cache.is_croppable
    with torch.no_grad():
        model(torch.randint(1, 61, (1, 4)), cache=cache)
    assert not cache.layers[1].is_croppable and not cache.is_croppable
    assert cache.layers[0].is_croppable
    with pytest.raises(ValueError, match="cannot be rolled back"):
        cache.crop(-1)
    skipped = AttnLabCache(model.config)
    model.config.skip_nonstandard = True
    with torch.no_grad():
        model(torch.randint(1, 61, (1, 4)), cache=skipped)
    assert skipped.layers[1].is_croppable and skipped.is_croppable  # skip mode never writes the running sum
    skipped.crop(-1)
    assert skipped.get_seq_length() == 3


def test_the_cache_is_taken_under_either_name_and_two_different_ones_are_refused():
    model = _model(["standard", "approximate"])
    prompt = torch.randint(1, 61, (2, 6))
    with torch.no_grad():
        expected = model(prompt).logits[:, -1]
        for name in ("cache", "past_key_values"):
            cache = getattr(model(prompt[:, :4], use_cache=True), CACHE_NAME)
            output = model(prompt[:, 4:], **{name: cache})
            assert getattr(output, CACHE_NAME) is cache and cache.get_seq_length() == 6
            torch.testing.assert_close(output.logits[:, -1], expected, atol=1e-5, rtol=0)
        cache = AttnLabCache(model.config)
        model(prompt, cache=cache, past_key_values=cache)  # the same cache under both names is one cache
        with pytest.raises(ValueError, match="two different caches"):
            model(prompt, cache=AttnLabCache(model.config), past_key_values=AttnLabCache(model.config))


def test_generate_continues_a_cache_the_caller_passes():
    model = _model(["standard", "nonapprox", "rndembqk"])
    prompt = torch.randint(1, 61, (2, 5))
    cache = AttnLabCache(model.config)
    cached = _greedy(model, prompt, use_cache=True, **{CACHE_NAME: cache})
    assert getattr(cached, CACHE_NAME) is cache and cache.get_seq_length() == 5 + 12 - 1
    _assert_same_generation(cached, _greedy(model, prompt, use_cache=False))


def test_generation_raises_no_deprecation_warning_from_attnlab_calls():
    model = _model(["standard", "approximate", "rndembqk"])
    prompt = torch.randint(1, 61, (2, 5))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _greedy(model, prompt, use_cache=True, max_new_tokens=3)
        model.generate(prompt, max_new_tokens=3, num_beams=2, pad_token_id=0)
    deprecations = [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not deprecations, [str(w.message) for w in deprecations]
