"""
Align an SFT model with preference pairs (DPO): for each prompt, raise the log-probability of the
chosen answer and lower that of the rejected one, measured against a reference model (the SFT model
it starts from), so that the model moves only as far as the preferences ask.

    python dpo.py                                      # the demo: out-sft + data/dpo_* -> out-dpo/, then the evaluation
    python dpo.py --lora_rank=8 --reference=model      # adapters; the reference is the same model with them off
    torchrun --standalone --nproc_per_node=4 dpo.py --init_from=out-58m-sft --data_dir=data-dpo --out_dir=out-58m-dpo

The loss (Rafailov et al. 2023) per pair, with log-probabilities summed over the answer's tokens and
its EOS: -log sigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected))), optionally with
label smoothing (conservative DPO) or as IPO's squared loss. Every eval_interval: the loss, reward
accuracy (the share of held-out pairs whose implicit reward ranks chosen above rejected), mean reward
margin, and how far the chosen and rejected log-probabilities moved. At the end, evaluate.py's
held-out tasks for the DPO model beside the SFT model. Ctrl-C (or SIGTERM) saves at the end of the
current iteration. The defaults (beta, sft_weight) were chosen on the demo: plain DPO there lowered
the chosen answers' probability too and broke the sentiment task (docs/experiments.md).
"""
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import evaluate
from checkpoint import model_to_tune
from configurator import check_ranges, configure
from device import run_main, setup_device
from lora import adapters_disabled
from memory import preflight, stored_bytes
from model import answer_logprobs
from shards import masked_split
from tokenizer import Tokenizer
from training import (Stopper, apply_schedule, claim_out_dir, compile_and_wrap, cosine_lr, lora_base_dtype,
                      make_optimizer, nothing_to_do, open_out_dir, resolve_block_size, resume, save_run, seed_step,
                      stream_position, to_device, train_step)

# -----------------------------------------------------------------------------
# I/O
out_dir = "out-dpo"               # DPO checkpoint (ckpt.pt), log.jsonl and eval.json go here
data_dir = "data"                 # prepare_data.py's output: dpo_train.*, dpo_test.*, tokenizer.model
init_from = "out-sft"             # the SFT model to align (a checkpoint directory or an imported Llama), or "resume"
overwrite = False                 # a new run into an out_dir that holds a checkpoint: replace it (else refused)
eval_interval = 100               # held-out pair metrics and a checkpoint every this many iterations
eval_iters = 0                    # held-out batches (of 4 x batch_size pairs) per evaluation; 0: every held-out pair
log_interval = 25                 # iterations per log line
log_to = ""                       # also log to "wandb" and/or "tensorboard" (a comma list; tracking.py)
run_name = ""                     # the tracked run's name; "": out_dir's
wandb_project = "llama2.zh"       # the wandb project the run goes to
evaluate_tasks = True             # after training, the held-out tasks and the built-in benchmark (DPO beside
                                  # SFT) for the report card, out_dir/report.md; False: the card from the logs
eval_per_task = 1000              # held-out questions per task in that evaluation; 0: all
# data
block_size: int = None            # longest pair sequence; None: the model's context
batch_size = 8                    # pairs per micro-step, per process (each pair is two rows)
gradient_accumulation_steps = 1   # micro-steps per optimizer step, per process
# DPO
beta = 0.5                        # how strongly the implicit reward is scaled; larger stays closer to the reference
loss_type = "sigmoid"             # sigmoid (DPO) or ipo (IPO's squared loss, which does not push margins forever)
label_smoothing = 0.0             # sigmoid: the share of pairs assumed mislabelled (conservative DPO); 0: plain DPO
sft_weight = 1.0                  # + this times the chosen answers' token NLL (RPO): keeps chosen answers likely
reference = "precomputed"         # precomputed: the reference's log-probs once before training; model: on the fly
# optimization
max_iters = 1500                  # optimizer steps in the whole run
learning_rate = 1e-4              # peak, after warmup
min_lr = 1e-5                     # at the end of the cosine decay
warmup_iters = 20
lr_decay_iters: int = None        # None: max_iters
weight_decay = 0.0                # decoupled AdamW weight decay
beta1 = 0.9                       # AdamW: decay of the first moment
beta2 = 0.95                      # and of the second moment
grad_clip = 1.0                   # clip the gradient norm at this; 0 disables
dropout = 0.0                     # off: the policy and its reference must compute alike
# LoRA
lora_rank = 0                     # 0: tune every weight; > 0: freeze the model and train rank-r adapters
lora_alpha = 16.0                 # adapters add (lora_alpha / lora_rank) * B A x
lora_dropout = 0.0                # dropout on the adapters' input
lora_targets = "wq,wk,wv,wo,w1,w2,w3"  # the Linear layers that get adapters
train_embeddings: bool = None     # LoRA: also train embedding and classifier in full; None: when rows were added
base_dtype = "auto"               # LoRA: the frozen weights stored as float32, bfloat16, float16 or int8; auto: as
                                  # dtype on GPUs, float32 on CPUs
# system
device = "auto"                   # auto: cuda, then mps, then cpu
dtype = "auto"                    # auto: bfloat16 on recent GPUs, float16 on older ones, float32 on CPU
                                  # (device.auto_dtype; bf16 autocast was slower for these batches there)
checkpoint_activations = False    # keep only each block's input, recompute the rest in the backward pass: less memory
fsdp = False                      # torchrun: shard weights, gradients and optimizer state over the processes (FSDP2)
compile: bool = None              # torch.compile; None: on for CUDA where Triton runs, off elsewhere
auto_batch_size = False           # pre-flight: the largest micro-batch that fits, same batch_size x accumulation
device_memory_gb = 0.0            # pre-flight: plan for this much memory per device (GB); 0: what the device has free
seed = 1337                       # the order of the pairs
# -----------------------------------------------------------------------------

# settings a resumed run takes from its checkpoint, whatever the command line says
FIXED_ON_RESUME = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "train_embeddings", "dropout",
                   "block_size", "beta", "loss_type", "label_smoothing", "sft_weight", "reference", "base_dtype")


class Pairs:
    """One DPO split, memory-mapped: sequence 2i is pair i's prompt + chosen answer, 2i + 1 its prompt + rejected
    answer, with answer masks; an endless stream, every pair once per epoch, shuffled anew each epoch."""

    def __init__(self, data_dir, split, block_size, tok, seed=0):
        prefix, index = masked_split(data_dir, "dpo", split, tok, "preference pairs")
        self.tokens_path, self.mask_path, self.seed = prefix + ".bin", prefix + "_mask.bin", seed
        lengths = (index[1:] - index[:-1]).reshape(-1, 2)       # (pairs, 2): chosen, rejected
        self.fits = np.flatnonzero(lengths.max(1) - 1 <= block_size)  # a sequence of L tokens makes L - 1 predictions
        self.skipped = len(lengths) - len(self.fits)
        if not len(self.fits):
            raise SystemExit(f"error: no DPO {split} pair fits block_size={block_size}")
        self.starts, self.ends = index[:-1].reshape(-1, 2), index[1:].reshape(-1, 2)
        self.epoch_order = (None, None)

    def __len__(self):
        return len(self.fits)

    def pair_ids(self, first, n):
        """The pairs at stream positions first .. first + n - 1: epoch by epoch, each a new shuffle."""
        ids = []
        for position in range(first, first + n):
            epoch, k = divmod(position, len(self))
            if self.epoch_order[0] != epoch:
                self.epoch_order = (epoch, self.fits[np.random.default_rng([self.seed, epoch]).permutation(len(self))])
            ids.append(int(self.epoch_order[1][k]))
        return ids

    def batch(self, ids):
        """Model inputs for the pairs ids, numpy arrays (2n, T), T the longest sequence: rows 0..n-1 the
        chosen sequences, rows n..2n-1 the rejected ones; tokens, targets (-1 on padding) and loss_mask."""
        tokens = np.memmap(self.tokens_path, dtype=np.uint16, mode="r")
        mask = np.memmap(self.mask_path, dtype=np.uint8, mode="r")
        spans = [(self.starts[i, side], self.ends[i, side]) for side in (0, 1) for i in ids]
        T = max(end - start for start, end in spans) - 1
        x = np.zeros((len(spans), T), dtype=np.int64)
        y = np.full((len(spans), T), -1, dtype=np.int64)
        m = np.zeros((len(spans), T), dtype=np.float32)
        for row, (start, end) in enumerate(spans):
            seq = tokens[start:end].astype(np.int64)
            x[row, :len(seq) - 1], y[row, :len(seq) - 1] = seq[:-1], seq[1:]
            m[row, :len(seq) - 1] = mask[start + 1:end]  # the mask of the predicted token
        return {"tokens": x, "targets": y, "loss_mask": m, "pair_ids": np.array(ids)}


def answer_logps(model, batch):
    """Each row's log-probability of its answer: the sum over its answer tokens and their EOS, (2n,)."""
    return answer_logprobs(model, batch).sum(-1)


def dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, loss_type="sigmoid", label_smoothing=0.0):
    """
    Per pair: the loss and the margin (chosen - ref_chosen) - (rejected - ref_rejected), whose beta-scaled
    value is the implicit reward's difference. sigmoid: DPO, with label smoothing the conservative DPO of
    Mitchell (2023); ipo: Azar et al. (2023)'s (margin - 1 / (2 beta))^2. Policy equal to reference: ln 2.
    """
    margin = (chosen - ref_chosen) - (rejected - ref_rejected)
    if loss_type == "ipo":
        return (margin - 1 / (2 * beta)) ** 2, margin
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(-beta * margin)
    return losses, margin


def batch_loss(model, batch, ref_logps, beta, loss_type="sigmoid", label_smoothing=0.0, sft_weight=0.0):
    """DPO's mean loss over a batch of pairs: the policy's log-probs (with gradients) against ref_logps (2n,),
    plus sft_weight times the chosen answers' mean negative log-likelihood per token (RPO)."""
    logps = answer_logps(model, batch)
    n = logps.shape[0] // 2
    losses, _ = dpo_loss(logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], beta, loss_type, label_smoothing)
    loss = losses.mean()
    if sft_weight:
        loss = loss - sft_weight * logps[:n].sum() / batch["loss_mask"][:n].sum().clamp(min=1)
    return loss


def pair_metrics(policy, ref, beta, loss_type, label_smoothing):
    """Held-out pairs, from the (pairs, 2) log-probs of policy and reference: the loss, reward accuracy, mean
    reward margin, and how far the chosen and rejected log-probabilities moved."""
    losses, margin = dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], beta, loss_type, label_smoothing)
    return {"val_loss": losses.mean().item(), "reward_accuracy": (margin > 0).float().mean().item(),
            "reward_margin": beta * margin.mean().item(), "chosen_drift": (policy[:, 0] - ref[:, 0]).mean().item(),
            "rejected_drift": (policy[:, 1] - ref[:, 1]).mean().item()}


@torch.no_grad()
def on_the_fly_reference(batch, ref_model, policy):
    """The reference's answer log-probs for a batch: ref_model's, or (LoRA) the policy's with its adapters off."""
    if ref_model is not None:
        return answer_logps(ref_model, batch)
    with adapters_disabled(policy):
        was_training = policy.training
        policy.eval()
        logps = answer_logps(policy, batch)
        policy.train(was_training)
    return logps


@torch.no_grad()
def all_answer_logps(model, pairs, batch_size, run, ids=None, desc=None):
    """The model's answer log-probs for the pairs ids of a split (default: all that fit): a (pairs in the
    file, 2) tensor of chosen and rejected, zero for the pairs not asked for. desc: a progress bar's label."""
    model.eval()
    out = torch.zeros(len(pairs.starts), 2)
    lengths = (pairs.ends - pairs.starts).max(1)
    fits = sorted(pairs.fits if ids is None else ids, key=lambda i: lengths[i])  # similar lengths: little padding
    starts = range(0, len(fits), batch_size)
    for i in tqdm(starts, desc, unit="batch", dynamic_ncols=True, leave=False, disable=not (desc and run.master)):
        ids = fits[i:i + batch_size]
        batch = to_device(pairs.batch(ids), run)
        with run.autocast:
            logps = answer_logps(model, batch).float().cpu()
        out[ids, 0], out[ids, 1] = logps[:len(ids)], logps[len(ids):]
    return out


def main():
    global batch_size, gradient_accumulation_steps, block_size  # auto_batch_size, and the model's context
    config = configure(globals())
    check_ranges(config, at_least_1=("batch_size", "gradient_accumulation_steps", "eval_interval", "log_interval",
                                     "block_size"),
                 at_least_0=("max_iters", "warmup_iters", "lr_decay_iters", "min_lr", "weight_decay", "grad_clip",
                             "dropout", "lora_rank", "lora_dropout", "eval_per_task", "label_smoothing",
                             "sft_weight", "eval_iters"),
                 positive=("learning_rate", "beta"))
    if loss_type not in ("sigmoid", "ipo") or reference not in ("precomputed", "model") or label_smoothing >= 0.5:
        raise SystemExit("error: --loss_type is sigmoid or ipo, --reference precomputed or model, and "
                         "--label_smoothing below 0.5")
    lora_base_dtype(base_dtype)  # a bad --base_dtype is refused before anything is touched
    resumed = init_from == "resume"
    claim_out_dir(out_dir, fresh=not resumed, overwrite=overwrite, init_from=None if resumed else init_from)
    run = setup_device(device, dtype, compile)
    torch.manual_seed(seed + run.rank)
    tok = Tokenizer(os.path.join(data_dir, "tokenizer.model"))

    # ---- the model: the SFT checkpoint, or our own to resume (LoRA, the row length and the loss as it was started)
    checkpoint, iter_num, best_val_loss, sessions = resume(resumed, out_dir, "dpo", tok, run, globals(), config,
                                                           FIXED_ON_RESUME)
    base_dir = checkpoint["base"] if resumed else init_from
    sharded = fsdp and run.ddp  # FSDP: each process holds a shard of the weights, gradients and optimizer state
    # sharded, only rank 0 reads the base, unless every process computes its pairs' reference log-probs first
    on_rank0 = sharded and reference != "precomputed"
    model, base_stage, _ = model_to_tune(base_dir, tok, config, seed, resumed=checkpoint, verbose=run.master,
                                         base_dtype=lora_base_dtype(base_dtype, run), on_rank0=on_rank0)
    model_args = model.args
    block_size = resolve_block_size(block_size, model)
    # the reference: the model DPO starts from, frozen. With LoRA it is the same model with the adapters
    # off; without, a copy, made before any step (and, resuming, from the base again)
    separate_reference = reference == "model" and not lora_rank
    # the plan counts a second model where one lives beside the policy: the copy above, or the base that a
    # resumed run loads again to precompute the reference's log-probs (built as the policy is: same storage)
    second_model = model.num_params() * 4 if separate_reference else \
        stored_bytes(model) if resumed and reference == "precomputed" else 0
    batch_size, gradient_accumulation_steps, plan = preflight(
        model, run, block_size, batch_size, gradient_accumulation_steps, lora_rank=lora_rank,
        base_dtype=lora_base_dtype(base_dtype, run), checkpointing=checkpoint_activations, rows_per_item=2,
        extra_bytes=second_model, fsdp=sharded, memory_gb=device_memory_gb, auto_batch=auto_batch_size)
    config.update(batch_size=batch_size, gradient_accumulation_steps=gradient_accumulation_steps)
    if not on_rank0:  # (else FSDP moves each block to the device as it shards it)
        model.to(run.device)
    ref_model = None
    if separate_reference:
        ref_model, _, _ = model_to_tune(base_dir, tok, dict(config, lora_rank=0), seed)
        ref_model.to(run.device).eval().requires_grad_(False)
    train_data = Pairs(data_dir, "train", block_size, tok, seed)
    test_data = Pairs(data_dir, "test", block_size, tok, seed)
    if nothing_to_do(run, out_dir, iter_num, max_iters, resumed, f" (or run evaluate.py --out_dir={out_dir})"):
        return

    t_ref = time.time()
    ref_train = ref_test = None
    if reference == "precomputed":
        # the model before any DPO step is the reference: the base again when resuming. Before FSDP shards
        # the model: each process computes the pairs it will train on, a number of its own
        # (resuming: built again as the first run had it, a LoRA base stored as then: an int8 one rounds alike)
        reference_model = model if not resumed else model_to_tune(
            base_dir, tok, config, seed, base_dtype=lora_base_dtype(base_dtype, run))[0].to(run.device)
        ref_train, ref_test = precompute_reference(reference_model, train_data, test_data, iter_num, max_iters,
                                                   gradient_accumulation_steps, batch_size, run)
        del reference_model
    t_ref = time.time() - t_ref

    optimizer, scaler = make_optimizer(model, run, sharded, checkpoint, weight_decay, learning_rate, (beta1, beta2))
    checkpoint = None  # its weights and optimizer state now live in model and optimizer
    raw_model = model  # the plain module: what we save and count
    model, eval_model = compile_and_wrap(model, run, sharded, dynamic=True)  # pairs are padded: lengths vary

    decay_iters = lr_decay_iters or max_iters
    if run.master:
        print(f"from {base_dir} ({base_stage}): {raw_model.num_params() / 1e6:.2f}M parameters, "
              f"{'LoRA rank %d on %s: ' % (lora_rank, lora_targets) if lora_rank else ''}"
              f"{raw_model.num_params(trained=True) / 1e6:.2f}M trained; reference {reference}"
              + (f" ({t_ref:.0f}s for the reference's log-probs)" if reference == "precomputed" else ""))
        print(f"data: {len(train_data):,} train pairs ({train_data.skipped} longer than block_size={block_size} "
              f"skipped), {len(test_data):,} test; {batch_size} pairs x {gradient_accumulation_steps} accumulation x "
              f"{run.world_size} processes" + (" (FSDP)" if sharded else "") + f": {max_iters:,} iterations are "
              f"{max_iters * batch_size * gradient_accumulation_steps * run.world_size / len(train_data):.2f} epochs; "
              f"{'resuming at' if resumed else 'starting at'} iteration {iter_num} of {max_iters}")
    logger = open_out_dir(run, out_dir, data_dir, tok, max_iters, resumed, sessions, dict(config, preflight=plan))

    reference_logps = lambda batch: on_the_fly_reference(batch, ref_model, raw_model)  # noqa: E731

    def train_batch(it, micro_step):
        first = stream_position(it, micro_step, run, gradient_accumulation_steps, batch_size)
        batch = to_device(train_data.batch(train_data.pair_ids(first, batch_size)), run)
        if ref_train is not None:
            ref = ref_train[batch["pair_ids"].cpu()]                    # (n, 2)
            batch["ref_logps"] = torch.cat([ref[:, 0], ref[:, 1]]).to(run.device)
        return batch

    def pair_loss(model_, batch):
        ref = batch["ref_logps"] if "ref_logps" in batch else reference_logps(batch)
        return batch_loss(model_, batch, ref, beta, loss_type, label_smoothing, sft_weight)

    def checkpoint_now(it, val_loss):
        save_run(out_dir, raw_model, optimizer, sharded, run, logger, iter_num=it, best_val_loss=val_loss,
                 model_args=vars(model_args), config=config, tokenizer_sha=tok.sha, stage="dpo", base=base_dir)

    # ---- the loop
    model.train()
    t_last = time.time()
    with Stopper(run, out_dir, checkpoint_now, sharded, "held-out DPO loss", best_val_loss) as stopper:
        while stopper.go(iter_num):
            lr = cosine_lr(iter_num, learning_rate, min_lr, warmup_iters, decay_iters)
            apply_schedule(optimizer, lr)

            if stopper.eval_due(iter_num, eval_interval, max_iters, resumed):
                metrics = evaluate_pairs(eval_model, test_data, ref_test, reference_logps, 4 * batch_size, run,
                                         eval_iters)
                if stopper.check_loss(metrics["val_loss"], "held-out DPO loss", iter_num):
                    if run.master:
                        print(f"iter {iter_num}: held-out DPO loss {metrics['val_loss']:.4f}, reward accuracy "
                              f"{metrics['reward_accuracy'] * 100:.1f}%, margin {metrics['reward_margin']:.3f}, "
                              f"log-prob drift chosen {metrics['chosen_drift']:+.2f} rejected "
                              f"{metrics['rejected_drift']:+.2f}")
                        logger.log({"iter": iter_num, **metrics, "time_s": time.time() - stopper.t_start})
                    stopper.evaluated(iter_num, metrics["val_loss"])
            if iter_num >= max_iters:
                break

            seed_step(seed, run.rank, iter_num)
            loss = train_step(model, optimizer, scaler, lambda micro_step: train_batch(iter_num, micro_step),
                              gradient_accumulation_steps, run, grad_clip, loss_fn=pair_loss)
            iter_num += 1
            if run.master:
                logger.first_timing(iter_num, run)

            if run.master and iter_num % log_interval == 0:
                train_loss = loss.item()  # this process's mean over the step's micro-batches
                stopper.check_loss(train_loss, "training DPO loss", iter_num)
                dt = (time.time() - t_last) / log_interval
                t_last = time.time()
                pairs_per_s = batch_size * gradient_accumulation_steps * run.world_size / dt
                print(f"iter {iter_num}: DPO loss {train_loss:.4f}, lr {lr:.2e}, {dt * 1000:.0f} ms/iter, "
                      f"{pairs_per_s:,.0f} pairs/s, ETA {logger.eta(iter_num)}")
                logger.log({"iter": iter_num, "loss": train_loss, "lr": lr, "ms_per_iter": dt * 1000,
                            "pairs_per_s": pairs_per_s})
    if stopper.finished and stopper.saved_iter is not None:
        # the training state goes before the evaluation's models come (closures see these names cleared)
        optimizer = scaler = model = eval_model = ref_model = None
        evaluate.after_training("DPO", None if sharded else raw_model.eval(), out_dir, base_dir, base_stage, tok,
                                data_dir, eval_per_task, run, evaluate_models=evaluate_tasks)


def precompute_reference(reference_model, train_data, test_data, iter_num, max_iters, accumulation, batch_size,
                         run):
    """The reference's answer log-probs (its adapters off) of every test pair and of the training pairs that the
    iterations iter_num .. max_iters - 1 of this process will see: a number of its own under DDP and FSDP."""
    needed = sorted({i for it in range(iter_num, max_iters) for micro in range(accumulation)
                     for i in train_data.pair_ids(stream_position(it, micro, run, accumulation, batch_size),
                                                  batch_size)})
    with adapters_disabled(reference_model):
        return (all_answer_logps(reference_model, train_data, 4 * batch_size, run, needed, "reference: train pairs"),
                all_answer_logps(reference_model, test_data, 4 * batch_size, run, desc="reference: test pairs"))


@torch.no_grad()
def evaluate_pairs(eval_model, test_data, ref_test, reference_logps, batch_size, run, batches=0):
    """Held-out pairs (the first batches x batch_size of them, or every one with batches 0): loss, reward
    accuracy, mean reward margin, and how far the log-probs moved."""
    asked = test_data.fits[:batches * batch_size] if batches else test_data.fits
    policy = all_answer_logps(eval_model, test_data, batch_size, run, list(asked))[asked]
    if ref_test is not None:
        ref = ref_test[asked]
    else:
        ref = torch.zeros_like(policy)
        for i in range(0, len(asked), batch_size):
            ids = list(asked[i:i + batch_size])
            logps = reference_logps(to_device(test_data.batch(ids), run)).float().cpu()
            ref[i:i + len(ids), 0], ref[i:i + len(ids), 1] = logps[:len(ids)], logps[len(ids):]
    eval_model.train()
    return pair_metrics(policy, ref, beta, loss_type, label_smoothing)


if __name__ == "__main__":
    run_main(main)
