"""Reduced precision on CPU, tiny: a few AdamW steps of every mixer under bf16 autocast (how `attnlab train`
runs on GPUs) stay finite and track the same steps in float32."""

from __future__ import annotations

import pytest
import torch

from attnlab import AttnLabForCausalLM
from attnlab.mixers import BUILTIN_MIXERS

from .conftest import tiny_config

STEPS = 4
# Largest |bf16 loss − fp32 loss| over the 4 steps, measured per mixer: 2e-4 to 2.6e-3 nats.
# The bound is ~8× that, for other platforms' kernels, and far below what the steps move the loss (≈ 0.6 nats),
# so a step that goes wrong in bf16 shows.
LOSS_TOLERANCE = 0.02


def _train_losses(model: AttnLabForCausalLM, batch: torch.Tensor, bf16: bool) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.9999), eps=1e-8, weight_decay=0.1)
    losses = []
    for _ in range(STEPS):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("mixer", BUILTIN_MIXERS)
def test_bf16_autocast_training_tracks_float32(mixer):
    config = tiny_config(layers=f"standard,{mixer}")
    reference = AttnLabForCausalLM(config)
    autocast = AttnLabForCausalLM(config)
    autocast.load_state_dict(reference.state_dict())
    batch = torch.randint(0, config.vocab_size, (4, 24))

    fp32, bf16 = _train_losses(reference, batch, bf16=False), _train_losses(autocast, batch, bf16=True)
    assert all(torch.isfinite(torch.tensor(bf16)))
    assert all(p.dtype == torch.float32 for p in autocast.parameters())  # autocast leaves the weights in fp32
    assert fp32[0] - fp32[-1] > 5 * LOSS_TOLERANCE  # the steps move the loss: tracking them means something
    assert max(abs(a - b) for a, b in zip(fp32, bf16)) < LOSS_TOLERANCE, (fp32, bf16)
