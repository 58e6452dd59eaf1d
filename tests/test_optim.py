"""`--optimizer muon` (`attnlab.optim`): the Newton–Schulz step against the SVD, Muon against PyTorch's own
`torch.optim.Muon`, the AdamW groups against `torch.optim.AdamW`, the parameter split, and a real run's
updates recomputed from its checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from attnlab import AttnLabConfig, AttnLabForCausalLM
from attnlab.checkpoint import load_trainer_state
from attnlab.cli import main
from attnlab.optim import MUON_MOMENTUM, MUON_RMS_SCALE, MuonAdamW, build_optimizer, newton_schulz
from attnlab.runconfig import TrainConfig

from .test_train import tiny_train_args


@pytest.mark.parametrize("shape", [(16, 48), (48, 16), (64, 256)])
def test_newton_schulz_keeps_the_singular_vectors_and_moves_the_singular_values_near_one(shape):
    update = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 3.0
    left, _, right_t = torch.linalg.svd(update.double(), full_matrices=False)
    core = left.T @ newton_schulz(update).double() @ right_t.T  # diagonal iff the singular vectors are kept
    singular_values = core.diagonal()
    assert (core - torch.diag(singular_values)).abs().max() < 1e-5
    assert 0.6 < singular_values.min() and singular_values.max() < 1.25  # measured 0.68 … 1.19


def _random_steps(optimizers, parameters, steps: int = 4):
    """Apply the same random gradients to each optimizer's own copy of the parameters; the updates of each."""
    generator = torch.Generator().manual_seed(1)
    updates = [[] for _ in optimizers]
    for _ in range(steps):
        grads = [torch.randn(p.shape, generator=generator) for p in parameters[0]]
        for index, (optimizer, copies) in enumerate(zip(optimizers, parameters)):
            before = [p.detach().clone() for p in copies]
            for copy, grad in zip(copies, grads):
                copy.grad = grad.clone()
            optimizer.step()
            updates[index].append([p.detach() - b for p, b in zip(copies, before)])
    return updates


def test_muon_takes_pytorchs_muon_step_with_adamw_matched_rms():
    """torch.optim.Muon (Nesterov, momentum 0.95, the "match_rms_adamw" LR adjustment) runs its Newton–Schulz
    iteration in bfloat16, ours in float32: updates within 5 % (measured ≤ 2.6 %). Weight decay 1.0 makes its
    term as large as the orthogonal step, so a decay wrongly applied shows; without Nesterov or the RMS
    factor the updates differ by far more."""
    start = [0.1 * torch.randn(24, 100), 0.1 * torch.randn(100, 24)]  # decay and orthogonal terms of one size
    ours, theirs = ([w.clone().requires_grad_() for w in start] for _ in range(2))
    optimizers = [
        MuonAdamW([{"params": ours, "use_muon": True, "weight_decay": 1.0}], lr=0.02),
        torch.optim.Muon(
            theirs, lr=0.02, weight_decay=1.0, momentum=MUON_MOMENTUM, nesterov=True, adjust_lr_fn="match_rms_adamw"
        ),
    ]
    got, want = _random_steps(optimizers, [ours, theirs])
    for step_got, step_want in zip(got, want):
        for update, reference in zip(step_got, step_want):
            assert (update - reference).norm() <= 0.05 * reference.norm()


def test_the_adamw_groups_take_pytorchs_adamw_step():
    start = [torch.randn(8, 5), torch.randn(5)]
    ours, theirs = ([w.clone().requires_grad_() for w in start] for _ in range(2))
    groups = (
        lambda params: [  # noqa: E731
            {"params": params[:1], "weight_decay": 0.3},
            {"params": params[1:], "weight_decay": 0.0},
        ]
    )
    settings = {"lr": 3e-3, "betas": (0.8, 0.95), "eps": 1e-6}
    optimizers = [MuonAdamW(groups(ours), **settings), torch.optim.AdamW(groups(theirs), **settings)]
    got, want = _random_steps(optimizers, [ours, theirs])
    for step_got, step_want in zip(got, want):
        for update, reference in zip(step_got, step_want):
            torch.testing.assert_close(update, reference, rtol=1e-5, atol=1e-8)


def test_muon_takes_the_decoder_matrices_and_adamw_the_rest():
    config = AttnLabConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, layers=["standard", "nonapprox"]
    )
    model = AttnLabForCausalLM(config)
    optimizer = build_optimizer(model, TrainConfig(optimizer="muon", weight_decay=0.2))
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    muon, decay, no_decay = ([names[id(p)] for p in group["params"]] for group in optimizer.param_groups)
    assert [group["use_muon"] for group in optimizer.param_groups] == [True, False, False]
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.2, 0.2, 0.0]
    assert muon and all(name.startswith("model.layers.") for name in muon)
    assert decay == ["model.embed_tokens.weight"]  # tied: the LM head is the same tensor
    assert all(model.get_parameter(name).dim() == 1 for name in no_decay)
    assert sorted(muon + decay + no_decay) == sorted(names.values())
    with pytest.raises(ValueError, match="matrices only"):
        MuonAdamW([{"params": [torch.zeros(3, requires_grad=True)], "use_muon": True}], lr=1e-3)


def test_a_muon_run_applies_muon_steps_and_checkpoints_its_state(corpus, tmp_path):
    """Step 2 of a real run, recomputed from its checkpoints: every decoder matrix moved by Muon's step on the
    clipped gradient g = B₂ − μB₁ (the momentum buffers of the two checkpoints), the embeddings by AdamW's."""
    out = tmp_path / "run"
    steps = ["--max-steps", "3", "--warmup-steps", "1", "--save-every", "1", "--keep-checkpoints", "3"]
    assert main([*tiny_train_args(corpus, out, *steps, "--eval-every", "0"), "--optimizer", "muon"]) == 0
    model = AttnLabForCausalLM(AttnLabConfig.from_pretrained(out))
    names = [name for name, p in model.named_parameters() if p.dim() == 2 and name.startswith("model.layers.")]
    first, second = (load_file(out / f"checkpoint-{step}" / "model.safetensors") for step in (1, 2))
    state_1, state_2 = (load_trainer_state(out / f"checkpoint-{step}") for step in (1, 2))
    group = state_2["optimizer"]["param_groups"][0]
    assert group["use_muon"] and sorted(group["params"]) == list(range(len(names)))
    step_lr = state_1["optimizer"]["param_groups"][0]["lr"]  # the LR the scheduler set for step 2
    for index, name in enumerate(names):
        buffer_1 = state_1["optimizer"]["state"][index]["momentum_buffer"]
        buffer_2 = state_2["optimizer"]["state"][index]["momentum_buffer"]
        grad = buffer_2 - MUON_MOMENTUM * buffer_1
        update = newton_schulz(grad + MUON_MOMENTUM * buffer_2)
        scale = MUON_RMS_SCALE * math.sqrt(max(update.shape))
        expected = first[name] * (1 - step_lr * group["weight_decay"]) - step_lr * scale * update
        torch.testing.assert_close(second[name], expected, rtol=0, atol=1e-6)
    assert not torch.equal(first[names[0]], second[names[0]])
