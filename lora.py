"""
LoRA for sft.py: a frozen nn.Linear plus a trainable low-rank update, W x + (alpha / r) * B A x.
B starts at zero, so training starts exactly from the base model. Checkpoints store merged weights
(a plain Transformer that sample.py and export.py load unchanged) and the adapters on their own.
"""
import contextlib
import math

import torch.nn as nn


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank, alpha, dropout):
        super().__init__()
        self.base = base
        self.lora_a = nn.Parameter(base.weight.new_empty(rank, base.in_features))
        self.lora_b = nn.Parameter(base.weight.new_zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.enabled = True  # off: the frozen base alone (DPO's reference model, without a second copy)

    def forward(self, x):
        if not self.enabled:
            return self.base(x)
        return self.base(x) + (self.dropout(x) @ self.lora_a.t() @ self.lora_b.t()) * self.scale

    def merged_weight(self):
        return self.base.weight + self.scale * (self.lora_b @ self.lora_a)


def add_lora(model, targets, rank, alpha, dropout):
    """Freeze every weight of model and wrap the Linear layers named in targets (e.g. {"wq", "w2"})."""
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and name in targets:
                setattr(module, name, LoRALinear(child, rank, alpha, dropout))
                wrapped += 1
    if not wrapped:
        raise SystemExit(f"error: lora_targets {sorted(targets)} name no Linear layer "
                         f"(choose from wq, wk, wv, wo, w1, w2, w3)")
    return model


def merged_state_dict(model):
    """The plain Transformer's state dict, every adapter folded into the weight it adapts."""
    adapters = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    merged = {}
    for key, value in model.state_dict().items():
        if key.endswith((".lora_a", ".lora_b")):
            continue
        if key.endswith(".base.weight"):
            name = key[:-len(".base.weight")]
            merged[name + ".weight"] = adapters[name].merged_weight().detach().clone()
        else:
            merged[key] = value
    return merged


def trainable_state_dict(model):
    """What a LoRA run trained: the adapters, and any weight trained in full beside them (new embedding rows)."""
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in trained}


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
