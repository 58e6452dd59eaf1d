"""The mixer registry and the public `Mixer` interface: registration rules, entry points, and a mixer defined
here (outside the package, with no decode state of its own) working in patterns, maps and generation."""

from importlib import metadata

import pytest
import torch
from torch import nn

import attnlab
from attnlab import AttnLabConfig, AttnLabForCausalLM, Mixer, MixerOutput, register_mixer, resolve_layer_pattern
from attnlab.cache import AttnLabCache
from attnlab.mixers import BUILTIN_MIXERS, registry
from attnlab.mixers.registry import UnknownMixerError

from .conftest import tiny_config


class PrefixMean(Mixer):
    """o_i = W_o · mean_{j ≤ i} W_v x_j: a causal uniform average, with no decode state (`cache_layer` None)."""

    name = "prefixmean"

    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x, inputs):
        seq = x.shape[1]
        weights = torch.ones(seq, seq, device=x.device).tril()
        weights = weights / weights.sum(-1, keepdim=True)  # [query, key]
        mixed = self.o_proj(weights @ self.v_proj(x))
        heads = weights.expand(x.shape[0], self.num_heads, seq, seq)
        return MixerOutput(mixed, weights=heads if inputs.need_weights else None)


@pytest.fixture
def prefix_mean(monkeypatch):
    """PrefixMean registered for one test only (the registry is process-wide)."""
    monkeypatch.setitem(registry._registry, PrefixMean.name, PrefixMean)
    return PrefixMean


def test_the_builtin_seven_come_first_in_the_papers_order():
    assert attnlab.mixer_names()[:7] == BUILTIN_MIXERS
    assert BUILTIN_MIXERS == ("standard", "mlp", "approximate", "nonapprox", "rndembqk", "fixedseqqk", "staticembqk")
    assert all(registry.is_builtin(name) for name in BUILTIN_MIXERS)


def test_a_registered_mixer_is_a_name_in_every_kind_of_layer_pattern(prefix_mean):
    assert resolve_layer_pattern("uniform:prefixmean", 2) == ["prefixmean"] * 2
    assert resolve_layer_pattern("hybrid:prefixmean", 4) == ["prefixmean", "standard"] * 2
    assert resolve_layer_pattern("top:prefixmean", 4) == ["standard", "standard", "prefixmean", "prefixmean"]
    assert resolve_layer_pattern("prefixmean,mlp", 2) == ["prefixmean", "mlp"]
    assert "prefixmean" in attnlab.mixer_names() and not registry.is_builtin("prefixmean")


def test_a_mixer_from_outside_records_where_it_comes_from(prefix_mean):
    config = tiny_config(layers="hybrid:prefixmean", num_hidden_layers=2)
    assert config.mixer_packages == {"prefixmean": __name__}  # no installed distribution: its module
    assert tiny_config(layers="hybrid:mlp", num_hidden_layers=2).mixer_packages == {}


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: type("NotAMixer", (nn.Module,), {"name": "x"}), TypeError, "subclass of attnlab.Mixer"),
        (lambda: type("Bad", (Mixer,), {"name": "Bad-Name"}), ValueError, "lower-case identifier"),
        (lambda: type("Nameless", (Mixer,), {}), ValueError, "lower-case identifier"),
        (lambda: type("Taken", (Mixer,), {"name": "standard"}), ValueError, "taken by attnlab.mixers.standard"),
        (lambda: type("Odd", (Mixer,), {"name": "odd", "qk_source": "elsewhere"}), ValueError, "qk_source"),
    ],
)
def test_registration_refuses_what_would_break_later(make, error, message):
    before = dict(registry._registry)
    with pytest.raises(error, match=message):
        register_mixer(make())
    assert registry._registry == before


def test_registering_the_same_class_again_changes_nothing(prefix_mean):
    assert register_mixer(PrefixMean) is PrefixMean
    assert list(registry._registry).count("prefixmean") == 1


def test_an_entry_point_that_fails_to_import_names_itself_and_does_not_stop_the_others(monkeypatch):
    broken = metadata.EntryPoint(name="broken", value="attnlab_no_such_module:Mixer", group=registry.ENTRY_POINT_GROUP)
    working = metadata.EntryPoint(name="prefixmean", value=f"{__name__}:PrefixMean", group=registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry.metadata, "entry_points", lambda group: [broken, working])
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    monkeypatch.setattr(registry, "_entry_point_errors", {})
    monkeypatch.setattr(registry, "_registry", dict(registry._registry))  # restored after the test
    assert registry.get_mixer("prefixmean") is PrefixMean  # the one after the broken one still registers
    message = "attnlab mixer entry point broken = 'attnlab_no_such_module:Mixer'"
    with pytest.raises(ImportError, match=message):  # its own name: that entry point's error, every time
        registry.get_mixer("broken")
    with pytest.raises(ImportError, match=message):
        registry.get_mixer("broken")
    with pytest.raises(UnknownMixerError, match=f"unknown mixer 'whatever'.*{message}"):
        registry.get_mixer("whatever")


def test_an_entry_point_naming_a_class_registers_it(monkeypatch):
    entry = metadata.EntryPoint(name="prefixmean", value=f"{__name__}:PrefixMean", group=registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry.metadata, "entry_points", lambda group: [entry])
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    monkeypatch.setattr(registry, "_registry", dict(registry._registry))  # restored after the test
    assert registry.get_mixer("prefixmean") is PrefixMean


def test_a_mixer_without_a_decode_state_generates_by_recomputation(prefix_mean):
    torch.manual_seed(0)
    model = AttnLabForCausalLM(tiny_config(layers="hybrid:prefixmean", num_hidden_layers=2, initializer_range=0.2))
    model.eval()
    with pytest.raises(ValueError, match="prefixmean keep no decode state"):
        AttnLabCache(model.config)
    prompt = torch.randint(0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1))
    generated = model.generate(prompt, max_new_tokens=4, do_sample=False)
    # Greedy decoding by hand: the full sequence through the model at every step.
    expected = prompt
    for _ in range(4):
        expected = torch.cat([expected, model(expected).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, expected)


def test_skip_mode_needs_no_state_for_the_layers_it_removes(prefix_mean):
    config = tiny_config(layers="hybrid:prefixmean", num_hidden_layers=2, skip_nonstandard=True)
    cache = AttnLabCache(config)
    assert cache.state_shapes(0) == {}
    model = AttnLabForCausalLM(config).eval()
    prompt = torch.tensor([[1, 2, 3]])
    assert torch.equal(
        model.generate(prompt, max_new_tokens=3, do_sample=False),
        model.generate(prompt, max_new_tokens=3, do_sample=False, use_cache=False),
    )


def test_a_registered_mixers_map_reaches_output_attentions(prefix_mean):
    model = AttnLabForCausalLM(tiny_config(layers="hybrid:prefixmean", num_hidden_layers=2)).eval()
    maps = model(torch.tensor([[1, 2, 3, 4]]), output_attentions=True).attentions
    expected = torch.tensor([1.0, 2.0, 3.0, 4.0])[:, None].reciprocal() * torch.ones(4, 4).tril()
    torch.testing.assert_close(maps[0][0, 0], expected)


def test_the_mixers_own_options_are_saved_with_the_model(prefix_mean, tmp_path):
    config = tiny_config(layers="hybrid:prefixmean", num_hidden_layers=2, mixer_options={"prefixmean": {"k": 3}})
    assert PrefixMean.options(config) == {"k": 3} and attnlab.get_mixer("mlp").options(config) == {}
    AttnLabForCausalLM(config).save_pretrained(tmp_path)
    assert AttnLabConfig.from_pretrained(tmp_path).mixer_options == {"prefixmean": {"k": 3}}
    with pytest.raises(ValueError, match="mixer_options must map mixer names to option dicts"):
        tiny_config(mixer_options={"prefixmean": 3})


def test_a_saved_model_whose_mixer_is_gone_says_what_to_install(prefix_mean, tmp_path):
    AttnLabForCausalLM(tiny_config(layers="hybrid:prefixmean", num_hidden_layers=2)).save_pretrained(tmp_path)
    del registry._registry["prefixmean"]  # monkeypatch restores it
    with pytest.raises(ValueError, match=f"the mixer 'prefixmean' from '{__name__}'.*pip install {__name__}"):
        AttnLabForCausalLM.from_pretrained(tmp_path)
    # Overriding the layers of such a model does not need the missing mixer.
    assert AttnLabConfig.from_pretrained(tmp_path, layers="hybrid:mlp").mixer_packages == {}
