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
import torch.distributed as dist


def orthogonalize(G, steps=5, dtype=torch.float32):
    """
    About U V^T for G = U S V^T: a quintic Newton-Schulz iteration whose coefficients trade exactness for
    speed (all but the tiniest singular values land within roughly 0.7..1.2, which works as well as exact).
    G is one matrix (rows, cols) or a stack of same-shaped ones (n, rows, cols), done in one batched
    matmul each step. dtype: fp32 on CPUs, which have no fast bf16 matmul (torch.optim.Muon's bf16 is
    an order of magnitude slower on this project's CPU: docs/benchmarks.md); bf16 on GPUs.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(dtype)
    norm = X.norm() if X.dim() == 2 else X.norm(dim=(-2, -1), keepdim=True)
    X = X / (norm + 1e-7)  # singular values <= 1, where the iteration converges
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT  # iterate on the smaller Gram matrix X X^T
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return (X.mT if tall else X).to(G.dtype)


def muon_momentum(it, warmup_iters, start=0.85, end=0.95):
    """Muon's momentum at iteration it: rising linearly from start to end over warmup_iters (0: end throughout)."""
    return start + (end - start) * min(1.0, it / warmup_iters) if warmup_iters else end


class MuonAdamW(torch.optim.Optimizer):
    """
    Parameter groups with "muon": True take Muon steps (Nesterov momentum, orthogonalized), the others
    AdamW steps. Both read the group's "lr", so one schedule drives both: a Muon update is scaled by
    0.2 * sqrt(max(rows, cols)), which gives it the RMS of a typical AdamW update (Liu et al.), so the
    learning rate and weight decay tuned for AdamW carry over. Weight decay is decoupled in both.

    On GPUs (ns_dtype bf16, batched) the matrices of one shape are orthogonalized together; under DDP
    (shard=True) every process, holding the same averaged gradients, orthogonalizes only its share of
    each shape's matrices and the updates are all-gathered, instead of every process doing all of them
    (the distributed Muon of Moonlight and nanochat). Either way each matrix gets the same update.
    """

    def __init__(self, param_groups, lr, betas=(0.9, 0.95), momentum=0.95, eps=1e-8, ns_dtype=torch.float32,
                 batched=False, shard=False):
        defaults = dict(lr=lr, betas=betas, momentum=momentum, eps=eps, weight_decay=0.0, muon=False)
        super().__init__(param_groups, defaults)
        self.ns_dtype, self.batched = ns_dtype, batched
        self.shard = shard and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        for group in self.param_groups:
            if group["muon"] and any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon groups take 2-D weight matrices only")

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, weight_decay = group["lr"], group["weight_decay"]
            if group["muon"]:
                self._muon_step(group, lr, weight_decay)
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad, state = p.grad, self.state[p]
                p.mul_(1 - lr * weight_decay)
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

    def _muon_step(self, group, lr, weight_decay):
        params = [p for p in group["params"] if p.grad is not None]
        inputs = []
        for p in params:
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.mul_(group["momentum"]).add_(p.grad)
            inputs.append(p.grad.add(buf, alpha=group["momentum"]))  # Nesterov: look one step ahead
        updates = self._orthogonalize_all(inputs)
        for p, update in zip(params, updates):
            p.mul_(1 - lr * weight_decay)
            p.add_(update, alpha=-lr * 0.2 * math.sqrt(max(p.shape)))

    def _orthogonalize_all(self, inputs):
        """orthogonalize() of every matrix: one by one, or batched by shape, or each process its share."""
        if not self.shard and not self.batched:
            return [orthogonalize(g, dtype=self.ns_dtype) for g in inputs]
        updates = [None] * len(inputs)
        by_shape = {}
        for i, g in enumerate(inputs):
            by_shape.setdefault(tuple(g.shape), []).append(i)
        rank, world = (dist.get_rank(), dist.get_world_size()) if self.shard else (0, 1)
        for shape, indices in by_shape.items():
            per_rank = -(-len(indices) // world)  # this shape's matrices each process orthogonalizes
            mine = indices[rank * per_rank:(rank + 1) * per_rank]
            if self.batched:
                done = orthogonalize(torch.stack([inputs[i] for i in mine]), dtype=self.ns_dtype) if mine else None
            else:
                done = torch.stack([orthogonalize(inputs[i], dtype=self.ns_dtype) for i in mine]) if mine else None
            if self.shard:
                local = inputs[0].new_zeros(per_rank, *shape)  # padded: all_gather needs equal sizes
                if done is not None:
                    local[:len(mine)] = done
                gathered = [torch.empty_like(local) for _ in range(world)]
                dist.all_gather(gathered, local)
                done = torch.cat(gathered)[:len(indices)]
            for i, update in zip(indices, done):
                updates[i] = update
        return updates
