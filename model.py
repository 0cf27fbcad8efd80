"""
The one Llama 2 Transformer every stage shares, computed exactly as llama2.c's run.c computes it:
RMSNorm (eps 1e-5), rotary embeddings (theta 10000, rotating interleaved pairs (x0, x1), (x2, x3), ...;
imported models may bring another eps and theta),
grouped-query attention, a SwiGLU feed-forward (w2(silu(w1 x) * w3 x)), no biases, and input and
output embeddings tied by default. Attention is F.scaled_dot_product_attention (flash kernels on GPU).
"""
import math
import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from muon import MuonAdamW


@dataclass
class ModelArgs:
    dim: int = 288
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: Optional[int] = None  # None: same as n_heads (no grouping)
    vocab_size: int = 8192            # always taken from the tokenizer the data was prepared with
    hidden_dim: Optional[int] = None  # None: 2/3 of 4*dim rounded up to multiple_of, as Llama 2 does
    multiple_of: int = 32
    norm_eps: float = 1e-5            # run.c hard-codes 1e-5
    rope_theta: float = 10000.0       # and 10000; imported models may differ (export.py then refuses run.c)
    max_seq_len: int = 512
    dropout: float = 0.0
    tie_embeddings: bool = True


# The size table our users know from the Chinese tiny-LLM projects. The names count parameters with
# the 64793-id ChatGLM vocabulary; with our 8192-id demo tokenizer the same shapes are much smaller.
PRESETS = {
    # sized for a 2-core CPU: in 10 minutes the loss is limited by tokens seen, so small and fast wins
    "demo": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=256),
    "9m": dict(dim=64, n_layers=5, n_heads=8, n_kv_heads=4, max_seq_len=512),
    "24m": dict(dim=288, n_layers=6, n_heads=6, n_kv_heads=6, max_seq_len=512),
    "58m": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=8, max_seq_len=512),
    "134m": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, max_seq_len=512),
    "256m": dict(dim=1024, n_layers=16, n_heads=16, n_kv_heads=16, max_seq_len=1024),
}


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()  # the mean of squares in fp32, also under bf16 autocast
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_tables(head_dim, max_seq_len, theta=10000.0):
    """cos and sin of position * frequency, each (max_seq_len, head_dim // 2)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(max_seq_len).float(), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate interleaved pairs (x[2i], x[2i+1]) by position-dependent angles. x: (B, T, H, hd);
    cos, sin: (T, hd/2), or (B, T, hd/2) when each row has its own positions (packed conversations)."""
    pairs = x.float().unflatten(-1, (-1, 2))            # (B, T, H, hd/2, 2)
    x0, x1 = pairs.unbind(-1)                           # each (B, T, H, hd/2)
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]                 # (1, T, hd/2)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]   # (B or 1, T, 1, hd/2)
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)                   # (B, T, H, hd)


class Attention(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads or args.n_heads
        assert args.n_heads % self.n_kv_heads == 0, "n_heads must be a multiple of n_kv_heads"
        assert args.dim % args.n_heads == 0, "dim must be a multiple of n_heads"
        self.head_dim = args.dim // args.n_heads
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.dropout = args.dropout
        self.resid_dropout = nn.Dropout(args.dropout)

    def forward(self, x, cos, sin, cache=None, start_pos=0, attn_mask=None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None and torch.is_tensor(start_pos):
            # batched decoding (engine.py): one token per row, each row at its own position (B,); attn_mask
            # (B, 1, 1, S) says which of the first S cached positions each row sees
            k_cache, v_cache = cache                       # each (rows, max_seq_len, n_kv_heads, hd)
            rows = torch.arange(B, device=x.device)
            k_cache[rows, start_pos], v_cache[rows, start_pos] = k[:, 0], v[:, 0]
            k, v = k_cache[:B, :attn_mask.shape[-1]], v_cache[:B, :attn_mask.shape[-1]]
        elif cache is not None:
            # write this step's keys and values, attend over everything up to it
            k_cache, v_cache = cache                       # each (B, max_seq_len, n_kv_heads, hd)
            k_cache[:B, start_pos:start_pos + T] = k
            v_cache[:B, start_pos:start_pos + T] = v
            k, v = k_cache[:B, :start_pos + T], v_cache[:B, :start_pos + T]
        if self.n_kv_heads != self.n_heads:                # GQA: each kv head serves n_heads/n_kv_heads queries
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=2)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T or S, hd)
        mask, causal = None, T > 1
        if attn_mask is not None:                          # (B, 1, T, T), True where attention is allowed
            mask, causal = attn_mask, False
        elif cache is not None and start_pos > 0 and T > 1:
            # a chunk after a cached prefix: row i sees the prefix and the chunk up to i
            mask = torch.ones(T, start_pos + T, dtype=torch.bool, device=x.device).tril(diagonal=start_pos)
            causal = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, -1)            # (B, T, dim)
        return self.resid_dropout(self.wo(y))


class FeedForward(nn.Module):
    def __init__(self, args):
        super().__init__()
        hidden = args.hidden_dim
        if hidden is None:
            hidden = int(2 * 4 * args.dim / 3)
            hidden = args.multiple_of * ((hidden + args.multiple_of - 1) // args.multiple_of)
        self.w1 = nn.Linear(args.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, hidden, bias=False)
        self.dropout = nn.Dropout(args.dropout)

    def forward(self, x):
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class Block(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x, cos, sin, cache=None, start_pos=0, attn_mask=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, cache, start_pos, attn_mask)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.dropout = nn.Dropout(args.dropout)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.init_rope()
        # training keeps only each block's input and recomputes the block in the backward pass: activation
        # memory of one block instead of all, for a third more compute (set by the training scripts)
        self.checkpoint_activations = False
        self.apply(self._init_weights)
        # residual projections get a smaller init so the residual stream's variance does not grow with depth
        for name, p in self.named_parameters():
            if name.endswith("wo.weight") or name.endswith("w2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * args.n_layers))

    def zero_output_projections(self):
        """Zero each block's output projections (wo, w2): every block starts as the identity on the residual
        stream and learns what to add (modded-nanogpt's and nanochat's init; docs/experiments.md)."""
        with torch.no_grad():
            for layer in self.layers:
                layer.attention.wo.weight.zero_()
                layer.feed_forward.w2.weight.zero_()

    def init_rope(self, device=None):
        """The rotary tables (not saved: a function of the args), computed in fp32 on the CPU or device."""
        cos, sin = rope_tables(self.args.dim // self.args.n_heads, self.args.max_seq_len, self.args.rope_theta)
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)

    def resize_vocab(self, vocab_size, generator=None, unk_id=0):
        """
        Grow the embedding (and an untied classifier) to vocab_size rows for an extended tokenizer; the old rows
        stay as they are. A new embedding row is the mean of the old rows plus noise with their per-dimension
        spread: a new token reads as an average token. A new classifier row is a copy of <unk>'s (unk_id), which
        byte-fallback text never contains, so training pushed its logit down everywhere: each new id starts exactly
        as likely as <unk>, and together they take a small share of the next-token distribution until they are
        trained (a mean row took 19x more on the demo model; docs/experiments.md). Tied embeddings have one matrix:
        its new rows are the classifier's. Returns the number of rows added.
        """
        old = self.tok_embeddings.weight.shape[0]
        if vocab_size <= old:
            return 0

        def grown(weight, like_unk):
            w = weight.detach().float()
            if like_unk:
                new = w[unk_id].expand(vocab_size - old, -1)
            else:
                new = w.mean(0) + w.std(0) * torch.randn(vocab_size - old, w.shape[1], generator=generator)
            return nn.Parameter(torch.cat([weight.detach(), new.to(weight.dtype)]))

        tied = self.args.tie_embeddings
        self.tok_embeddings.weight = grown(self.tok_embeddings.weight, like_unk=tied)
        self.output.weight = self.tok_embeddings.weight if tied else grown(self.output.weight, like_unk=True)
        self.tok_embeddings.num_embeddings = self.output.out_features = vocab_size
        self.args.vocab_size = vocab_size
        return vocab_size - old

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, trained=False):
        """Parameters (a tied weight once), or only those trained (requires_grad)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trained)

    def forward(self, tokens, targets=None, cache=None, start_pos=0, positions=None, attn_mask=None,
                reduction="mean"):
        """
        tokens (B, T). Without targets: (the logits of the last position (B, 1, V), None), what decoding wants. With
        targets (B, T), -1 where nothing is predicted: (logits (B, T, V), the mean cross-entropy over the predicted
        positions); the logits are None where the loss was computed without them all (see mean_loss).
        reduction="none": (None, each position's cross-entropy (B, T), 0 where the target is -1). The stages' heads
        (answer_loss, answer_logprobs below) mask targets and call this. Several conversations packed into one row:
        positions (B, T) restarts at 0 for each, and attn_mask (B, 1, T, T) lets a token see only earlier tokens of
        its own conversation. Decoding with a cache: start_pos is where tokens go in it; a (B,) tensor puts each
        row's one token at its own position, with attn_mask (B, 1, 1, S) over the cache (engine.py).
        """
        B, T = tokens.shape
        h = self.dropout(self.tok_embeddings(tokens))
        if positions is None and torch.is_tensor(start_pos):
            positions = start_pos[:, None]                                 # (B, 1): a position per row
        if positions is not None:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (B, T, hd/2)
        else:
            cos = self.rope_cos[start_pos:start_pos + T]
            sin = self.rope_sin[start_pos:start_pos + T]
        for i, layer in enumerate(self.layers):
            if self.checkpoint_activations and self.training and torch.is_grad_enabled():
                # the recomputation replays the same dropout masks (the RNG state is saved with the input)
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, None, start_pos, attn_mask,
                                                      use_reentrant=False)
            else:
                h = layer(h, cos, sin, cache[i] if cache is not None else None, start_pos, attn_mask)
        h = self.norm(h)
        if targets is None:
            return self.output(h[:, [-1], :]), None
        if reduction == "none":  # the classifier only where a target is: (N, V) log-probs, N predicted positions
            keep = targets >= 0
            logps = F.log_softmax(self.output(h[keep]).float(), dim=-1)
            nll = torch.zeros(B, T, dtype=logps.dtype, device=h.device)
            nll[keep] = -logps.gather(-1, targets[keep][:, None])[:, 0]
            return None, nll
        return self.mean_loss(h, targets)

    def mean_loss(self, h, targets):
        """
        (logits or None, the mean cross-entropy of the classifier on h (B, T, dim) over targets that are not -1).
        In eager mode on a CPU, where some targets are -1 (SFT trains only the answers, a small share of the
        demo's tokens), the classifier runs on the predicted positions alone: in a small model with a large
        vocabulary that matmul is a large part of the step (docs/benchmarks.md). Compiled code would recompile
        for every new count, and on a GPU the count is a device sync: static shapes there. Rows x vocabulary
        above CHUNKED_LOSS_ABOVE go a chunk at a time (chunked_cross_entropy).
        """
        B, T, _ = h.shape
        V = self.output.out_features
        sparse = h.device.type == "cpu" and not torch.compiler.is_compiling() and bool((targets < 0).any())
        if not sparse and B * T * V <= CHUNKED_LOSS_ABOVE:  # pretraining
            logits = self.output(h)
            return logits, F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)
        h, targets = h.flatten(0, 1), targets.flatten()                     # (B*T, dim), (B*T,)
        if sparse:
            keep = targets >= 0
            h, targets = h[keep], targets[keep]                             # (N, dim), (N,)
        if h.shape[0] * V > CHUNKED_LOSS_ABOVE:
            return None, chunked_cross_entropy(h, self.output.weight, targets)
        logits = self.output(h)
        losses = F.cross_entropy(logits.float(), targets, ignore_index=-1, reduction="none")
        loss = losses.sum() / (targets >= 0).sum().clamp(min=1)
        return (None if sparse else logits.view(B, T, -1)), loss

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, muon=True, shard=False,
                             embedding_lr_scale=1.0):
        """
        muon: Muon for the blocks' matrices, AdamW for the embedding (its group's "lr_scale": embedding_lr_scale)
        and norms (muon.py); else AdamW for all. Norm gains are never decayed. shard: under DDP each process
        orthogonalizes its share of Muon's matrices (on GPUs in bf16, batched by shape).
        """
        params = [p for p in self.parameters() if p.requires_grad]
        if muon:
            matrices = {id(p) for p in self.layers.parameters() if p.dim() == 2}
            groups = [
                {"params": [p for p in params if id(p) in matrices], "weight_decay": weight_decay, "muon": True},
                {"params": [p for p in params if p.dim() >= 2 and id(p) not in matrices], "weight_decay": weight_decay,
                 "lr_scale": embedding_lr_scale},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
            ]
            on_gpu = device_type == "cuda"
            return MuonAdamW(groups, lr=learning_rate, betas=betas, batched=on_gpu, shard=shard,
                             ns_dtype=torch.bfloat16 if on_gpu else torch.float32)
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},  # matmuls and embeddings
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},            # norms
        ]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == "cuda")

    def flops_per_token(self, block_size):
        """Training FLOPs per token: 6 per trained parameter, 4 per frozen one (no weight gradient), plus attention's
        12 * L * T * dim; not recomputation (activation checkpointing): MFU counts the model's FLOPs."""
        a = self.args
        trained = self.num_params(trained=True)
        frozen = self.num_params() - trained
        if not a.tie_embeddings:  # the embedding lookup does no FLOPs; the classifier matmul does
            lookup = a.vocab_size * a.dim
            trained, frozen = (trained - lookup, frozen) if self.tok_embeddings.weight.requires_grad else \
                (trained, frozen - lookup)
        return 6 * trained + 4 * frozen + 12 * a.n_layers * block_size * a.dim


# The stages' heads: a batch is a dict of tokens, targets and loss_mask (1 on the answer's tokens), and for
# packed rows positions and attn_mask. They call the model itself (not a method of it), so that a DDP or FSDP
# wrapper sees the forward pass.

def answer_loss(model, batch):
    """SFT's loss: the mean cross-entropy over the answers' tokens (loss_mask 1) alone."""
    targets = batch["targets"].masked_fill(batch["loss_mask"] == 0, -1)
    return model(batch["tokens"], targets, positions=batch.get("positions"), attn_mask=batch.get("attn_mask"))[1]


def answer_logprobs(model, batch):
    """The log-probability of each answer token, (B, T), 0 off the answer: what DPO sums and GRPO weighs."""
    targets = batch["targets"].masked_fill(batch["loss_mask"] == 0, -1)
    return -model(batch["tokens"], targets, reduction="none")[1]


# logits of more rows x vocabulary entries than this are never all in memory at once (2**27 fp32 values
# are 512 MB): the demo's batches stay below it, the GPU configs' 32 x 512 rows x 64k ids are far above
CHUNKED_LOSS_ABOVE = 1 << 27


def chunked_cross_entropy(h, weight, targets, chunk_rows=None):
    """
    F.cross_entropy(h @ weight.T, targets, ignore_index=-1) for h (N, dim), weight (V, dim), a chunk of rows at a
    time: the (rows, V) logits, softmax and gradient exist for one chunk only. The gradients are computed in the
    forward pass (the loss is a scalar: backward only scales them), so there is no second classifier matmul.
    """
    chunk_rows = chunk_rows or max(1, CHUNKED_LOSS_ABOVE // 4 // weight.shape[0])
    return _ChunkedCrossEntropy.apply(h, weight, targets, chunk_rows)


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk_rows):
        weights = (targets >= 0).float() / (targets >= 0).sum().clamp(min=1)  # the mean's weights
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.zeros_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if ctx.needs_input_grad[1] else None
        for start in range(0, h.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            logits = (h[rows] @ weight.t()).float()                        # (chunk, V), the only big tensor
            t = targets[rows].clamp(min=0)
            lse = torch.logsumexp(logits, dim=-1)
            loss = loss + ((lse - logits.gather(1, t[:, None])[:, 0]) * weights[rows]).sum()
            if grad_h is None and grad_w is None:
                continue
            d_logits = logits.sub_(lse[:, None]).exp_()                      # softmax, in the logits' memory
            d_logits[torch.arange(len(t), device=t.device), t] -= 1.0     # softmax - one-hot
            d_logits *= weights[rows, None]
            if grad_h is not None:
                grad_h[rows] = (d_logits @ weight.float()).to(h.dtype)
            if grad_w is not None:
                grad_w += d_logits.t() @ h[rows].float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_loss if grad_h is not None else None,
                (grad_w * grad_loss).to(ctx.weight_dtype) if grad_w is not None else None, None, None)


# Dense 16-bit tensor-core peak FLOP/s (bf16, or fp16 where a card has no bf16) by the name
# torch.cuda.get_device_name() reports, for MFU. Matched as whole words, most specific first, so
# "L4" is not "L40" and "A10" is not "A100". Vendor datasheet figures without sparsity.
GPU_PEAK_FLOPS = [
    (r"H100 NVL", 835e12), (r"H100 PCIe", 756e12), (r"H100", 989e12), (r"H200", 989e12), (r"H800 PCIe", 756e12),
    (r"H800", 989e12), (r"H20", 148e12), (r"B200", 2250e12), (r"A100", 312e12), (r"A800", 312e12),
    (r"L40S", 362e12), (r"L40", 181e12), (r"L20", 119.5e12), (r"L4", 121e12), (r"A10G", 70e12), (r"A10", 125e12),
    (r"RTX 4090", 165e12), (r"RTX 3090", 71e12), (r"V100", 125e12), (r"T4", 65e12), (r"P100", 21e12),
]


def peak_flops(device_name):
    """The GPU's 16-bit tensor-core peak FLOP/s, or None for a card not in GPU_PEAK_FLOPS (no MFU then)."""
    return next((peak for pattern, peak in GPU_PEAK_FLOPS if re.search(rf"\b{pattern}\b", device_name)), None)
