"""Batch Manhattan (Liao, Leibo & Poggio 2016): SGD on the sign of each gradient entry.

Only the sign of the batch gradient survives, so an error signal that is too large or too small
(the scale obstacle of asymmetric feedback) no longer sets the step size. The sign is taken
before weight decay and momentum, as in the original.
"""
from __future__ import annotations

import torch
from torch.optim import Optimizer


class BatchManhattan(Optimizer):
    """p <- p - lr * v,  v <- momentum * v + (sign(grad) + weight_decay * p)."""

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        if lr <= 0:
            raise ValueError(f"BatchManhattan lr must be > 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"BatchManhattan momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"BatchManhattan weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                update = torch.sign(param.grad)
                if weight_decay:
                    update.add_(param, alpha=weight_decay)
                if momentum:
                    state = self.state[param]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = update.clone()
                    else:
                        state["momentum_buffer"].mul_(momentum).add_(update)
                    update = state["momentum_buffer"]
                param.add_(update, alpha=-lr)
        return loss
