"""
The optimizer pretrain.py uses: Muon for the 2-D weight matrices inside the blocks (attention and
feed-forward), AdamW for everything else (the tied embedding/classifier and the norm gains), in one
torch.optim.Optimizer so that the LR schedule, gradient clipping, AMP and checkpoints treat it like AdamW.

Muon (Jordan et al. 2024; Liu et al. 2025, "Muon is Scalable for LLM Training") takes the momentum of a
weight's gradient and replaces it by the nearest semi-orthogonal matrix, so every direction of the
update moves by the same amount instead of the few largest directions dominating. On the demo it
reaches a given val loss in far fewer iterations than AdamW for a little more time per step
(docs/experiments.md, docs/benchmarks.md).
"""
import math

import torch


def orthogonalize(G, steps=5):
    """
    About U V^T for G = U S V^T: a quintic Newton-Schulz iteration whose coefficients trade exactness for
    speed (all but the tiniest singular values land within roughly 0.7..1.2, which works as well as exact).
    In fp32: torch.optim.Muon iterates in bf16, which most CPUs have no fast matmul for
    (an order of magnitude slower on this project's CPU: docs/benchmarks.md).
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G / (G.norm() + 1e-7)  # singular values <= 1, where the iteration converges
    tall = G.size(0) > G.size(1)
    if tall:
        X = X.mT  # iterate on the smaller Gram matrix X X^T
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if tall else X


class MuonAdamW(torch.optim.Optimizer):
    """
    Parameter groups with "muon": True take Muon steps (Nesterov momentum, orthogonalized), the others
    AdamW steps. Both read the group's "lr", so one schedule drives both: a Muon update is scaled by
    0.2 * sqrt(max(rows, cols)), which gives it the RMS of a typical AdamW update (Liu et al.), so the
    learning rate and weight decay tuned for AdamW carry over. Weight decay is decoupled in both.
    """

    def __init__(self, param_groups, lr, betas=(0.9, 0.95), momentum=0.95, eps=1e-8):
        defaults = dict(lr=lr, betas=betas, momentum=momentum, eps=eps, weight_decay=0.0, muon=False)
        super().__init__(param_groups, defaults)
        for group in self.param_groups:
            if group["muon"] and any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon groups take 2-D weight matrices only")

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, weight_decay = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad, state = p.grad, self.state[p]
                p.mul_(1 - lr * weight_decay)
                if group["muon"]:
                    if not state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    buf = state["momentum_buffer"]
                    buf.mul_(group["momentum"]).add_(grad)
                    update = orthogonalize(grad.add(buf, alpha=group["momentum"]))  # Nesterov: look one step ahead
                    p.add_(update, alpha=-lr * 0.2 * math.sqrt(max(p.shape)))
                else:
                    if not state:
                        state["step"] = 0
                        state["exp_avg"] = torch.zeros_like(p)
                        state["exp_avg_sq"] = torch.zeros_like(p)
                    beta1, beta2 = group["betas"]
                    state["step"] += 1
                    state["exp_avg"].lerp_(grad, 1 - beta1)
                    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    denom = (state["exp_avg_sq"] / (1 - beta2 ** state["step"])).sqrt_().add_(group["eps"])
                    p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1 ** state["step"]))
