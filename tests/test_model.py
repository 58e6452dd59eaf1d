"""The decoder as a whole: parity with transformers' Qwen2/Qwen3, HF round trips, skip mode, generation."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from attnlab import BUILTIN_MIXERS, AttnLabForCausalLM
from attnlab.cache import CACHE_NAME
from attnlab.export import to_qwen2, to_qwen3
from attnlab.model import default_fixed_sequence, default_shadow_noise

from .conftest import tiny_config
from .test_inspection import assert_attention_matters

IMPLEMENTATIONS = ("fast", "reference")
PARITY_LEN = 32  # a uniform causal map of this length has mean row max 0.13, below the "attention matters" range
PARITY_ATOL = 2e-5  # float32 logit error against transformers: measured ≤ 5.2e-6 (see the parity tests)


def attentive_model(**overrides) -> AttnLabForCausalLM:
    """A tiny model in which attention matters: weights of std 0.2 (not 0.02) give maps that are neither
    uniform nor one-hot (mean row max ≈ 0.34 at L = 32) and attention outputs of the residual stream's size.

    At the default init, replacing every map by a uniform average moves the logits by only ~2e-3, so a
    parity test there cannot see the score scale.
    """
    return AttnLabForCausalLM(tiny_config(initializer_range=0.2, **overrides)).eval()


@pytest.mark.parametrize("num_key_value_heads", [4, 2, 1])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("head_dim", [None, 16])
def test_all_standard_model_matches_qwen2(num_key_value_heads, tied, head_dim):
    """Weights load strictly into Qwen2ForCausalLM and both paths give its logits, with and without right
    padding; an explicit head_dim (16 × 4 heads in a width-32 model) carries over.

    Measured float32 error: ≤ 5.2e-6 over these cases (logits of std ≈ 1.1), so the tolerance is 2e-5;
    scaling every score by 1.01 moves the logits by ≥ 5.3e-2.
    """
    ours = attentive_model(num_key_value_heads=num_key_value_heads, tie_word_embeddings=tied, head_dim=head_dim)
    qwen = to_qwen2(ours)  # loads the weights strictly
    input_ids = torch.randint(0, ours.config.vocab_size, (3, PARITY_LEN))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, 20:] = 0  # right padding
    real = attention_mask.bool()  # outputs at padded positions are unused; compare real tokens
    with torch.no_grad():
        assert_attention_matters(ours(input_ids, output_attentions=True).attentions)
        for mask in (None, attention_mask):
            expected = qwen(input_ids, attention_mask=mask).logits[real]
            for implementation in IMPLEMENTATIONS:
                logits = ours(input_ids, attention_mask=mask, mixer_implementation=implementation).logits[real]
                torch.testing.assert_close(logits, expected, atol=PARITY_ATOL, rtol=0)


def test_explicit_position_ids_reach_rope_as_in_qwen2():
    """Explicit position_ids [batch, seq] give Qwen2's logits on both paths: row 0 shifted by 5 (RoPE is
    relative, so about the default logits), row 1 with a jump of 7 after position 15, which changes the
    relative distances and so the logits."""
    ours = attentive_model()
    qwen = to_qwen2(ours)
    input_ids = torch.randint(0, ours.config.vocab_size, (2, PARITY_LEN))
    positions = torch.arange(PARITY_LEN)
    position_ids = torch.stack([positions + 5, positions + 7 * (positions >= PARITY_LEN // 2)])  # [2, seq]
    with torch.no_grad():
        expected = qwen(input_ids, position_ids=position_ids).logits
        for implementation in IMPLEMENTATIONS:
            logits = ours(input_ids, position_ids=position_ids, mixer_implementation=implementation).logits
            torch.testing.assert_close(logits, expected, atol=PARITY_ATOL, rtol=0)
        default = ours(input_ids).logits
    torch.testing.assert_close(default[0], expected[0], atol=PARITY_ATOL, rtol=0)
    assert (default[1] - expected[1]).abs().max() > 0.1


def test_default_position_ids_given_explicitly_change_nothing():
    """position_ids = 0..L−1, for one row or every row, is the default, for a stack with every mixer."""
    model = attentive_model(mixer_types=list(BUILTIN_MIXERS), num_hidden_layers=len(BUILTIN_MIXERS))
    input_ids = torch.randint(0, model.config.vocab_size, (2, 12))
    positions = torch.arange(12)
    with torch.no_grad():
        expected = model(input_ids).logits
        for position_ids in (positions[None], positions.expand(2, -1)):
            assert torch.equal(model(input_ids, position_ids=position_ids).logits, expected)


def test_inputs_embeds_equal_looked_up_input_ids():
    """forward(inputs_embeds=Emb(ids)) is forward(ids) on both paths, for a stack with one layer of every mixer
    (staticembqk takes its queries and keys from these embeddings), and generate continues them alike."""
    model = attentive_model(mixer_types=list(BUILTIN_MIXERS), num_hidden_layers=len(BUILTIN_MIXERS))
    input_ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        inputs_embeds = model.get_input_embeddings()(input_ids)  # [batch, seq, hidden]
        for implementation in IMPLEMENTATIONS:
            expected = model(input_ids, mixer_implementation=implementation).logits
            assert torch.equal(model(inputs_embeds=inputs_embeds, mixer_implementation=implementation).logits, expected)
    options = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    from_ids = model.generate(input_ids, **options)
    assert torch.equal(model.generate(inputs_embeds=inputs_embeds, **options), from_ids[:, 12:])  # new tokens only


def test_logits_to_keep_selects_rows_as_transformers_does():
    """An int keeps the last `logits_to_keep` positions (0: all of them), a 1-D tensor the positions it lists,
    in its order: the rows of the full logits, and Qwen2's logits for the same argument."""
    ours = attentive_model()
    qwen = to_qwen2(ours)
    input_ids = torch.randint(0, ours.config.vocab_size, (2, PARITY_LEN))
    with torch.no_grad():
        full = ours(input_ids).logits  # [batch, seq, vocab]
        cases = [(0, slice(None)), (3, slice(-3, None)), *((torch.tensor(rows), rows) for rows in ([0, 5, 9], [31, 2]))]
        for keep, rows in cases:
            kept = ours(input_ids, logits_to_keep=keep).logits
            assert torch.equal(kept, full[:, rows])
            torch.testing.assert_close(kept, qwen(input_ids, logits_to_keep=keep).logits, atol=PARITY_ATOL, rtol=0)


def test_hidden_states_follow_the_transformers_convention():
    config = tiny_config(num_hidden_layers=3)
    ours = AttnLabForCausalLM(config).eval()
    qwen = to_qwen2(ours)  # loads the weights strictly
    input_ids = torch.randint(0, config.vocab_size, (2, 9))
    with torch.no_grad():
        mine = ours(input_ids, output_hidden_states=True).hidden_states
        theirs = qwen(input_ids, output_hidden_states=True).hidden_states
    assert len(mine) == len(theirs) == config.num_hidden_layers + 1
    for a, b in zip(mine, theirs):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("attention_bias", [False, True])
def test_qk_norm_matches_qwen3(attention_bias):
    """Qwen3's attention_bias also biases o_proj, which attnlab has without one: the export sets it to zero.

    Measured float32 error ≤ 3.6e-6 (tolerance 2e-5); scaling every score by 1.01 moves the logits by ≥ 1.7e-2.
    """
    ours = attentive_model(qk_norm=True, attention_bias=attention_bias, num_key_value_heads=2, head_dim=16)
    for name, parameter in ours.named_parameters():  # make the norm weights non-trivial
        if name.endswith(("q_norm.weight", "k_norm.weight", "proj.bias")):
            parameter.data.uniform_(0.5, 1.5)
    qwen3 = to_qwen3(ours)  # loads the weights strictly
    assert type(qwen3).__name__ == "Qwen3ForCausalLM" and qwen3.config.head_dim == 16
    input_ids = torch.randint(0, ours.config.vocab_size, (2, PARITY_LEN))
    with torch.no_grad():
        assert_attention_matters(ours(input_ids, output_attentions=True).attentions)
        expected = qwen3(input_ids).logits
        for implementation in IMPLEMENTATIONS:
            logits = ours(input_ids, mixer_implementation=implementation).logits
            torch.testing.assert_close(logits, expected, atol=PARITY_ATOL, rtol=0)


@pytest.mark.parametrize("layers", ["uniform:standard", "fixedseqqk,rndembqk", "hybrid:mlp", "hybrid:nonapprox"])
def test_save_and_load_round_trip_is_exact(tmp_path, layers):
    """save_pretrained → from_pretrained (Auto classes, safetensors) keeps weights, buffers and the pattern."""
    config = tiny_config(layers=layers, qk_norm=True)
    model = AttnLabForCausalLM(config).eval()
    if model.model.shadow_token_ids is not None:
        model.model.set_fixed_sequence(torch.arange(config.shadow_seq_len) % config.vocab_size, source="test:arange")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, AttnLabForCausalLM)
    assert loaded.config.mixer_types == config.mixer_types
    assert AutoConfig.from_pretrained(tmp_path).mixer_types == config.mixer_types
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for key in original:
        assert torch.equal(original[key], restored[key]), key
    if model.model.shadow_token_ids is not None:
        assert loaded.config.fixed_sequence_source == "test:arange"
        assert torch.equal(loaded.model.shadow_token_ids, torch.arange(config.shadow_seq_len) % config.vocab_size)
    input_ids = torch.randint(0, config.vocab_size, (2, 10))
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, loaded(input_ids).logits)


def test_fixed_sequences_are_persistent_buffers_in_the_safetensors_file(tmp_path):
    config = tiny_config(layers="rndembqk,fixedseqqk")
    AttnLabForCausalLM(config).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    assert torch.equal(tensors["model.shadow_noise"], default_shadow_noise(config))
    assert torch.equal(tensors["model.shadow_token_ids"], default_fixed_sequence(config))


def test_default_fixed_sequences_are_deterministic_and_seeded():
    config = tiny_config(layers="rndembqk,fixedseqqk")
    torch.manual_seed(123)
    first = AttnLabForCausalLM(config)
    torch.manual_seed(456)
    second = AttnLabForCausalLM(config)
    assert torch.equal(first.model.shadow_noise, second.model.shadow_noise)
    assert torch.equal(first.model.shadow_token_ids, second.model.shadow_token_ids)
    other_seed = AttnLabForCausalLM(tiny_config(layers="rndembqk,fixedseqqk", shadow_noise_seed=1))
    assert not torch.equal(first.model.shadow_noise, other_seed.model.shadow_noise)
    noise = first.model.shadow_noise
    assert noise.shape == (config.shadow_seq_len, config.hidden_size)
    assert abs(noise.mean().item()) < 0.1 and abs(noise.std().item() - 1) < 0.1  # N(0, 1), σ = 1 pinned


def test_models_without_shadow_mixers_have_no_shadow_buffers():
    model = AttnLabForCausalLM(tiny_config(layers="hybrid:staticembqk"))
    assert model.model.shadow_noise is None and model.model.shadow_token_ids is None
    assert not any("shadow" in key for key in model.state_dict())


def test_set_fixed_sequence_validates_its_input():
    model = AttnLabForCausalLM(tiny_config(layers="uniform:fixedseqqk"))
    with pytest.raises(ValueError, match="exactly shadow_seq_len=48"):
        model.model.set_fixed_sequence([1, 2, 3], source="x")
    with pytest.raises(ValueError, match="must lie in"):
        model.model.set_fixed_sequence(torch.full((48,), 61), source="x")
    with pytest.raises(ValueError, match="no fixedseqqk layer"):
        AttnLabForCausalLM(tiny_config()).model.set_fixed_sequence(torch.zeros(48), source="x")


@pytest.mark.parametrize("mixer", BUILTIN_MIXERS)
def test_from_config_works_for_every_mixer(mixer):
    model = AutoModelForCausalLM.from_config(tiny_config(layers=f"uniform:{mixer}"))
    logits = model(torch.randint(0, 61, (2, 5))).logits
    assert logits.shape == (2, 5, 61) and torch.isfinite(logits).all()


def test_skip_mode_removes_whole_nonstandard_layers():
    """A hybrid run with skip_nonstandard equals an all-standard model made of only its standard layers."""
    config = tiny_config(num_hidden_layers=4, layers="hybrid:approximate")
    hybrid = AttnLabForCausalLM(config).eval()
    skipped = AttnLabForCausalLM(tiny_config(num_hidden_layers=4, layers="hybrid:approximate", skip_nonstandard=True))
    skipped.load_state_dict(hybrid.state_dict())
    standard_only = AttnLabForCausalLM(tiny_config(num_hidden_layers=2)).eval()
    state = {key: value for key, value in hybrid.state_dict().items() if ".layers." not in key}
    for new_index, old_index in enumerate([1, 3]):  # layers 2 and 4 keep standard attention
        prefix = f"model.layers.{old_index}."
        state.update(
            {
                key.replace(prefix, f"model.layers.{new_index}."): value
                for key, value in hybrid.state_dict().items()
                if key.startswith(prefix)
            }
        )
    standard_only.load_state_dict(state, strict=True)
    input_ids = torch.randint(0, config.vocab_size, (2, 11))
    with torch.no_grad():
        expected = standard_only(input_ids).logits
        assert torch.allclose(skipped.eval()(input_ids).logits, expected, atol=1e-5)
        assert not torch.allclose(hybrid(input_ids).logits, expected, atol=1e-3)
        hybrid.config.skip_nonstandard = True  # the same switch at run time
        assert torch.allclose(hybrid(input_ids).logits, expected, atol=1e-5)


def test_skip_mode_from_pretrained_flag(tmp_path):
    AttnLabForCausalLM(tiny_config(num_hidden_layers=4, layers="hybrid:rndembqk")).save_pretrained(tmp_path)
    model = AttnLabForCausalLM.from_pretrained(tmp_path, skip_nonstandard=True)
    assert model.config.skip_nonstandard
    output = model(torch.randint(0, 61, (1, 6)), output_attentions=True)
    assert len(output.attentions) == 2


def test_loss_is_the_shifted_next_token_cross_entropy():
    model = AttnLabForCausalLM(tiny_config(layers="hybrid:nonapprox")).eval()
    input_ids = torch.randint(0, 61, (2, 9))
    output = model(input_ids, labels=input_ids)
    expected = torch.nn.functional.cross_entropy(output.logits[:, :-1].reshape(-1, 61), input_ids[:, 1:].reshape(-1))
    assert torch.allclose(output.loss, expected, atol=1e-6)


@pytest.mark.parametrize("layers", ["uniform:standard", "uniform:approximate", "hybrid:fixedseqqk"])
def test_greedy_generate_equals_argmax_recomputation(layers):
    model = AttnLabForCausalLM(tiny_config(layers=layers)).eval()
    prompt = torch.randint(0, 61, (1, 4))
    generated = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    sequence = prompt
    with torch.no_grad():
        for _ in range(6):
            next_token = model(sequence).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], dim=1)
    assert torch.equal(generated, sequence)


def test_inputs_longer_than_the_shadow_sequence_are_rejected():
    model = AttnLabForCausalLM(tiny_config(layers="uniform:rndembqk", shadow_seq_len=8))
    with pytest.raises(ValueError, match="exceeds shadow_seq_len=8"):
        model(torch.randint(0, 61, (1, 9)))


def test_bad_forward_arguments_are_rejected():
    model = AttnLabForCausalLM(tiny_config())
    input_ids = torch.randint(0, 61, (2, 5))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        model(input_ids, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="mixer_implementation"):
        model(input_ids, mixer_implementation="turbo")
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model()


def test_only_matching_models_export_to_qwen2_and_qwen3():
    with pytest.raises(ValueError, match="only an all-standard model"):
        to_qwen2(AttnLabForCausalLM(tiny_config(layers="hybrid:mlp")))
    with pytest.raises(ValueError, match="qk_norm=True"):
        to_qwen2(AttnLabForCausalLM(tiny_config(qk_norm=True)))
    with pytest.raises(ValueError, match="with QK-norm"):
        to_qwen3(AttnLabForCausalLM(tiny_config()))
    with pytest.raises(ValueError, match="only an all-standard model is a Qwen3 model"):
        to_qwen3(AttnLabForCausalLM(tiny_config(layers="uniform:nonapprox", qk_norm=True)))


def test_from_pretrained_overrides_are_checked_and_re_resolve_the_pattern(tmp_path):
    """`from_pretrained(path, layers=…)` builds what it says and saves a model that loads again; a depth
    that an explicit mixer list cannot cover is refused."""
    AttnLabForCausalLM(tiny_config(layers="hybrid:nonapprox")).save_pretrained(tmp_path / "hybrid")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hybrid", layers="uniform:standard")
    assert model.config.mixer_types == ["standard", "standard"]
    assert [layer.mixer_type for layer in model.model.layers] == ["standard", "standard"]
    model.save_pretrained(tmp_path / "resaved")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "resaved").config.mixer_types == ["standard", "standard"]
    deeper = AutoConfig.from_pretrained(tmp_path / "hybrid", num_hidden_layers=4)
    assert deeper.mixer_types == ["nonapprox", "standard", "nonapprox", "standard"]
    AttnLabForCausalLM(tiny_config(mixer_types=["mlp", "standard"])).save_pretrained(tmp_path / "listed")
    with pytest.raises(ValueError, match="names 2 mixers but the model has num_hidden_layers=3"):
        AutoConfig.from_pretrained(tmp_path / "listed", num_hidden_layers=3)
    with pytest.raises(ValueError, match="hidden_act must be 'silu'"):
        AutoConfig.from_pretrained(tmp_path / "listed", hidden_act="gelu")


def test_return_dict_false_gives_tuples():
    model = AttnLabForCausalLM(tiny_config())
    input_ids = torch.randint(0, 61, (2, 7))
    output = model(input_ids, labels=input_ids)
    loss, logits = model(input_ids, labels=input_ids, return_dict=False)
    assert torch.equal(loss, output.loss) and torch.equal(logits, output.logits)
    (hidden,) = model.model(input_ids, return_dict=False)
    assert torch.equal(hidden, model.model(input_ids).last_hidden_state)


@pytest.mark.parametrize(
    "layers", [*(f"uniform:{mixer}" for mixer in BUILTIN_MIXERS), "hybrid:rndembqk", "hybrid:staticembqk"]
)
def test_activation_checkpointing_recomputes_and_gives_the_same_gradients(layers):
    """Every layer runs again in backward, and every parameter gets the gradient it gets without
    checkpointing — the embeddings through static-embedding and shadow-stream paths included."""
    torch.manual_seed(0)
    plain = AttnLabForCausalLM(tiny_config(layers=layers)).train()
    checkpointed = AttnLabForCausalLM(plain.config).train()
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.activation_checkpointing_enable()
    entered = []
    for layer in checkpointed.model.layers:  # a pre-hook: recomputation may stop right after the MLP's last save
        layer.mlp.register_forward_pre_hook(lambda *_: entered.append(1))
    input_ids = torch.randint(0, 61, (2, 9))
    plain(input_ids, labels=input_ids, return_logits=False).loss.backward()
    loss = checkpointed(input_ids, labels=input_ids, return_logits=False).loss
    forward_calls = len(entered)
    loss.backward()
    assert forward_calls > 0 and len(entered) == 2 * forward_calls  # every layer ran again in backward
    for (name, expected), actual in zip(plain.named_parameters(), checkpointed.parameters()):
        assert (expected.grad is None) == (actual.grad is None), name
        if expected.grad is not None:
            torch.testing.assert_close(actual.grad, expected.grad, rtol=1e-6, atol=1e-7, msg=name)


def test_activation_checkpointing_refuses_reentrant_mode_and_a_training_cache():
    model = AttnLabForCausalLM(tiny_config(layers="uniform:staticembqk"))
    with pytest.raises(ValueError, match="use_reentrant=False"):
        model.activation_checkpointing_enable({"use_reentrant": True})
    model.activation_checkpointing_enable()
    input_ids = torch.randint(0, 61, (1, 5))
    with pytest.raises(ValueError, match="write the decode cache twice"):
        model.train()(input_ids, use_cache=True)
    model.eval()
    assert model.generate(input_ids, max_new_tokens=3, do_sample=False).shape == (1, 8)


def test_a_folder_without_generation_config_still_decodes_with_the_cache(tmp_path):
    AttnLabForCausalLM(tiny_config()).save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").unlink()
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.config.use_cache is False  # the training default stays
    output = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, return_dict_in_generate=True)
    cache = getattr(output, CACHE_NAME)
    assert cache is not None and cache.get_seq_length() == 4


def test_resizing_below_the_fixed_sequence_ids_is_refused():
    model = AttnLabForCausalLM(tiny_config(layers="uniform:fixedseqqk"))
    largest = int(model.model.shadow_token_ids.max())
    with pytest.raises(ValueError, match=f"holds token id {largest}, outside a vocabulary of {largest}"):
        model.resize_token_embeddings(largest)
    assert model.config.vocab_size == 61  # nothing was changed
    model.model.set_fixed_sequence(torch.arange(48) % 10, source="test")
    model.resize_token_embeddings(10)
    assert model.config.vocab_size == 10 and model(torch.randint(0, 10, (1, 48))).logits.shape == (1, 48, 10)


def test_export_keeps_the_dtype():
    ours = AttnLabForCausalLM(tiny_config()).to(torch.bfloat16)
    qwen = to_qwen2(ours)
    assert {parameter.dtype for parameter in qwen.parameters()} == {torch.bfloat16}
    theirs = qwen.state_dict()
    for name, expected in ours.state_dict().items():
        assert torch.equal(theirs[name], expected), name
