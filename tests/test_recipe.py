"""The training recipe of docs/method.md §4 against closed forms and equivalences, on tiny runs of the real loop
(`attnlab train`): gradient accumulation takes the step of the whole batch (across DDP ranks too: see
test_train.py::test_two_cpu_processes_match_one_process); the LR of every step is a linear warm-up then half
a cosine to zero; weight decay falls on exactly the matrices and embeddings; and the update each step applied
is AdamW's, with the run's LR, betas, eps and weight decay, on the gradient clipped to the run's norm
(recomputed from consecutive checkpoints)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoTokenizer

from attnlab import AttnLabConfig, AttnLabForCausalLM
from attnlab.checkpoint import load_trainer_state
from attnlab.cli import main
from attnlab.data import make_train_stream, open_corpus
from attnlab.optim import build_optimizer
from attnlab.runconfig import TrainConfig

from .test_train import logged, tiny_train_args

# both steps checkpointed; AdamW, the paper's optimizer (cpu-tiny's own is Muon: tests/test_optim.py)
TWO_STEPS = ("--max-steps", "2", "--save-every", "1", "--eval-every", "0", "--optimizer", "adamw")

# Float32 sums over the same 4 sequences taken in another order differ in their last bits; AdamW's
# g / (√v + eps) amplifies that where |g| is near eps. Measured on 2 steps at LR 1e-3, 2e-3: weights ≤ 1.6e-6
# apart (≤ 2.6e-7 after one step), moments ≤ 2.7e-7 of their tensor's largest entry, loss and gradient norm
# equal. A wrong batch, a lost micro-batch or a gradient off by a factor moves them by ≥ 1e-3 (relative).
WEIGHTS_ATOL = 1e-5
MOMENTS_RTOL = 1e-5
METRICS_RTOL = 1e-6

# ------------------------------------------------------------------------------- gradient accumulation


def assert_same_steps(run: Path, reference: Path) -> None:
    """`run` logged the loss, gradient norm and LR of `reference` at every step, and each of its checkpoints
    holds the same weights and AdamW moments (the moments carry the gradient's scale, which AdamW's update
    divides out)."""
    for key in ("loss", "grad_norm", "lr"):
        assert sorted(logged(run, key)) == [1, 2]
        assert logged(run, key) == pytest.approx(logged(reference, key), rel=METRICS_RTOL), key
    for step in (1, 2):
        got_weights = load_file(run / f"checkpoint-{step}" / "model.safetensors")
        want_weights = load_file(reference / f"checkpoint-{step}" / "model.safetensors")
        assert got_weights.keys() == want_weights.keys()
        for name, want in want_weights.items():
            error = (got_weights[name] - want).abs().max().item()
            assert error <= WEIGHTS_ATOL, (step, name, error)
        got_state = load_trainer_state(run / f"checkpoint-{step}")["optimizer"]["state"]
        want_state = load_trainer_state(reference / f"checkpoint-{step}")["optimizer"]["state"]
        assert got_state.keys() == want_state.keys()
        for index, moments in want_state.items():
            for key in ("exp_avg", "exp_avg_sq"):
                error = (got_state[index][key] - moments[key]).abs().max().item()
                assert error <= MOMENTS_RTOL * moments[key].abs().max().item(), (step, index, key, error)


@pytest.fixture(scope="module")
def batch_of_4(corpus, tmp_path_factory) -> Path:
    """The reference run: each of its 2 optimizer steps is one micro-batch of 4 sequences."""
    out = tmp_path_factory.mktemp("accumulation") / "batch-of-4"
    assert main(tiny_train_args(corpus, out, *TWO_STEPS)) == 0
    return out


def test_every_layout_of_a_step_reads_the_same_sequences(corpus, batch_of_4):
    """The premise of the equivalences below: the train stream hands out sequences by position, whatever the
    micro-batch size and the number of ranks. Batches of 4, micro-batches of 2, and 2 ranks taking turns
    with micro-batches of 1 (test_train's DDP run) read the same 8 sequences in the same 2 steps."""
    data, tokenizer = open_corpus(str(corpus)), AutoTokenizer.from_pretrained(batch_of_4)

    def stream(rank: int = 0, world_size: int = 1):
        return make_train_stream(data, tokenizer, 32, seed=0, rank=rank, world_size=world_size)

    whole = stream()
    steps = torch.cat([whole.next_batch(4), whole.next_batch(4)])
    halves = stream()
    assert torch.equal(torch.cat([halves.next_batch(2) for _ in range(4)]), steps)
    ranks = [stream(rank, 2) for rank in (0, 1)]
    assert torch.equal(torch.cat([rank.next_batch(1) for _ in range(4) for rank in ranks]), steps)
    assert len(set(map(tuple, steps.tolist()))) == 8  # 8 distinct sequences: a reordering would show


def test_two_micro_batches_of_2_take_the_step_of_a_batch_of_4(corpus, batch_of_4, tmp_path):
    """Batch size 2, global batch 4: each step accumulates 2 micro-batches, each loss divided by 2."""
    out = tmp_path / "accumulated"
    assert main(tiny_train_args(corpus, out, *TWO_STEPS, "--batch-size", "2")) == 0  # accumulation 2
    assert_same_steps(out, batch_of_4)


# ------------------------------------------------------------------------------------------ weight decay

# The convention of `TrainConfig.weight_decay` (docs/method.md §4): AdamW decays weight matrices and embeddings, not
# biases and norm gains. Names under `model.layers.<i>.`: (decayed, not decayed), by what the layer holds.
ATTENTION_MIXER = (  # standard and every variant that keeps its projections
    ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight"],
    ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"],
)
QK_NORM = ([], ["self_attn.q_norm.weight", "self_attn.k_norm.weight"])
TOKEN_MLP_MIXER = ([f"self_attn.token_mlp.{name}_proj.weight" for name in ("gate", "up", "down")], [])
EVERY_LAYER = (
    ["mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"],
    ["input_layernorm.weight", "post_attention_layernorm.weight"],
)
ALL_MIXERS = ["standard", "mlp", "approximate", "nonapprox", "rndembqk", "fixedseqqk", "staticembqk"]


def expected_decay(mixer_types: list[str], qk_norm: bool, tied: bool) -> tuple[set[str], set[str]]:
    """(decayed, not decayed) parameter names of a model with these layers, by the convention above."""
    decayed, not_decayed = {"model.embed_tokens.weight"}, {"model.norm.weight"}
    if not tied:
        decayed.add("lm_head.weight")
    for index, mixer in enumerate(mixer_types):
        parts = [EVERY_LAYER, TOKEN_MLP_MIXER] if mixer == "mlp" else [EVERY_LAYER, ATTENTION_MIXER]
        if mixer != "mlp" and qk_norm:
            parts.append(QK_NORM)
        for decay, no_decay in parts:
            decayed.update(f"model.layers.{index}.{name}" for name in decay)
            not_decayed.update(f"model.layers.{index}.{name}" for name in no_decay)
    return decayed, not_decayed


def names_by_group(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """The parameter names of each of the optimizer's groups, in the optimizer's order."""
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    return [[names[id(parameter)] for parameter in group["params"]] for group in optimizer.param_groups]


@pytest.mark.parametrize(("qk_norm", "tied"), [(True, True), (False, False)])
def test_weight_decay_falls_on_exactly_the_matrices_and_embeddings(qk_norm, tied):
    """Every mixer kind, with and without QK-norm and a separate head: each parameter in exactly one group,
    the decayed one holding exactly the names the convention decays."""
    config = AttnLabConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=len(ALL_MIXERS),
        num_attention_heads=2,
        max_position_embeddings=16,
        layers=ALL_MIXERS,
        qk_norm=qk_norm,
        tie_word_embeddings=tied,
    )
    model = AttnLabForCausalLM(config)
    optimizer = build_optimizer(model, TrainConfig(weight_decay=0.3))
    by_decay: dict[float, list[str]] = {}
    for group, names in zip(optimizer.param_groups, names_by_group(model, optimizer)):
        by_decay.setdefault(group["weight_decay"], []).extend(names)
    decayed, not_decayed = expected_decay(ALL_MIXERS, qk_norm, tied)
    assert sorted(by_decay) == [0.0, 0.3]
    assert sorted(by_decay[0.3]) == sorted(decayed)  # each name once: a tied head is not a second parameter
    assert sorted(by_decay[0.0]) == sorted(not_decayed)
    assert decayed | not_decayed == {name for name, _ in model.named_parameters()}


# ------------------------------------------------------------------------------- optimizer and schedule

# A run whose every optimizer setting differs from the defaults, so a default or a constant used in their
# place shows; the clip is far below this model's gradient norms (0.8 to 1.2), so it rescales every step.
RECIPE = {
    "optimizer": "adamw",
    "lr": 3e-3,
    "beta1": 0.8,
    "beta2": 0.99,
    "eps": 1e-6,
    "weight_decay": 0.3,
    "grad_clip": 0.05,
}
RECIPE_LAYERS = ["standard", "mlp", "approximate", "staticembqk"]
WARMUP, STEPS = 3, 8
# Recomputing an update in float64 from the float32 checkpoints: measured ≤ 6e-8 (half a float32 ulp of a
# norm gain near 1). A decay wrongly applied or left out moves a weight by ≥ 1e-5, a wrong LR by ≥ 1e-5.
UPDATE_ATOL = 1e-6


def paper_lr(step: int, peak: float, warmup: int, total: int) -> float:
    """The LR of optimizer step `step` (counted from 1) of `total`: a linear warm-up that reaches `peak` at
    step `warmup`, then half a cosine cycle from `peak` (at step `warmup + 1`) down to zero, which it
    reaches once the last step is taken."""
    if step <= warmup:
        return peak * step / warmup
    return peak * (1 + math.cos(math.pi * (step - 1 - warmup) / (total - warmup))) / 2


@pytest.fixture(scope="module")
def recipe(corpus, tmp_path_factory) -> Path:
    """A run with RECIPE's settings, a hybrid of four mixer kinds (QK-norm, untied head), and a checkpoint
    after every step."""
    folder = tmp_path_factory.mktemp("recipe")
    config = folder / "recipe.yaml"
    config.write_text(yaml.safe_dump({"train": RECIPE}))
    out = folder / "run"
    args = tiny_train_args(corpus, out, "--config", str(config), "--layers", ",".join(RECIPE_LAYERS))
    args += ["--num-hidden-layers", str(len(RECIPE_LAYERS)), "--qk-norm", "--no-tie-word-embeddings"]
    args += ["--max-steps", str(STEPS), "--warmup-steps", str(WARMUP), "--save-every", "1"]
    assert main([*args, "--keep-checkpoints", str(STEPS), "--eval-every", "0"]) == 0
    return out


def optimizer_order(run: Path) -> list[str]:
    """The run's parameter names in the order of its AdamW state (the order of `build_optimizer`'s groups)."""
    model = AttnLabForCausalLM(AttnLabConfig.from_pretrained(run))
    settings = TrainConfig(**yaml.safe_load((run / "run_config.yaml").read_text())["train"])
    return [name for names in names_by_group(model, build_optimizer(model, settings)) for name in names]


def adamw_moments(checkpoint: Path, names: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    """name → (first moment, second moment, steps taken) of a checkpoint's AdamW state, in float64."""
    state = load_trainer_state(checkpoint)["optimizer"]["state"]
    return {
        name: (state[index]["exp_avg"].double(), state[index]["exp_avg_sq"].double(), int(state[index]["step"]))
        for index, name in enumerate(names)
    }


def test_build_optimizer_gives_adamw_the_settings():
    """The optimizer the loop builds is plain AdamW with the settings' peak LR, betas, eps and weight decay."""
    settings = TrainConfig(**{key: value for key, value in RECIPE.items() if key != "grad_clip"})
    model = AttnLabForCausalLM(AttnLabConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1))
    optimizer = build_optimizer(model, settings)
    assert type(optimizer) is torch.optim.AdamW
    assert [(group["lr"], group["betas"], group["eps"]) for group in optimizer.param_groups] == [
        (3e-3, (0.8, 0.99), 1e-6)
    ] * 2
    assert sorted(group["weight_decay"] for group in optimizer.param_groups) == [0.0, 0.3]
    assert not any(group["amsgrad"] or group["maximize"] for group in optimizer.param_groups)


def test_the_lr_of_every_step_is_warm_up_then_cosine_to_zero(recipe):
    """metrics.jsonl's `lr` of every step is `paper_lr`'s; after the last step the schedule stands at zero."""
    expected = {step: paper_lr(step, RECIPE["lr"], WARMUP, STEPS) for step in range(1, STEPS + 1)}
    assert logged(recipe, "lr") == pytest.approx(expected, rel=1e-12, abs=0)
    by_hand = [1e-3, 2e-3, 3e-3, 3e-3, 3e-3 * (1 + math.cos(math.pi / 5)) / 2]  # 1/3, 2/3, 1 of the peak, then cos
    assert [expected[step] for step in range(1, 6)] == pytest.approx(by_hand, rel=1e-12)
    groups = load_trainer_state(recipe / f"checkpoint-{STEPS}")["optimizer"]["param_groups"]
    assert all(group["initial_lr"] == RECIPE["lr"] and group["lr"] == 0.0 for group in groups)  # zero at the end


def test_every_update_is_adamw_with_the_run_settings(recipe):
    """w_t = w_{t-1}·(1 − lr_t·λ) − lr_t/(1 − β1^t) · m_t / (√(v_t/(1 − β2^t)) + ε), recomputed from
    checkpoints t−1 and t with λ by the decay convention and lr_t by `paper_lr`: the LR, betas, eps and
    decay the loop used are the run's (for t ≥ 2: there is no checkpoint before step 1)."""
    beta1, beta2, eps = RECIPE["beta1"], RECIPE["beta2"], RECIPE["eps"]
    decayed, _ = expected_decay(RECIPE_LAYERS, qk_norm=True, tied=False)
    names = optimizer_order(recipe)
    groups = load_trainer_state(recipe / "checkpoint-1")["optimizer"]["param_groups"]
    assert sorted((g["initial_lr"], g["betas"], g["eps"], g["weight_decay"]) for g in groups) == [
        (RECIPE["lr"], (beta1, beta2), eps, 0.0),
        (RECIPE["lr"], (beta1, beta2), eps, RECIPE["weight_decay"]),
    ]
    for step in range(2, STEPS + 1):
        before = load_file(recipe / f"checkpoint-{step - 1}" / "model.safetensors")
        after = load_file(recipe / f"checkpoint-{step}" / "model.safetensors")
        lr = paper_lr(step, RECIPE["lr"], WARMUP, STEPS)
        for name, (m, v, taken) in adamw_moments(recipe / f"checkpoint-{step}", names).items():
            assert taken == step
            decay = RECIPE["weight_decay"] if name in decayed else 0.0
            adam = lr / (1 - beta1**step) * m / ((v / (1 - beta2**step)).sqrt() + eps)
            predicted = before[name].double() * (1 - lr * decay) - adam
            error = (predicted - after[name].double()).abs().max().item()
            assert error <= UPDATE_ATOL, (step, name, error)


def test_adamw_receives_the_gradient_clipped_to_the_run_norm(recipe):
    """The gradient AdamW received at step t, recovered from the first moments of checkpoints t−1 and t as
    g_t = (m_t − β1·m_{t−1}) / (1 − β1) (m_0 = 0), has the norm the clip allows: grad_clip, since the logged
    (pre-clip) norm is larger at every step; and the second moments follow from it,
    v_t = β2·v_{t−1} + (1 − β2)·g_t²."""
    beta1, beta2, clip = RECIPE["beta1"], RECIPE["beta2"], RECIPE["grad_clip"]
    names = optimizer_order(recipe)
    grad_norms = logged(recipe, "grad_norm")  # before the clip
    previous = {name: (0.0, 0.0, 0) for name in names}  # before step 1
    for step in range(1, STEPS + 1):
        moments = adamw_moments(recipe / f"checkpoint-{step}", names)
        gradients = {name: (m - beta1 * previous[name][0]) / (1 - beta1) for name, (m, _, _) in moments.items()}
        norm = math.sqrt(sum(gradient.square().sum().item() for gradient in gradients.values()))
        assert grad_norms[step] > 4 * clip, (step, grad_norms[step])  # the clip acts
        assert norm == pytest.approx(clip, rel=1e-4), (step, norm, grad_norms[step])
        for name, (_, v, _) in moments.items():
            expected = beta2 * previous[name][1] + (1 - beta2) * gradients[name].square()
            torch.testing.assert_close(v, expected, rtol=1e-4, atol=1e-6 * v.abs().max().item(), msg=f"{step} {name}")
        previous = moments
