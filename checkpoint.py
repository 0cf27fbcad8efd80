"""
Checkpoints: how every stage saves and loads a model. A checkpoint directory holds ckpt.pt (model
weights, model args, optimizer and loop state, the config, the tokenizer's hash, the stage that
wrote it) and tokenizer.model; any stage that takes a directory reads it through load_model().
"""
import os

import torch

from model import ModelArgs, Transformer
from tokenizer import Tokenizer


def save_checkpoint(path, checkpoint):
    """Write to a temporary file and rename it into place: a crash never leaves a truncated checkpoint."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)


def load_checkpoint(out_dir, flag="--out_dir"):
    """
    The checkpoint dict of out_dir, on the CPU (a stage moves only the weights it needs to its device).
    flag: the setting that named out_dir, for the message when there is none.
    """
    path = os.path.join(out_dir, "ckpt.pt")
    if not os.path.exists(path):
        raise SystemExit(f"error: no checkpoint at {path}; train one with `python pretrain.py` (or sft.py), "
                         f"or point {flag} at a directory that has one")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt or foreign file is a user-facing problem, not a traceback
        raise SystemExit(f"error: cannot read checkpoint {path}: {type(e).__name__}: {str(e)[:200]}")


def model_from_checkpoint(checkpoint, device="cpu"):
    """The Transformer a checkpoint describes, with its weights loaded."""
    model = Transformer(ModelArgs(**checkpoint["model_args"]))
    model.load_state_dict(checkpoint["model"])
    return model.to(device)


def check_tokenizer(checkpoint_sha, tokenizer_sha, what, fix="use the data directory prepared with its tokenizer"):
    """A model or token file made with another tokenizer would train or decode garbage: refuse it, naming the fix."""
    if checkpoint_sha and tokenizer_sha and checkpoint_sha != tokenizer_sha:
        raise SystemExit(f"error: {what} was made with tokenizer {checkpoint_sha} but the tokenizer here is "
                         f"{tokenizer_sha}; {fix}")


def load_model(out_dir, device="cpu", dtype=torch.float32, tokenizer_path="", flag="--out_dir"):
    """
    (model in eval mode on device/dtype, its Tokenizer, the checkpoint dict without its weights) from a
    checkpoint directory. The tokenizer is tokenizer_path if given, else the one saved beside the checkpoint.
    """
    checkpoint = load_checkpoint(out_dir, flag)
    tok = Tokenizer(tokenizer_path or os.path.join(out_dir, "tokenizer.model"))
    check_tokenizer(checkpoint.get("tokenizer_sha"), tok.sha, f"{out_dir}/ckpt.pt",
                    fix="pass the tokenizer it was trained with as --tokenizer=path/to/tokenizer.model")
    model = model_from_checkpoint(checkpoint).eval().to(device=device, dtype=dtype)
    for key in ("model", "optimizer", "lora"):
        checkpoint.pop(key, None)  # the weights now live in the model; keep the small metadata only
    return model, tok, checkpoint
