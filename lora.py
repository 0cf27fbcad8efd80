"""
LoRA for every fine-tuning stage (sft.py, dpo.py, grpo.py; pretrain.py for continued pretraining): a frozen
Linear plus a trainable low-rank update, W x + (alpha / r) * B A x.
B starts at zero, so training starts exactly from the base model. The frozen weights can be stored
in bf16/fp16 or int8 (FrozenLinear): they take no gradient and no optimizer state, so their storage
is all they cost. Checkpoints store what was trained and where the base is; loading one merges the
adapters into the base again (a plain Transformer that sample.py and export.py use unchanged).
"""
import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class FrozenLinear(nn.Module):
    """
    A Linear layer that is never trained, its weight stored compactly: in "float32", "bfloat16" or
    "float16", or "int8", each output row as int8 times one fp32 scale (its largest magnitude / 127;
    the rounding error is at most half a step per weight). The forward pass computes in the input's
    dtype, or autocast's where autocast is on, dequantizing one layer at a time.
    """

    def __init__(self, linear: nn.Linear, storage="float32"):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        if storage == "int8":  # one fp32 copy of the layer at a time, worked on in place
            w = w.to(torch.float32, copy=True)
            low, high = w.aminmax(dim=1, keepdim=True)
            scale = (torch.maximum(high, -low) / 127).clamp(min=1e-12)   # (out, 1)
            self.weight = nn.Parameter(w.div_(scale).round_().to(torch.int8), requires_grad=False)
            self.scale = nn.Parameter(scale, requires_grad=False)
        else:
            self.weight = nn.Parameter(w.to(getattr(torch, storage)), requires_grad=False)
            self.scale = None

    def dequantized(self, dtype=torch.float32):
        return dequantize(self.weight, self.scale, dtype)

    def forward(self, x):
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        return FrozenMatmul.apply(x.to(dtype), self.weight, self.scale)


def dequantize(weight, scale, dtype):
    w = weight.to(dtype)
    return w * scale.to(dtype) if scale is not None else w


class FrozenMatmul(torch.autograd.Function):
    """
    x W^T for a frozen, compactly stored W. Autograd would keep the dequantized copy of W for the
    backward pass, one per layer, all alive at once: as much memory as an fp32 (or bf16) base. This
    keeps the stored weight and dequantizes it again in the backward pass, one layer at a time.
    """

    @staticmethod
    def forward(ctx, x, weight, scale):
        ctx.save_for_backward(weight, scale)
        return F.linear(x, dequantize(weight, scale, x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        weight, scale = ctx.saved_tensors
        return grad_out @ dequantize(weight, scale, grad_out.dtype), None, None


class LoRALinear(nn.Module):
    def __init__(self, base: FrozenLinear, rank, alpha, dropout):
        super().__init__()
        self.base = base
        device = base.weight.device  # the adapters in fp32, whatever the base is stored in
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.enabled = True  # off: the frozen base alone (DPO's reference model, without a second copy)

    def forward(self, x):
        if not self.enabled:
            return self.base(x)
        return self.base(x) + (self.dropout(x) @ self.lora_a.t() @ self.lora_b.t()) * self.scale


def add_lora(model, targets, rank, alpha, dropout, base_dtype="float32"):
    """
    Freeze every weight of model, store the blocks' Linear layers as FrozenLinear(base_dtype), and give
    those named in targets (e.g. {"wq", "w2"}) adapters. The embedding, classifier and norms stay as
    they are (fp32): they are a small share of a large model, and the embedding may be trained.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = 0
    # the parents, not the Linear layers themselves: each original weight is freed as soon as its FrozenLinear
    # replaces it, so that an int8 base never has all of its source weights and all of its int8 ones at once
    parents = [m for m in model.layers.modules() if any(isinstance(c, nn.Linear) for c in m.children())]
    for module in parents:
        for name in [name for name, child in module.named_children() if isinstance(child, nn.Linear)]:
            frozen = FrozenLinear(getattr(module, name), base_dtype)
            setattr(module, name, LoRALinear(frozen, rank, alpha, dropout) if name in targets else frozen)
            wrapped += name in targets
    if not wrapped:
        raise SystemExit(f"error: lora_targets {sorted(targets)} name no Linear layer "
                         f"(choose from wq, wk, wv, wo, w1, w2, w3)")
    return model


def merged_state_dict(model, state=None):
    """The plain Transformer's state dict in fp32, every adapter folded into the weight it adapts. state:
    the model's full state dict where the model itself holds only shards (FSDP); else model.state_dict()."""
    state = model.state_dict() if state is None else state
    modules = dict(model.named_modules())
    merged = {}
    for key, value in state.items():
        name, _, leaf = key.rpartition(".")
        module = modules.get(name)
        if isinstance(module, LoRALinear) or isinstance(module, FrozenLinear) and leaf == "scale":
            continue  # the adapters, and int8 scales: folded into the weight below
        if isinstance(module, FrozenLinear):
            scale = state.get(name + ".scale")
            value = value.float() * scale.float() if scale is not None else value.float()
            owner = modules.get(name.rpartition(".")[0])
            if isinstance(owner, LoRALinear) and name.endswith(".base"):
                name = name[:-len(".base")]
                value = value + owner.scale * (state[name + ".lora_b"].float() @ state[name + ".lora_a"].float())
                key = name + ".weight"
            value = value.detach().clone()
        merged[key] = value
    return merged


def trainable_state_dict(model, state=None):
    """What a LoRA run trained: the adapters, and any weight trained in full beside them (new embedding rows).
    state: the model's full state dict where the model itself holds only shards (FSDP)."""
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in (model.state_dict() if state is None else state).items() if k in trained}


def base_storage(model):
    """How the model's frozen Linear weights are stored: "int8", "bfloat16", "float16" or "float32"."""
    frozen = next(m for m in model.modules() if isinstance(m, FrozenLinear))
    return "int8" if frozen.scale is not None else str(frozen.weight.dtype).removeprefix("torch.")


def has_adapters(model):
    return any(isinstance(m, LoRALinear) for m in model.modules())


@contextlib.contextmanager
def adapters_disabled(model):
    """Within the block, every LoRA layer computes its frozen base alone: the model it started from."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m in layers:
            m.enabled = True
