"""
Pretrain the Llama 2 model on the token files prepare_data.py wrote.

    python pretrain.py                                        # the demo preset, minutes on a laptop CPU
    python pretrain.py --max_iters=100 --batch_size=8         # any setting below, as --key=value
    torchrun --standalone --nproc_per_node=4 pretrain.py config/pretrain_58m_4gpu.py

Every eval_interval iterations it measures the val loss (and bits per character, which compares
across tokenizers) and writes out_dir/ckpt.pt; --init_from=resume continues from there exactly.
Ctrl-C (or SIGTERM) saves at the end of the current iteration.
"""
import math
import os
import time
from functools import partial

import numpy as np
import torch

import evaluate
from checkpoint import model_from_checkpoint, model_to_tune
from configurator import check_ranges, configure
from device import run_main, setup_device
from memory import preflight
from model import PRESETS, ModelArgs, Transformer, peak_flops
from shards import TokenShards
from tokenizer import Tokenizer
from muon import muon_momentum
from training import (MUON_UNDER_FSDP, Stopper, apply_schedule, claim_out_dir, compile_and_wrap, cosine_lr,
                      lora_base_dtype, make_optimizer, nothing_to_do, open_out_dir, resolve_block_size, resume,
                      save_run, seed_step, to_device, train_step, warmdown_lr)

# -----------------------------------------------------------------------------
# I/O
out_dir = "out"                   # ckpt.pt and log.jsonl go here
data_dir = "data"                 # prepare_data.py's output: tokenizer.model, train_*.bin, val_*.bin
init_from = "scratch"             # "scratch", "resume" (continue out_dir/ckpt.pt), or a model to continue pretraining:
                                  # a checkpoint directory, a Hugging Face or Meta Llama directory, a llama2.c .bin
overwrite = False                 # scratch into an out_dir that holds a checkpoint: replace it (else refused)
eval_interval = 250               # measure val loss and save a checkpoint every this many iterations
eval_iters = 20                   # val batches per evaluation
log_interval = 25                 # iterations per log line
log_to = ""                       # also log to "wandb" and/or "tensorboard" (a comma list; tracking.py)
run_name = ""                     # the tracked run's name; "": out_dir's
wandb_project = "llama2.zh"       # the wandb project the run goes to
evaluate_tasks = True             # after training, the built-in benchmark (exams.py) and samples for the report
                                  # card, out_dir/report.md (report.py); False: the card from the logs alone
evaluate_benchmark: bool = None   # the old name of evaluate_tasks, still read (with a note)
# model
preset = "demo"                   # a size from model.PRESETS: demo, 9m, 24m, 58m, 134m, 256m
dim: int = None                   # dim, n_layers, n_heads, n_kv_heads override the preset when set
n_layers: int = None              # transformer blocks
n_heads: int = None               # attention heads (dim must split into them evenly)
n_kv_heads: int = None            # key/value heads; fewer than n_heads is grouped-query attention
block_size: int = None            # context length; None: the preset's max_seq_len
dropout = 0.0                     # off: a model that sees each token about once does not overfit
tie_embeddings = True             # the classifier shares the input embedding's weights
# optimization
batch_size = 8                    # sequences per micro-step, per process
gradient_accumulation_steps = 1   # micro-steps per optimizer step, per process
max_iters = 1800                  # optimizer steps in the whole run
learning_rate = 5e-3              # peak, after warmup
min_lr = 0.0                      # at the end of the decay
warmup_iters = 50                 # iterations of linear warmup to learning_rate
lr_decay_iters: int = None        # None: max_iters
lr_schedule = "warmdown"          # "warmdown": constant, then linear to min_lr over the last warmdown_fraction of
warmdown_fraction = 0.4           # lr_decay_iters (docs/experiments.md); or "cosine": decay to min_lr all along
embedding_lr_scale = 2.0          # Muon: the embedding's AdamW learning rate is learning_rate times this
muon_momentum_warmup = 300        # Muon: iterations over which its momentum rises from 0.85 to 0.95; 0: 0.95
zero_init_projections = False     # blocks' output projections (wo, w2) start at zero: each block starts as the identity
document_rows = False             # every row starts at a document's first token (else anywhere)
weight_decay = 0.1                # decoupled, on matrices and embeddings (never on norms)
beta1 = 0.9                       # AdamW (and Muon's AdamW half): decay of the first moment
beta2 = 0.95                      # and of the second moment
grad_clip = 1.0                   # clip the gradient norm at this; 0 disables
muon = True                       # Muon for the blocks' matrices, AdamW for the rest (muon.py); False: AdamW for all
# LoRA, for continued pretraining of an existing model (--init_from)
lora_rank = 0                     # 0: train every weight; > 0: freeze the model and train rank-r adapters (AdamW)
lora_alpha = 16.0                 # adapters add (lora_alpha / lora_rank) * B A x
lora_dropout = 0.0                # dropout on the adapters' input
lora_targets = "wq,wk,wv,wo,w1,w2,w3"  # the Linear layers that get adapters
train_embeddings: bool = None     # LoRA: also train embedding and classifier in full; None: when rows were added
base_dtype = "auto"               # LoRA: the frozen weights stored as float32, bfloat16, float16 or int8; auto: as
                                  # dtype on GPUs, float32 on CPUs
# system
device = "auto"                   # auto: cuda, then mps, then cpu
dtype = "auto"                    # auto: bfloat16 on recent GPUs and CPUs with bf16 instructions, float16 on older
                                  # GPUs, else float32 (device.auto_dtype)
checkpoint_activations = False    # keep only each block's input, recompute the rest in the backward pass: less memory
fsdp = False                      # torchrun: shard weights, gradients and optimizer state over the processes (FSDP2)
compile: bool = None              # torch.compile; None: on for CUDA, off elsewhere
auto_batch_size = False           # pre-flight: the largest micro-batch that fits, same batch_size x accumulation
device_memory_gb = 0.0            # pre-flight: plan for this much memory per device (GB); 0: what the device has free
seed = 1337                       # model init, batches and dropout: a run is a function of it
# -----------------------------------------------------------------------------

# settings a resumed run takes from its checkpoint, whatever the command line says
FIXED_ON_RESUME = ("preset", "dim", "n_layers", "n_heads", "n_kv_heads", "block_size", "dropout", "tie_embeddings",
                   "muon", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "train_embeddings", "base_dtype")


def model_args_from_settings(vocab_size):
    """The model a scratch run builds: the preset, with any shape setting given on top."""
    if preset not in PRESETS:
        raise SystemExit(f"error: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    shape = dict(PRESETS[preset])
    for key, value in (("dim", dim), ("n_layers", n_layers), ("n_heads", n_heads), ("n_kv_heads", n_kv_heads)):
        if value is not None:
            shape[key] = value
    if block_size is not None:
        shape["max_seq_len"] = block_size
    kv = shape.get("n_kv_heads") or shape["n_heads"]
    if shape["dim"] % shape["n_heads"] or shape["n_heads"] % kv or (shape["dim"] // shape["n_heads"]) % 2:
        raise SystemExit(f"error: dim={shape['dim']}, n_heads={shape['n_heads']}, n_kv_heads={kv}: dim must split "
                         f"into n_heads heads of even size, and n_heads must be a multiple of n_kv_heads")
    return ModelArgs(**shape, vocab_size=vocab_size, dropout=dropout, tie_embeddings=tie_embeddings)


def starting_model(checkpoint, base_path, tok, config, run, sharded):
    """The model this run trains: the resumed run's, a new one from the settings (base_path None), or an existing
    model to continue (one of our checkpoints or an imported Llama), in full or with adapters."""
    if checkpoint is not None and not config["lora_rank"]:
        return model_from_checkpoint(checkpoint)
    if base_path is None:
        with torch.random.fork_rng():  # the same initial weights whatever the number of processes
            torch.manual_seed(config["seed"])
            model = Transformer(model_args_from_settings(tok.n_words))
            if config["zero_init_projections"]:
                model.zero_output_projections()
        return model
    if run.master and checkpoint is None:
        for key in ("dim", "n_layers", "n_heads", "n_kv_heads"):
            if config[key] is not None:
                print(f"warning: --{key} is ignored: the model comes from {base_path}")
    return model_to_tune(base_path, tok, config, config["seed"], resumed=checkpoint,
                         verbose=run.master and checkpoint is None,
                         base_dtype=lora_base_dtype(config["base_dtype"], run), on_rank0=sharded)[0]


def main():
    global batch_size, gradient_accumulation_steps, evaluate_tasks, block_size  # set again below
    config = configure(globals())
    if evaluate_benchmark is not None:
        print(f"note: --evaluate_benchmark is now --evaluate_tasks, as in the other stages; using {evaluate_benchmark}")
        evaluate_tasks = evaluate_benchmark
    check_ranges(config, at_least_1=("batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters",
                                     "log_interval", "dim", "n_layers", "n_heads", "n_kv_heads", "block_size"),
                 at_least_0=("max_iters", "warmup_iters", "lr_decay_iters", "min_lr", "weight_decay", "grad_clip",
                             "dropout", "muon_momentum_warmup"),
                 positive=("learning_rate", "embedding_lr_scale", "warmdown_fraction"))
    if lr_schedule not in ("cosine", "warmdown"):
        raise SystemExit(f"error: --lr_schedule must be cosine or warmdown, not {lr_schedule!r}")
    lora_base_dtype(base_dtype)  # a bad --base_dtype is refused before anything is touched
    if fsdp and muon and not lora_rank and init_from != "resume":
        raise SystemExit(MUON_UNDER_FSDP)
    if lora_rank and init_from == "scratch":
        raise SystemExit("error: --lora_rank adapts an existing model: pass --init_from=<a checkpoint or a Llama>")
    resumed = init_from == "resume"
    claim_out_dir(out_dir, fresh=not resumed, overwrite=overwrite,
                  init_from=None if init_from in ("scratch", "resume") else init_from)
    run = setup_device(device, dtype, compile, cpu_bf16=True)  # bf16 autocast on CPUs with bf16 instructions
    torch.manual_seed(seed + run.rank)

    tok = Tokenizer(os.path.join(data_dir, "tokenizer.model"))
    train_data = TokenShards(data_dir, "train", tok.sha)
    val_data = TokenShards(data_dir, "val", tok.sha)

    # ---- the model: from the settings, from the checkpoint we resume, or an existing model to continue
    # (resumed: the shape, the optimizer and LoRA as the run was started; base_path: the model it continues, if any)
    checkpoint, iter_num, best_val_loss, sessions = resume(resumed, out_dir, "pretrain", tok, run, globals(), config,
                                                           FIXED_ON_RESUME)
    base_path = checkpoint.get("base") if resumed else (None if init_from == "scratch" else init_from)
    sharded = fsdp and run.ddp  # FSDP: each process holds a shard of the weights, gradients and optimizer state
    model = starting_model(checkpoint, base_path, tok, config, run, sharded)
    model_args = model.args
    block_size = resolve_block_size(block_size, model)
    train_data.check_fits(block_size)
    val_data.check_fits(block_size)
    doc_starts = train_data.document_starts(tok.bos_id, block_size) if document_rows else None
    batch_size, gradient_accumulation_steps, plan = preflight(
        model, run, block_size, batch_size, gradient_accumulation_steps, lora_rank=lora_rank,
        base_dtype=lora_base_dtype(base_dtype, run), checkpointing=checkpoint_activations,
        fsdp=sharded, memory_gb=device_memory_gb, auto_batch=auto_batch_size)
    config.update(batch_size=batch_size, gradient_accumulation_steps=gradient_accumulation_steps)
    model.checkpoint_activations = checkpoint_activations
    if not sharded:  # FSDP moves each block to the device as it shards it: never the whole model on one device
        model.to(run.device)
    use_muon = muon and not lora_rank  # Muon orthogonalizes whole weight matrices: not the low-rank adapters
    optimizer, scaler = make_optimizer(model, run, sharded, checkpoint, weight_decay, learning_rate, (beta1, beta2),
                                       use_muon, embedding_lr_scale)
    checkpoint = None  # its weights and optimizer state now live in model and optimizer
    raw_model = model  # the plain module: what we save and count
    model, eval_model = compile_and_wrap(model, run, sharded)

    tokens_per_iter = batch_size * block_size * gradient_accumulation_steps * run.world_size
    decay_iters = lr_decay_iters or max_iters
    lr_at = cosine_lr if lr_schedule == "cosine" else \
        partial(warmdown_lr, warmdown_iters=warmdown_fraction * decay_iters)
    if run.master:
        print(f"model: {model_args.dim} dim, {model_args.n_layers} layers, {model_args.n_heads} heads "
              f"({model_args.n_kv_heads or model_args.n_heads} kv), context {block_size}, "
              f"vocab {model_args.vocab_size}: "
              f"{raw_model.num_params() / 1e6:.2f}M parameters" + (
                  f"; LoRA rank {lora_rank} on {lora_targets}: "
                  f"{raw_model.num_params(trained=True) / 1e6:.2f}M trained"
                  if lora_rank else ""))
        print(f"data: {train_data.sizes.sum():,} train tokens, {val_data.sizes.sum():,} val tokens; "
              f"tokens per iteration: {batch_size} batch x {block_size} context x {gradient_accumulation_steps} "
              f"accumulation x {run.world_size} processes = {tokens_per_iter:,}"
              + (" (FSDP)" if sharded else ""))
        print(f"device {run.device}, {run.dtype}, compile {run.compile}, "
              f"optimizer {'Muon (block matrices) + AdamW' if use_muon else 'AdamW'}; "
              f"{'resuming at' if resumed else 'starting at'} iteration {iter_num} of {max_iters}"
              + (f", continuing the pretraining of {init_from}" if init_from not in ("scratch", "resume") else ""))
    if nothing_to_do(run, out_dir, iter_num, max_iters, resumed):
        return
    logger = open_out_dir(run, out_dir, data_dir, tok, max_iters, resumed, sessions, dict(config, preflight=plan))
    peak = peak_flops(torch.cuda.get_device_name()) if run.device_type == "cuda" else None

    def train_batch(it, micro_step):
        # a function of (seed, iteration, global micro-batch index) alone: a resumed run sees the same
        # batches, and N processes see the same batches as one process with N times the accumulation
        micro = run.rank * gradient_accumulation_steps + micro_step
        rng = np.random.default_rng([seed, 0, it, micro])
        windows = to_device(train_data.batch(rng, batch_size, block_size, doc_starts), run)
        return {"tokens": windows[:, :-1], "targets": windows[:, 1:]}  # (B, T) each: y is x shifted by one

    def checkpoint_now(it, val_loss):
        save_run(out_dir, raw_model, optimizer, sharded, run, logger, iter_num=it, best_val_loss=val_loss,
                 model_args=vars(model_args), config=config, tokenizer_sha=tok.sha, stage="pretrain", base=base_path)

    # ---- the loop
    t_last = time.time()
    with Stopper(run, out_dir, checkpoint_now, sharded, "val loss", best_val_loss,
                 advice="lower --learning_rate, or use bfloat16 where float16 overflows") as stopper:
        while stopper.go(iter_num):
            lr = lr_at(iter_num, learning_rate, min_lr, warmup_iters, decay_iters)
            apply_schedule(optimizer, lr, muon_momentum(iter_num, muon_momentum_warmup))

            if stopper.eval_due(iter_num, eval_interval, max_iters, resumed):
                val_loss = evaluate_loss(eval_model, val_data, eval_iters, batch_size, block_size, seed, run)
                if stopper.check_loss(val_loss, "val loss", iter_num):
                    bpc = val_loss / math.log(2) * val_data.tokens_per_char
                    if run.master:
                        print(f"iter {iter_num}: val loss {val_loss:.4f}, {bpc:.3f} bits per character")
                        logger.log({"iter": iter_num, "tokens": iter_num * tokens_per_iter, "val_loss": val_loss,
                                    "val_bpc": bpc, "time_s": time.time() - stopper.t_start})
                    stopper.evaluated(iter_num, val_loss)
            if iter_num >= max_iters:
                break

            seed_step(seed, run.rank, iter_num)
            loss = train_step(model, optimizer, scaler, lambda micro_step: train_batch(iter_num, micro_step),
                              gradient_accumulation_steps, run, grad_clip)
            iter_num += 1
            if run.master:
                logger.first_timing(iter_num, run)

            if run.master and iter_num % log_interval == 0:
                train_loss = loss.item()  # this process's mean over the step's micro-batches
                stopper.check_loss(train_loss, "training loss", iter_num)
                dt = (time.time() - t_last) / log_interval
                t_last = time.time()
                tokens_per_s = tokens_per_iter / dt
                mfu = raw_model.flops_per_token(block_size) * tokens_per_s / (peak * run.world_size) if peak else None
                print(f"iter {iter_num}: loss {train_loss:.4f}, lr {lr:.2e}, {dt * 1000:.0f} ms/iter, "
                      f"{tokens_per_s:,.0f} tokens/s" + (f", MFU {mfu * 100:.1f}%" if mfu else "")
                      + f", ETA {logger.eta(iter_num)}")
                logger.log({"iter": iter_num, "tokens": iter_num * tokens_per_iter, "loss": train_loss, "lr": lr,
                            "ms_per_iter": dt * 1000, "tokens_per_s": tokens_per_s, "mfu": mfu})

    if stopper.finished and stopper.saved_iter is not None:
        # the training state goes before the evaluation's models come (closures see these names cleared)
        optimizer = scaler = model = eval_model = None
        evaluate.after_training("pretrained", None if sharded else raw_model.eval(), out_dir, base_path, None, tok,
                                data_dir, 0, run, tasks=False, evaluate_models=evaluate_tasks)


@torch.no_grad()
def evaluate_loss(eval_model, val_data, eval_iters, batch_size, block_size, seed, run):
    """The mean loss on eval_iters val batches, the same ones at every evaluation."""
    eval_model.eval()
    losses = []
    for k in range(eval_iters):
        windows = to_device(val_data.batch(np.random.default_rng([seed, 1, k]), batch_size, block_size), run)
        with run.autocast:
            _, loss = eval_model(windows[:, :-1], windows[:, 1:])
        losses.append(loss.item())
    eval_model.train()
    return float(np.mean(losses))


if __name__ == "__main__":
    run_main(main)
