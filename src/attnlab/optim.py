"""The optimizers of `attnlab train`: AdamW (the paper's, docs/method.md §4), or Muon for the decoder's hidden
matrices with AdamW for everything else (`--optimizer muon`).

Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks"), for a weight matrix
W [out, in] with gradient G, momentum μ, learning rate η and weight decay λ:

    B ← μ·B + G,   U = G + μ·B (Nesterov),   O = NS₅(U / ‖U‖_F),
    W ← W·(1 − η·λ) − η · 0.2·sqrt(max(out, in)) · O

NS₅ is five steps of the quintic Newton–Schulz iteration X ← aX + (bXXᵀ + c(XXᵀ)²)X with (a, b, c) =
(3.4445, −4.7750, 2.0315). It keeps U's singular vectors and moves its singular values towards 1 (into about
[0.7, 1.2] for a Gaussian matrix, tested; values far below the largest stay smaller): O ≈ the orthogonal factor
of U. The factor 0.2·sqrt(max(out, in)) (Liu et al. 2025, "Muon is Scalable for LLM Training") gives the update
the RMS of an AdamW update, so the same peak LR, schedule and weight decay serve both parts. Muon takes the
2-D weights inside the decoder layers; the embeddings, the LM head, norm gains and biases stay with AdamW
(as both papers do). The iteration runs in float32 (a CPU's bfloat16 matmuls are slow), in bfloat16 on CUDA as
Jordan's.

Muon needs each matrix whole, so it does not run under FSDP (sharded parameters); DDP and one device are fine.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim.adamw import adamw

OPTIMIZERS = ("adamw", "muon")
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)
NEWTON_SCHULZ_STEPS = 5
MUON_MOMENTUM = 0.95
MUON_RMS_SCALE = 0.2  # Liu et al. 2025: matches the RMS of an AdamW update


def newton_schulz(update: torch.Tensor, steps: int = NEWTON_SCHULZ_STEPS, eps: float = 1e-7) -> torch.Tensor:
    """NS₅(U / ‖U‖_F) (module docstring) for a matrix U [out, in]; float32, bfloat16 on CUDA; same shape back."""
    a, b, c = NEWTON_SCHULZ
    x = update.to(torch.bfloat16 if update.is_cuda else torch.float32)
    wide = x.shape[0] <= x.shape[1]
    x = x if wide else x.T  # iterate on the side with fewer rows: X Xᵀ is the smaller Gram matrix
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x if wide else x.T).to(update.dtype)


class MuonAdamW(torch.optim.Optimizer):
    """Muon for the param groups with `use_muon=True`, PyTorch's AdamW step for the others; one optimizer, so
    one LR schedule and one state dict. Every group takes `lr` and `weight_decay`; Muon groups `momentum`,
    AdamW groups `betas` and `eps`."""

    def __init__(
        self,
        params,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = MUON_MOMENTUM,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "use_muon": False,
        }
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["use_muon"] and any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon updates matrices only; give other parameters to an AdamW group")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            parameters = [parameter for parameter in group["params"] if parameter.grad is not None]
            if group["use_muon"]:
                for parameter in parameters:
                    self._muon_update(parameter, self.state[parameter], group)
            else:
                self._adamw_step(parameters, group)
        return loss

    @staticmethod
    def _muon_update(parameter: torch.Tensor, state: dict, group: dict) -> None:
        grad, momentum, lr = parameter.grad, group["momentum"], group["lr"]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(parameter)
        buffer = state["momentum_buffer"].mul_(momentum).add_(grad)  # B ← μB + G
        orthogonal = newton_schulz(grad.add(buffer, alpha=momentum))  # NS₅(G + μB)
        parameter.mul_(1 - lr * group["weight_decay"])
        parameter.add_(orthogonal, alpha=-lr * MUON_RMS_SCALE * math.sqrt(max(parameter.shape)))

    def _adamw_step(self, parameters: list[torch.Tensor], group: dict) -> None:
        """PyTorch's own AdamW step (`torch.optim.adamw.adamw`, what `torch.optim.AdamW` runs) for a group."""
        for parameter in parameters:
            if not self.state[parameter]:
                self.state[parameter].update(
                    step=torch.tensor(0.0), exp_avg=torch.zeros_like(parameter), exp_avg_sq=torch.zeros_like(parameter)
                )
        states = [self.state[parameter] for parameter in parameters]
        beta1, beta2 = group["betas"]
        adamw(
            parameters,
            [parameter.grad for parameter in parameters],
            [state["exp_avg"] for state in states],
            [state["exp_avg_sq"] for state in states],
            [],
            [state["step"] for state in states],
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )


def build_optimizer(model: torch.nn.Module, settings) -> torch.optim.Optimizer:
    """The run's optimizer (`settings.optimizer`) with its peak LR, betas, eps and weight decay. Weight decay
    applies to matrices and embeddings, not to biases and norm gains; the schedule scales every group's LR.
    `muon`: the 2-D weights of the decoder layers in a Muon group (module docstring)."""
    hidden, decay, no_decay = [], [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if settings.optimizer == "muon" and parameter.dim() == 2 and name.startswith("model.layers."):
            hidden.append(parameter)
        else:
            (decay if parameter.dim() >= 2 else no_decay).append(parameter)
    groups: list[dict[str, Any]] = [
        {"params": decay, "weight_decay": settings.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    betas = (settings.beta1, settings.beta2)
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=settings.lr, betas=betas, eps=settings.eps)
    groups.insert(0, {"params": hidden, "weight_decay": settings.weight_decay, "use_muon": True})
    return MuonAdamW(groups, lr=settings.lr, betas=betas, eps=settings.eps)
