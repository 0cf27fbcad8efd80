"""
Checkpoints: how every stage saves and loads a model. Our checkpoint directory holds ckpt.pt (weights, model
args, optimizer and loop state, config, the tokenizer's hash, the stage that wrote it) and tokenizer.model; a
LoRA run's holds what it trained and its base's path, merged again on loading (model_to_tune lives here too).
Wherever a stage takes a checkpoint directory it also takes an existing Llama-architecture model:

- a Hugging Face LlamaForCausalLM directory: config.json with model.safetensors, sharded
  model-0000N-of-0000M.safetensors with their index, or pytorch_model*.bin;
- Meta's original release: params.json with consolidated.00.pth, ... (model-parallel shards);
- a llama2.c version-0 .bin file (its tokenizer.model given separately).

An imported model is built on the meta device and assigned shard by shard in its own dtype: about one copy of
the weights in memory (docs/llama.md). A config we cannot compute exactly (rope scaling, biases, another
activation) is refused naming the field: nothing is ever loaded approximately.
"""
import dataclasses
import glob
import hashlib
import json
import os
import struct
from typing import NamedTuple

import numpy as np
import torch

from device import process_rank, shared_by_rank0
from lora import add_lora, merged_state_dict
from model import ModelArgs, Transformer
from tokenizer import Tokenizer

FORMATS = ("ckpt.pt (ours), config.json with *.safetensors or pytorch_model*.bin (Hugging Face), params.json with "
           "consolidated.*.pth (Meta), or a llama2.c .bin file")


class Stage(NamedTuple):
    """What the kit knows of the stage that wrote a ckpt.pt (its "stage" field): a new stage is its script and a row."""
    run: str                # "a pretraining run": what --init_from=resume expects
    verb: str               # what --init_from=<it> does with it instead
    model: str              # the model's name in the evaluation's tables
    loss: str               # what its best_val_loss measures
    data: tuple             # its data files' prefixes in data_dir: (train, held out)
    chat: bool              # trained on chat in the [INST] template (None: may be, an imported model)


STAGES = {
    "pretrain": Stage("a pretraining run", "continue pretraining", "pretrained", "val loss", ("train_", "val_"), False),
    "sft": Stage("an SFT run", "fine-tune", "SFT", "test answer loss", ("sft_train", "sft_test"), True),
    "dpo": Stage("a DPO run", "align", "DPO", "held-out DPO loss", ("dpo_train", "dpo_test"), True),
    "grpo": Stage("a GRPO run", "train", "GRPO", "held-out error (1 - mean greedy pass@1)", ("sft_train", "sft_test"),
                  True),
    "imported": Stage("an imported model", "fine-tune", "imported", "-", ("train_", "val_"), None),
}


def model_name(stage, unknown):
    """The evaluation tables' name for a model of this stage (STAGES), or unknown for a stage not there."""
    return STAGES[stage].model if stage in STAGES else unknown


def stage_of(checkpoint):
    """The Stage row of a loaded checkpoint (an unknown or missing stage reads as pretraining's)."""
    return STAGES.get(checkpoint.get("stage"), STAGES["pretrain"])


def save_checkpoint(path, checkpoint):
    """Write to a temporary file and rename it into place: a crash never leaves a truncated checkpoint."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)


def writable(directory):
    """Whether a file can be created in directory, found by creating one: os.access says yes for root
    even where the file system refuses (a read-only mount, /sys)."""
    import tempfile
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write_test_"):
            return True
    except OSError:
        return False


def checkpoint_format(path):
    """"ours", "hf", "meta", "llama2c", or None when path holds no model we can read."""
    if os.path.isfile(path):
        return "llama2c" if path.endswith(".bin") else None
    if os.path.exists(os.path.join(path, "ckpt.pt")):
        return "ours"
    if os.path.exists(os.path.join(path, "config.json")):
        return "hf"
    if os.path.exists(os.path.join(path, "params.json")):
        return "meta"
    return None


def require_model(path, flag="--out_dir"):
    """The format of the model at path (checkpoint_format), or a one-line refusal saying how to get one."""
    kind = checkpoint_format(path)
    if kind is None:
        if not os.path.exists(path) or os.path.isdir(path) and not os.listdir(path):
            raise SystemExit(f"error: no checkpoint at {path}; train one with `python pretrain.py` (or sft.py), "
                             f"or point {flag} at a directory that has one")
        raise SystemExit(f"error: {path} is not a model this kit reads; {flag} takes {FORMATS}")
    return kind


def load_checkpoint(path, flag="--out_dir", merge=True):
    """
    A checkpoint dict on the CPU: model (a state dict in our names), model_args, stage, tokenizer_sha, and for
    ours all else they hold. path: one of our directories or a model in a format above; flag: the setting that
    named it. A LoRA run's adapters are merged onto its base here (merged_lora_model) unless merge=False.
    """
    kind = require_model(path, flag)
    if kind != "ours":
        return {"hf": read_hf, "meta": read_meta, "llama2c": read_llama2c}[kind](path)
    ckpt_path = os.path.join(path, "ckpt.pt")
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt or foreign file is a user-facing problem, not a traceback
        raise SystemExit(f"error: cannot read checkpoint {ckpt_path}: {type(e).__name__}: {str(e)[:200]}")
    if merge and checkpoint.get("model") is None and checkpoint.get("lora") is not None:
        checkpoint["model"] = merged_lora_model(path, checkpoint)
    return checkpoint


def model_from_checkpoint(checkpoint, device="cpu", dtype=None):
    """
    The Transformer a checkpoint describes, built on the meta device and its tensors assigned as they are (no
    second copy, no random init; they move out of checkpoint["model"]), then moved to device. dtype: each tensor
    converted in turn, replacing the checkpoint's, so that a converted model never exists twice.
    """
    args = ModelArgs(**checkpoint["model_args"])
    with torch.device("meta"):
        model = Transformer(args)
    state = checkpoint.pop("model")
    if args.tie_embeddings:
        state.pop("output.weight", None)  # one matrix: assigned once, tied again below
    if dtype is not None:
        for key in list(state):  # one tensor at a time, the original dropped as its conversion replaces it
            state[key] = state[key].to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (args.tie_embeddings and k == "output.weight")]
    if missing or unexpected:
        source = checkpoint.get("source", "the checkpoint")
        more = len(missing) + len(unexpected) - 1
        raise SystemExit(f"error: {source} does not hold a complete model: "
                         + (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}")
                         + (f" and {more} more" if more else ""))
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.init_rope()
    return model.to(device)


def model_to_tune(base_dir, tok, config, seed, resumed=None, base_dtype="float32", verbose=False, on_rank0=False):
    """
    (model, the base's stage, rows added): what the fine-tuning stages train, and a LoRA checkpoint is merged
    from. The base at base_dir (ours or imported) in fp32 with the run's dropout; its embedding grown for an
    extended tokenizer (from a generator of its own: a resumed run draws the same rows); LoRA adapters when
    config["lora_rank"] > 0, the frozen weights in base_dtype, embeddings trained in full where
    config["train_embeddings"] says (default: when rows were added); a resumed run's saved weights. verbose: say
    what rows were added. on_rank0 (FSDP): only rank 0 reads the base, the others build it on the meta device and
    get the weights as device.wrap_fsdp shards it: one copy of the base per machine while loading.
    """
    if on_rank0:
        shape = refusal = None
        if process_rank() == 0:
            try:
                model, base_stage, added_rows = model_to_tune(base_dir, tok, config, seed, resumed, base_dtype,
                                                              verbose)
                shape = (dataclasses.asdict(model.args), base_stage, added_rows)
            except SystemExit as e:  # the others wait for the shape: they get the refusal and stop with it
                refusal = e
        shape = shared_by_rank0(shape, refusal)
        if process_rank() != 0:
            model_args, base_stage, added_rows = shape
            with torch.device("meta"):
                model = Transformer(ModelArgs(**model_args))
                parts_to_train(model, config, seed, base_dtype, added_rows)
        return model, base_stage, added_rows
    base = load_checkpoint(base_dir, flag="--init_from")
    check_data_tokenizer(base, base_dir, tok)
    fingerprint = weights_fingerprint(base["model"])
    if resumed is not None and resumed.get("base_fingerprint") not in (None, fingerprint):
        raise SystemExit(f"error: {base_dir}, the base this LoRA run was trained on, has changed since (other "
                         f"weights): its adapters would be merged onto another model; put the original base back")
    base["model_args"]["dropout"] = config["dropout"]
    # trained in fp32 (autocast computes in bf16/fp16 where set), but a LoRA base's frozen block weights go
    # straight from the file's dtype to base_dtype (an int8 base: quantized from the file's, layer by layer in
    # add_lora): converted one tensor at a time, so that the model is never in memory twice
    lora = config["lora_rank"] > 0
    frozen_dtype = None if not lora or base_dtype == "int8" else getattr(torch, base_dtype)
    for key, tensor in base["model"].items():
        frozen = lora and key.startswith("layers.") and not key.endswith("norm.weight")
        if not frozen or frozen_dtype is not None:
            base["model"][key] = tensor.to(frozen_dtype if frozen else torch.float32)
    del tensor
    model = model_from_checkpoint(base)
    base_stage = base.get("stage")
    del base  # the base's optimizer state is of no use here
    added_rows = model.resize_vocab(tok.n_words, torch.Generator().manual_seed(seed), unk_id=tok.sp.unk_id())
    if verbose and added_rows:
        print(f"the tokenizer has {tok.n_words} pieces: added {added_rows} embedding rows to the model's "
              f"{tok.n_words - added_rows} (classifier rows as likely as <unk> until trained)")
    parts_to_train(model, config, seed, base_dtype, added_rows)
    if resumed is not None:
        model.load_state_dict(resumed["lora"], strict=False) if lora else model.load_state_dict(resumed["model"])
    model.base_fingerprint = fingerprint  # a LoRA run saves it, and is merged onto this base only
    return model, base_stage, added_rows


def weights_fingerprint(state):
    """A cheap id of a model's weights: every tensor's name, shape and dtype, and a few tensors' first values."""
    digest = hashlib.sha256()
    names = sorted(state)
    for name in names:
        digest.update(f"{name}{tuple(state[name].shape)}{state[name].dtype};".encode())
    for name in names[::max(1, len(names) // 8)]:
        digest.update(state[name].flatten()[:4096].float().numpy().tobytes())
    return digest.hexdigest()[:16]


def parts_to_train(model, config, seed, base_dtype, added_rows):
    """model_to_tune's adapters, embeddings trained in full and activation checkpointing, on a model with
    weights or on the meta device alike."""
    if config["lora_rank"] > 0:
        with torch.random.fork_rng():  # the same adapters whatever the process count, and on every resume
            torch.manual_seed(seed)
            add_lora(model, set(config["lora_targets"].split(",")), config["lora_rank"], config["lora_alpha"],
                     config["lora_dropout"], base_dtype)
        full_embeddings = config["train_embeddings"] if config["train_embeddings"] is not None else added_rows > 0
        if full_embeddings:  # new tokens need their own embeddings, which a low-rank update cannot give them
            model.tok_embeddings.weight.requires_grad_(True)
            model.output.weight.requires_grad_(True)
    model.checkpoint_activations = config.get("checkpoint_activations", False)


def merged_lora_model(path, checkpoint):
    """The merged weights of the LoRA run at path: its base read again and stored as the run stored it (an int8 or
    bf16 base's rounding folded in as trained), its rows grown, its adapters loaded (model_to_tune, as on resume)."""
    base = checkpoint["base"]
    if checkpoint_format(base) is None:
        base = checkpoint.get("base_abspath", base)
    if checkpoint_format(base) is None:
        raise SystemExit(f"error: {path}/ckpt.pt holds LoRA adapters, not a whole model: its base, "
                         f"{checkpoint['base']}, is not there any more; put it back (or run from the directory "
                         f"the training ran in)")
    config = checkpoint["config"]
    model, _, _ = model_to_tune(base, Tokenizer(os.path.join(path, "tokenizer.model")), config, config["seed"],
                                resumed=checkpoint, base_dtype=checkpoint["base_dtype"])
    return merged_state_dict(model)


def check_tokenizer(checkpoint_sha, tokenizer_sha, what, fix="use the data directory prepared with its tokenizer"):
    """A model or token file made with another tokenizer would train or decode garbage: refuse it, naming the fix."""
    if checkpoint_sha and tokenizer_sha and checkpoint_sha != tokenizer_sha:
        raise SystemExit(f"error: {what} was made with tokenizer {checkpoint_sha} but the tokenizer here is "
                         f"{tokenizer_sha}; {fix}")


def check_vocabulary(checkpoint, tok, path):
    """An imported model has no tokenizer hash: more embedding rows than pieces is fine (padded vocabularies),
    fewer is an error, and so are other special ids."""
    rows = checkpoint["model_args"]["vocab_size"]
    if tok.n_words > rows:
        raise SystemExit(f"error: {tok.model_path} has {tok.n_words} pieces but {path} only {rows} embedding rows; "
                         f"use the model's own tokenizer (an extended one needs fine-tuning first: sft.py or "
                         f"pretrain.py)")
    special = checkpoint.get("special_ids")
    if special and tuple(special) != (tok.bos_id, tok.eos_id):
        raise SystemExit(f"error: {path} uses bos/eos ids {special[0]}/{special[1]} but {tok.model_path} "
                         f"{tok.bos_id}/{tok.eos_id}; use the model's own tokenizer")


def check_data_tokenizer(checkpoint, path, tok, flag="--init_from"):
    """The data must use the model's tokenizer or an extension of it (prepare_data.py --extend_tokenizer)."""
    base_path = find_tokenizer(path, required=False)
    if base_path is None:
        if checkpoint.get("tokenizer_sha"):
            check_tokenizer(checkpoint["tokenizer_sha"], tok.sha, path)
        elif tok.n_words < checkpoint["model_args"]["vocab_size"] and checkpoint.get("special_ids") is None:
            print(f"note: {path} has no tokenizer.model beside it: cannot check that the data's tokenizer is its own")
    else:
        base = Tokenizer(base_path)
        if base.sha != tok.sha and not tok.extends(base):
            raise SystemExit(f"error: the data was prepared with tokenizer {tok.sha} ({tok.model_path}), which is "
                             f"neither the tokenizer of {flag}={path} nor an extension of it; prepare the data with "
                             f"--tokenizer_model={base_path} or --extend_tokenizer={base_path}")
    special = checkpoint.get("special_ids")
    if special and tuple(special) != (tok.bos_id, tok.eos_id):
        raise SystemExit(f"error: {path} uses bos/eos ids {special[0]}/{special[1]} but the data's tokenizer "
                         f"{tok.bos_id}/{tok.eos_id}; prepare the data with the model's tokenizer")


def find_tokenizer(path, required=True):
    """Where the tokenizer of a checkpoint usually is: beside it (Meta's release: one directory up)."""
    base = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    for candidate in (os.path.join(base, "tokenizer.model"), os.path.join(os.path.dirname(os.path.abspath(base)),
                                                                          "tokenizer.model")):
        if os.path.exists(candidate):
            return candidate
    if required:
        raise SystemExit(f"error: no tokenizer.model beside {path}; pass --tokenizer=path/to/tokenizer.model")
    return None


def load_model(path, device="cpu", dtype=torch.float32, tokenizer_path="", flag="--out_dir"):
    """(model in eval mode on device/dtype, its Tokenizer, the checkpoint dict without weights) from a checkpoint
    directory or an existing model; the tokenizer is tokenizer_path if given, else the one beside it."""
    checkpoint = load_checkpoint(path, flag)
    tok = Tokenizer(tokenizer_path or find_tokenizer(path))
    check_tokenizer(checkpoint.get("tokenizer_sha"), tok.sha, f"{path}/ckpt.pt",
                    fix="pass the tokenizer it was trained with as --tokenizer=path/to/tokenizer.model")
    check_vocabulary(checkpoint, tok, path)
    model = model_from_checkpoint(checkpoint, dtype=dtype).eval().to(device=device, dtype=dtype)  # buffers too
    for key in ("optimizer", "lora"):
        checkpoint.pop(key, None)  # the weights now live in the model; keep the small metadata only
    return model, tok, checkpoint


def imported(source, model_args, state, special_ids=None):
    """The checkpoint dict of an imported model."""
    return {"model": state, "model_args": vars(model_args), "stage": "imported", "source": source,
            "tokenizer_sha": None, "special_ids": special_ids}


# ---------------------------------------------------------------------------- Hugging Face

def hf_permute(w, n_heads):
    """Our interleaved rotary pairs (0,1), (2,3), ... -> Hugging Face's halves (0, hd/2), (1, hd/2+1), ..."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def hf_unpermute(w, n_heads):
    """Hugging Face's half-split rotary layout -> our interleaved pairs: the inverse of hf_permute."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def hf_model_args(config, path):
    """ModelArgs of a Hugging Face Llama config.json; a field we cannot compute exactly is refused by name."""
    where = os.path.join(path, "config.json")
    if config.get("model_type") != "llama":
        raise SystemExit(f"error: {where}: model_type {config.get('model_type')!r} is not llama; "
                         f"this kit computes the Llama architecture only")
    rope_field = "rope_parameters" if config.get("rope_parameters") else "rope_scaling"  # transformers 5 / 4
    rope = config.get(rope_field) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise SystemExit(f"error: {where}: {rope_field}={json.dumps(rope)} is not supported (only the default "
                         f"rotary embedding); the model would be computed differently from how it was trained")
    for field, supported in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")):
        if config.get(field, supported) != supported:
            raise SystemExit(f"error: {where}: {field}={config[field]!r} is not supported (only {supported!r}); "
                             f"the model would be computed differently from how it was trained")
    n_heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_heads
    if head_dim * n_heads != config["hidden_size"]:
        raise SystemExit(f"error: {where}: head_dim={head_dim} x {n_heads} heads != hidden_size; not supported")
    return ModelArgs(dim=config["hidden_size"], n_layers=config["num_hidden_layers"], n_heads=n_heads,
                     n_kv_heads=config.get("num_key_value_heads") or n_heads, vocab_size=config["vocab_size"],
                     hidden_dim=config["intermediate_size"], norm_eps=config.get("rms_norm_eps", 1e-6),
                     rope_theta=rope.get("rope_theta", config.get("rope_theta", 10000.0)),
                     max_seq_len=config.get("max_position_embeddings", 2048),
                     tie_embeddings=config.get("tie_word_embeddings", False))


HF_NAMES = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
            "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
            "mlp.down_proj": "feed_forward.w2", "input_layernorm": "attention_norm",
            "post_attention_layernorm": "ffn_norm"}


def ours_to_hf(state, args):
    """Our state dict -> Hugging Face Llama names and layout (the inverse of hf_to_ours): what export.py writes."""
    ours = {f"{v}.weight": k for k, v in HF_NAMES.items()}
    out = {}
    for name, tensor in state.items():
        if name in ("tok_embeddings.weight", "norm.weight"):
            out[f"model.{'embed_tokens' if name.startswith('tok') else 'norm'}.weight"] = tensor
        elif name == "output.weight":
            if not args.tie_embeddings:
                out["lm_head.weight"] = tensor
        elif name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            if rest == "attention.wq.weight":
                tensor = hf_permute(tensor, args.n_heads)
            elif rest == "attention.wk.weight":
                tensor = hf_permute(tensor, args.n_kv_heads or args.n_heads)
            out[f"model.layers.{i}.{ours[rest]}.weight"] = tensor
    return out


def hf_to_ours(name, tensor, args):
    """(our name, tensor in our layout) for one Hugging Face tensor; (None, None) for what we do not use."""
    if name == "model.embed_tokens.weight":
        return "tok_embeddings.weight", tensor
    if name == "model.norm.weight":
        return "norm.weight", tensor
    if name == "lm_head.weight":
        return "output.weight", tensor
    if name.startswith("model.layers.") and not name.endswith("rotary_emb.inv_freq"):
        _, _, i, rest = name.split(".", 3)
        module, param = rest.rsplit(".", 1)
        if module in HF_NAMES and param == "weight":
            if module == "self_attn.q_proj":
                tensor = hf_unpermute(tensor, args.n_heads)
            elif module == "self_attn.k_proj":
                tensor = hf_unpermute(tensor, args.n_kv_heads)  # the kv heads, not n_heads: grouped-query models
            return f"layers.{i}.{HF_NAMES[module]}.weight", tensor
    return None, None


def hf_weight_files(path):
    """The weight files of a Hugging Face directory, checked against their index."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index_path = os.path.join(path, index_name)
        if os.path.exists(index_path):
            with open(index_path) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            missing = [name for name in files if not os.path.exists(os.path.join(path, name))]
            if missing:
                raise SystemExit(f"error: {index_path} names {missing[0]}, which is not in {path} "
                                 f"({len(missing)} of {len(files)} shards missing); download it again")
            return [os.path.join(path, name) for name in files]
        if os.path.exists(os.path.join(path, single)):
            return [os.path.join(path, single)]
    raise SystemExit(f"error: {path} has config.json but no model.safetensors or pytorch_model.bin (nor their index)")


def read_tensors(path):
    """(name, tensor) of one weight file, one tensor at a time, in the file's dtype, mapped from the file (a copy
    made before the next one is read frees the file's pages again: the model is then never in memory twice)."""
    if path.endswith(".safetensors"):
        try:
            from safetensors import safe_open
        except ImportError:
            raise SystemExit(f"error: reading {path} needs the safetensors package: pip install safetensors")
        try:
            with safe_open(path, framework="pt") as f:
                names = list(f.keys())
            for name in names:  # each tensor in a mapping of its own: copied out, its pages leave memory with it
                with safe_open(path, framework="pt") as f:
                    tensor = f.get_tensor(name)
                yield name, tensor
        except Exception as e:  # a truncated download, a foreign file
            raise SystemExit(f"error: cannot read {path} ({type(e).__name__}: {str(e)[:120]}); "
                             f"the file is truncated or not safetensors: download it again")
        return
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        raise SystemExit(f"error: cannot read {path} ({type(e).__name__}: {str(e)[:120]}); "
                         f"the file is truncated or not a PyTorch state dict: download it again")
    yield from state.items()


def read_hf(path):
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    args = hf_model_args(config, path)
    state = {}
    for file in hf_weight_files(path):
        for name, mapped in read_tensors(file):
            key, tensor = hf_to_ours(name, mapped, args)
            if key:  # a copy of its own (q and k: their unpermuted copy), so that the mapping goes now
                state[key] = tensor if tensor.data_ptr() != mapped.data_ptr() else tensor.clone()
    special = (config.get("bos_token_id"), config.get("eos_token_id"))
    return imported(path, args, state, special if None not in special and not isinstance(special[1], list) else None)


# ---------------------------------------------------------------------------- Meta's release

# how Meta's model-parallel shards split each kind of tensor: along dim 0 (column parallel), dim 1 (row
# parallel and the embedding), or not at all (norms, replicated)
META_SPLIT = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w3": 0, "w2": 1}


def read_meta(path):
    with open(os.path.join(path, "params.json")) as f:
        params = json.load(f)
    shards = sorted(glob.glob(os.path.join(path, "consolidated.*.pth")))
    if not shards:
        raise SystemExit(f"error: {path} has params.json but no consolidated.*.pth weights")
    if params.get("rope_scaling") or params.get("use_scaled_rope"):
        raise SystemExit(f"error: {path}/params.json: scaled rotary embeddings are not supported")
    parts = []
    for shard in shards:
        try:
            parts.append(torch.load(shard, map_location="cpu", mmap=True, weights_only=True))
        except Exception as e:
            raise SystemExit(f"error: cannot read {shard} ({type(e).__name__}); the file is truncated or not a "
                             f"PyTorch state dict: download it again")
    state = {}
    for key in parts[0]:
        if key == "rope.freqs":
            continue  # the rotary frequencies: a function of the args, computed by the model
        kind = key.split(".")[-2]
        if len(parts) == 1 or kind not in META_SPLIT:
            state[key] = parts[0][key]
        else:
            state[key] = torch.cat([p[key] for p in parts], dim=META_SPLIT[kind])
    n_heads = params["n_heads"]
    args = ModelArgs(dim=params["dim"], n_layers=params["n_layers"], n_heads=n_heads,
                     n_kv_heads=params.get("n_kv_heads") or n_heads, vocab_size=state["tok_embeddings.weight"].shape[0],
                     hidden_dim=state["layers.0.feed_forward.w1.weight"].shape[0],
                     norm_eps=params.get("norm_eps", 1e-5),
                     rope_theta=params.get("rope_theta", 10000.0), max_seq_len=params.get("max_seq_len", 4096),
                     tie_embeddings=False)
    return imported(path, args, state)


# ---------------------------------------------------------------------------- llama2.c

LLAMA2C_LAYER_ORDER = ("attention_norm", "attention.wq", "attention.wk", "attention.wv", "attention.wo", "ffn_norm",
                       "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


def llama2c_v0_layout(dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len, shared):
    """The fp32 tensors of a llama2.c version-0 file after its 28-byte header, in order, as (our name, shape):
    "rope" is the (cos, sin) tables, (2, seq_len, hd/2), which run.c skips; an unshared classifier comes last."""
    hd = dim // n_heads
    shapes = {"attention_norm": (dim,), "attention.wq": (dim, dim), "attention.wk": (n_kv * hd, dim),
              "attention.wv": (n_kv * hd, dim), "attention.wo": (dim, dim), "ffn_norm": (dim,),
              "feed_forward.w1": (hidden, dim), "feed_forward.w2": (dim, hidden), "feed_forward.w3": (hidden, dim)}
    layout = [("tok_embeddings.weight", (vocab, dim))]
    for kind in LLAMA2C_LAYER_ORDER:  # all layers of one kind, then the next kind
        layout += [(f"layers.{i}.{kind}.weight", shapes[kind]) for i in range(n_layers)]
    layout += [("norm.weight", (dim,)), ("rope", (2, seq_len, hd // 2))]
    return layout + ([] if shared else [("output.weight", (vocab, dim))])


def read_llama2c(path):
    """A llama2.c version-0 file (run.c's format; export.py writes it too)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        header = f.read(28)
    if len(header) < 28:
        raise SystemExit(f"error: {path} is too short to be a llama2.c model")
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack("<7i", header)
    if header[:4] == b"ak42":
        raise SystemExit(f"error: {path} is a llama2.c version-2 (int8) file; import the version-0 (fp32) one")
    shared, vocab = vocab > 0, abs(vocab)
    if min(dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len) <= 0 or dim % n_heads:
        raise SystemExit(f"error: {path} is not a llama2.c version-0 model (its header makes no sense)")
    shapes = llama2c_v0_layout(dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len, shared)
    expected = 28 + 4 * sum(int(np.prod(s)) for _, s in shapes)
    if size != expected:
        raise SystemExit(f"error: {path} has {size} bytes but its header describes {expected}; the file is "
                         f"truncated or not a version-0 llama2.c model")
    data, at, state = np.memmap(path, dtype="<f4", mode="r", offset=28), 0, {}
    for name, shape in shapes:
        n = int(np.prod(shape))
        if name != "rope":
            state[name] = torch.from_numpy(np.array(data[at:at + n]).reshape(shape))
        at += n
    args = ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, vocab_size=vocab, hidden_dim=hidden,
                     max_seq_len=seq_len, tie_embeddings=shared)
    return imported(path, args, state)
