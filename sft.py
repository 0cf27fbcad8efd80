"""
Instruction-tune a pretrained checkpoint on the chat data prepare_data.py wrote. The loss counts only
answer tokens (and the EOS that ends each answer); prompts and system messages are context.

    python sft.py                                   # the demo: out/ckpt.pt + data/sft_* -> out-sft/
    python sft.py --lora_rank=8 --out_dir=out-lora  # train LoRA adapters instead of every weight
    torchrun --standalone --nproc_per_node=4 sft.py --init_from=out-58m --data_dir=data-belle --out_dir=out-58m-sft

At the end it runs evaluate.py's held-out task evaluation (demo data: sentiment accuracy, idiom-chain
validity, name-extraction F1, exact match on the rest) for the SFT model and for the pretrained
model prompted with the same template, so the gain from SFT is visible. Ctrl-C (or SIGTERM) saves
at the end of the current iteration.
"""
import glob
import os
import time

import numpy as np
import torch

import evaluate
from checkpoint import model_to_tune
from configurator import check_ranges, configure
from device import run_main, setup_device
from memory import preflight
from model import answer_loss, peak_flops
from shards import TokenShards, masked_split
from tokenizer import Tokenizer, turn_boundary_cut
from training import (MUON_UNDER_FSDP, Stopper, apply_schedule, claim_out_dir, compile_and_wrap, cosine_lr,
                      lora_base_dtype, make_optimizer, nothing_to_do, open_out_dir, resolve_block_size, resume,
                      save_run, seed_step, stream_position, to_device, train_step)

# -----------------------------------------------------------------------------
# I/O
out_dir = "out-sft"               # SFT checkpoint (ckpt.pt), log.jsonl and eval.json go here
data_dir = "data"                 # prepare_data.py's output: sft_train.*, sft_test.*, tokenizer.model
init_from = "out"                 # the model to tune: a checkpoint directory, a Hugging Face or Meta Llama directory,
                                  # a llama2.c .bin; or "resume" to continue out_dir
overwrite = False                 # a new run into an out_dir that holds a checkpoint: replace it (else refused)
eval_interval = 200               # answer loss on the test split and a checkpoint every this many iterations
eval_iters = 20                   # test batches per loss evaluation
log_interval = 25                 # iterations per log line
log_to = ""                       # also log to "wandb" and/or "tensorboard" (a comma list; tracking.py)
run_name = ""                     # the tracked run's name; "": out_dir's
wandb_project = "llama2.zh"       # the wandb project the run goes to
evaluate_tasks = True             # after training, the held-out tasks and the built-in benchmark (SFT beside
                                  # pretrained) for the report card, out_dir/report.md; False: the card from the logs
eval_per_task = 1000              # held-out questions per task in that evaluation; 0: all
# data
block_size: int = None            # tokens per row; None: the model's context
batch_size = 4                    # rows per micro-step, per process
packing = True                    # pack several conversations into each row (True) or pad each batch to its longest
replay_rows = 1                   # rows of pretraining text (data_dir's train_*.bin) added to each micro-batch, every
                                  # token trained: SFT forgets less of what pretraining taught; 0: none
gradient_accumulation_steps = 1   # micro-steps per optimizer step, per process
# optimization
max_iters = 2450                  # 1.12 epochs of the demo SFT set, beside replay_rows of pretraining text
learning_rate = 1e-3              # higher rates undo what pretraining taught (docs/experiments.md)
min_lr = 1e-4                     # at the end of the cosine decay
warmup_iters = 30                 # iterations of linear warmup to learning_rate
lr_decay_iters: int = None        # None: max_iters
weight_decay = 0.0                # decoupled AdamW weight decay
muon = False                      # Muon for the blocks' matrices, AdamW for the rest, as pretraining (not with LoRA
                                  # or FSDP); False: AdamW for all (docs/experiments.md)
beta1 = 0.9                       # AdamW: decay of the first moment
beta2 = 0.95                      # and of the second moment
grad_clip = 1.0                   # clip the gradient norm at this; 0 disables
dropout = 0.0                     # regularizing SFT did not help the demo (docs/experiments.md)
# LoRA
lora_rank = 0                     # 0: full fine-tuning; > 0: freeze the model and train rank-r adapters
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
compile: bool = None              # torch.compile; None: on for CUDA, off elsewhere
auto_batch_size = False           # pre-flight: the largest micro-batch that fits, same batch_size x accumulation
device_memory_gb = 0.0            # pre-flight: plan for this much memory per device (GB); 0: what the device has free
seed = 1337                       # batch order and any dropout
# -----------------------------------------------------------------------------

# settings a resumed run takes from its checkpoint, whatever the command line says
FIXED_ON_RESUME = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "train_embeddings", "dropout",
                   "block_size", "base_dtype", "muon")


class Conversations:
    """One SFT split, memory-mapped: conversations with their loss masks as an endless stream of rows, each
    conversation once per epoch, shuffled; packed, a row (block_size tokens) holds several, padded one."""

    OPEN_ROWS = 8  # packing fills the first of this many open rows with room, so rows are nearly full

    def __init__(self, data_dir, split, block_size, tok, packed=True, seed=0):
        prefix, index = masked_split(data_dir, "sft", split, tok, "conversations")
        self.tokens_path, self.mask_path = prefix + ".bin", prefix + "_mask.bin"
        self.block_size, self.packed, self.seed = block_size, packed, seed
        starts, ends = index[:-1].copy(), index[1:].copy()
        # a conversation of L tokens gives L - 1 predictions; one longer than block_size is cut after
        # its last whole answer that fits, or skipped
        tokens, mask = self._maps()
        self.cut = self.skipped = 0
        for i in np.flatnonzero(ends - starts - 1 > block_size):
            cut = turn_boundary_cut(tokens[starts[i]:ends[i]], tok.bos_id, block_size + 1)
            if cut and mask[starts[i]:starts[i] + cut].any():
                ends[i], self.cut = starts[i] + cut, self.cut + 1
            else:
                ends[i], self.skipped = starts[i], self.skipped + 1
        keep = ends > starts
        self.starts, self.ends = starts[keep], ends[keep]
        if not len(self.starts):
            raise SystemExit(f"error: no SFT {split} conversation fits block_size={block_size}")
        self.rows_per_epoch = []  # of the epochs laid out so far
        self.layout = (None, None)  # (epoch, its rows)

    def _maps(self):
        # fresh memmaps per batch: a long-lived one keeps every page it touched in RSS
        return (np.memmap(self.tokens_path, dtype=np.uint16, mode="r"),
                np.memmap(self.mask_path, dtype=np.uint8, mode="r"))

    def __len__(self):
        return len(self.starts)

    def _lay_out(self, epoch):
        """Every conversation once, shuffled anew each epoch; packed, each into the first open row with room (drawing
        at random until one does not fit trained long ones several times less often: docs/experiments.md)."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self))
        if not self.packed:
            return [[i] for i in order]
        lengths = self.ends - self.starts - 1
        rows, open_rows = [], []  # open_rows: [room left, conversation indices]
        for i in order:
            n = lengths[i]
            for row in open_rows:
                if row[0] >= n:
                    row[0] -= n
                    row[1].append(i)
                    break
            else:
                open_rows.append([self.block_size - n, [i]])
                if len(open_rows) > self.OPEN_ROWS:
                    rows.append(open_rows.pop(0)[1])
        return rows + [row for _, row in open_rows]

    def rows_of_epoch(self, epoch):
        """The rows of one epoch, each a list of conversation indices (the latest epoch's are kept)."""
        if self.layout[0] != epoch:
            self.layout = (epoch, self._lay_out(epoch))
        return self.layout[1]

    def row(self, r):
        """Row r of the endless stream: the rows of epoch 0, then those of epoch 1, and so on."""
        epoch = 0
        while True:
            if epoch == len(self.rows_per_epoch):
                self.rows_per_epoch.append(len(self.rows_of_epoch(epoch)))
            if r < self.rows_per_epoch[epoch]:
                return self.rows_of_epoch(epoch)[r]
            r -= self.rows_per_epoch[epoch]
            epoch += 1

    def batch(self, first_row, batch_size):
        """
        Rows first_row .. first_row + batch_size - 1 as model inputs, numpy arrays: tokens, targets
        (-1 on padding) and loss_mask, each (B, T); T = block_size packed, else the longest in the batch.
        Packed batches add positions (restarting at 0 per conversation) and attn_mask (B, 1, T, T).
        """
        tokens, mask = self._maps()
        rows = [self.row(first_row + b) for b in range(batch_size)]
        T = self.block_size if self.packed else max(self.ends[row[0]] - self.starts[row[0]] - 1 for row in rows)
        x = np.zeros((batch_size, T), dtype=np.int64)
        y = np.full((batch_size, T), -1, dtype=np.int64)
        m = np.zeros((batch_size, T), dtype=np.float32)
        pos = np.zeros((batch_size, T), dtype=np.int64)
        seg = np.full((batch_size, T), -1, dtype=np.int64)  # padding is its own segment
        for b, row in enumerate(rows):
            at = 0
            for k, i in enumerate(row):
                ids = tokens[self.starts[i]:self.ends[i]].astype(np.int64)
                n = len(ids) - 1
                x[b, at:at + n], y[b, at:at + n] = ids[:-1], ids[1:]
                m[b, at:at + n] = mask[self.starts[i] + 1:self.ends[i]]  # the mask of the predicted token
                pos[b, at:at + n], seg[b, at:at + n] = np.arange(n), k
                at += n
        batch = {"tokens": x, "targets": y, "loss_mask": m}
        if self.packed:
            causal = np.tril(np.ones((T, T), dtype=bool))
            batch["positions"] = pos
            batch["attn_mask"] = ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]  # (B, 1, T, T)
        return batch


def with_text_rows(batch, windows):
    """A conversation batch (Conversations.batch) with plain-text rows appended: windows (R, T + 1), every
    token trained, positions from 0 and one causal segment per row."""
    R, T = windows.shape[0], windows.shape[1] - 1
    rows = {"tokens": windows[:, :-1], "targets": windows[:, 1:], "loss_mask": np.ones((R, T), dtype=np.float32)}
    if "positions" in batch:
        rows["positions"] = np.broadcast_to(np.arange(T), (R, T))
        rows["attn_mask"] = np.broadcast_to(np.tril(np.ones((T, T), dtype=bool)), (R, 1, T, T))
    return {key: np.concatenate([batch[key], rows[key]]) for key in batch}


def pretraining_text(data_dir, tok, run):
    """The pretraining text SFT replays (shards.TokenShards), or None with a note where data_dir has none."""
    if glob.glob(os.path.join(data_dir, "train_[0-9][0-9][0-9].bin")):
        return TokenShards(data_dir, "train", tok.sha)
    if run.master:
        print(f"note: {data_dir}/ holds no pretraining text (train_*.bin) to replay: SFT on the conversations alone")
    return None


def main():
    global batch_size, gradient_accumulation_steps, block_size  # auto_batch_size, and the model's context
    config = configure(globals())
    check_ranges(config, at_least_1=("batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters",
                                     "log_interval", "block_size"),
                 at_least_0=("max_iters", "warmup_iters", "lr_decay_iters", "min_lr", "weight_decay", "grad_clip",
                             "dropout", "lora_rank", "lora_dropout", "eval_per_task", "replay_rows"),
                 positive=("learning_rate",))
    lora_base_dtype(base_dtype)  # a bad --base_dtype is refused before anything is touched
    if fsdp and muon and not lora_rank and init_from != "resume":
        raise SystemExit(MUON_UNDER_FSDP)
    resumed = init_from == "resume"
    claim_out_dir(out_dir, fresh=not resumed, overwrite=overwrite, init_from=None if resumed else init_from)
    run = setup_device(device, dtype, compile)
    torch.manual_seed(seed + run.rank)
    tok = Tokenizer(os.path.join(data_dir, "tokenizer.model"))

    # ---- the model: the pretrained checkpoint, or our own to resume (LoRA and the row length as it was started)
    checkpoint, iter_num, best_val_loss, sessions = resume(resumed, out_dir, "sft", tok, run, globals(), config,
                                                           FIXED_ON_RESUME)
    answers_seen = checkpoint.get("answer_tokens", 0) if resumed else 0
    base_dir = checkpoint["base"] if resumed else init_from
    sharded = fsdp and run.ddp  # FSDP: each process holds a shard of the weights, gradients and optimizer state
    model, base_stage, _ = model_to_tune(base_dir, tok, config, seed, resumed=checkpoint, verbose=run.master,
                                         base_dtype=lora_base_dtype(base_dtype, run), on_rank0=sharded)
    model_args = model.args
    block_size = resolve_block_size(block_size, model)
    replay_text = pretraining_text(data_dir, tok, run) if replay_rows else None
    batch_size, gradient_accumulation_steps, plan = preflight(
        model, run, block_size, batch_size, gradient_accumulation_steps, lora_rank=lora_rank,
        base_dtype=lora_base_dtype(base_dtype, run), checkpointing=checkpoint_activations,
        fsdp=sharded, memory_gb=device_memory_gb, auto_batch=auto_batch_size,
        extra_rows=replay_rows if replay_text else 0)
    config.update(batch_size=batch_size, gradient_accumulation_steps=gradient_accumulation_steps)
    if not sharded:  # FSDP moves each block to the device as it shards it: never the whole model on one device
        model.to(run.device)
    train_data = Conversations(data_dir, "train", block_size, tok, packing, seed)
    test_data = Conversations(data_dir, "test", block_size, tok, packing, seed)

    optimizer, scaler = make_optimizer(model, run, sharded, checkpoint, weight_decay, learning_rate, (beta1, beta2),
                                       muon and not lora_rank)
    checkpoint = None  # its weights and optimizer state now live in model and optimizer
    raw_model = model  # the plain module: what we save and count
    model, eval_model = compile_and_wrap(model, run, sharded, dynamic=not packing)  # padded: lengths vary

    decay_iters = lr_decay_iters or max_iters
    peak = peak_flops(torch.cuda.get_device_name()) if run.device_type == "cuda" else None  # for MFU
    if run.master:
        print(f"from {base_dir} ({base_stage}): {raw_model.num_params() / 1e6:.2f}M parameters, "
              f"{'LoRA rank %d on %s: ' % (lora_rank, lora_targets) if lora_rank else ''}"
              f"{raw_model.num_params(trained=True) / 1e6:.2f}M trained"
              + (" (with the embeddings in full)" if lora_rank and raw_model.tok_embeddings.weight.requires_grad
                 else ""))
        print(f"data: {len(train_data):,} train conversations ({train_data.cut} cut at a turn boundary, "
              f"{train_data.skipped} skipped: longer than block_size={block_size}), {len(test_data):,} test; "
              f"{'packed' if packing else 'padded'} batches of {batch_size} x {gradient_accumulation_steps} "
              f"accumulation x {run.world_size} processes" + (" (FSDP)" if sharded else ""))
        rows_per_epoch = len(train_data.rows_of_epoch(0))
        print(f"{rows_per_epoch:,} rows per epoch: {max_iters:,} iterations are "
              f"{max_iters * batch_size * gradient_accumulation_steps * run.world_size / rows_per_epoch:.2f} epochs; "
              f"{'resuming at' if resumed else 'starting at'} iteration {iter_num} of {max_iters}")
    if nothing_to_do(run, out_dir, iter_num, max_iters, resumed, f" (or run evaluate.py --out_dir={out_dir})"):
        return
    logger = open_out_dir(run, out_dir, data_dir, tok, max_iters, resumed, sessions, dict(config, preflight=plan))
    answer_tokens = [0, answers_seen]  # answer tokens trained on: since the last log line, and in the whole run

    def train_batch(it, micro_step):
        batch = train_data.batch(stream_position(it, micro_step, run, gradient_accumulation_steps, batch_size),
                                 batch_size)
        answer_tokens[0] += int(batch["loss_mask"].sum())
        if replay_text is not None:  # a function of (seed, iteration, micro-batch): resumes exactly
            rng = np.random.default_rng([seed, 2, it, run.rank * gradient_accumulation_steps + micro_step])
            batch = with_text_rows(batch, replay_text.batch(rng, replay_rows, batch["tokens"].shape[1]))
        return to_device(batch, run)

    @torch.no_grad()
    def evaluate_loss():
        eval_model.eval()
        losses = []
        for k in range(eval_iters):  # the same test batches at every evaluation
            batch = to_device(test_data.batch(k * batch_size, batch_size), run)
            with run.autocast:
                loss = answer_loss(eval_model, batch)
            losses.append(loss.item())
        eval_model.train()
        return float(np.mean(losses))

    def checkpoint_now(it, val_loss):
        save_run(out_dir, raw_model, optimizer, sharded, run, logger, iter_num=it, best_val_loss=val_loss,
                 model_args=vars(model_args), config=config, tokenizer_sha=tok.sha, stage="sft", base=base_dir,
                 answer_tokens=answer_tokens[1] + answer_tokens[0] * run.world_size)

    # ---- the loop
    model.train()
    t_last = time.time()
    with Stopper(run, out_dir, checkpoint_now, sharded, "test answer loss", best_val_loss) as stopper:
        while stopper.go(iter_num):
            lr = cosine_lr(iter_num, learning_rate, min_lr, warmup_iters, decay_iters)
            apply_schedule(optimizer, lr)

            if stopper.eval_due(iter_num, eval_interval, max_iters, resumed):
                val_loss = evaluate_loss()
                if stopper.check_loss(val_loss, "test answer loss", iter_num):
                    if run.master:
                        print(f"iter {iter_num}: test answer loss {val_loss:.4f}")
                        seen = answer_tokens[1] + answer_tokens[0] * run.world_size  # to this iteration
                        logger.log({"iter": iter_num, "tokens": seen, "val_loss": val_loss,
                                    "time_s": time.time() - stopper.t_start})
                    stopper.evaluated(iter_num, val_loss)
            if iter_num >= max_iters:
                break

            seed_step(seed, run.rank, iter_num)
            loss = train_step(model, optimizer, scaler, lambda micro_step: train_batch(iter_num, micro_step),
                              gradient_accumulation_steps, run, grad_clip, count=lambda b: b["loss_mask"].sum(),
                              loss_fn=answer_loss)
            iter_num += 1
            if run.master:
                logger.first_timing(iter_num, run)

            if run.master and iter_num % log_interval == 0:
                train_loss = loss.item()  # this process's mean over the step's micro-batches
                stopper.check_loss(train_loss, "training loss", iter_num)
                dt = (time.time() - t_last) / log_interval
                t_last = time.time()
                answers_per_s = answer_tokens[0] * run.world_size / (dt * log_interval)
                answer_tokens[1] += answer_tokens[0] * run.world_size
                answer_tokens[0] = 0
                # MFU over every position computed (packed rows are full); padded rows vary, so no MFU there
                rows = batch_size + (replay_rows if replay_text else 0)
                tokens_per_s = rows * block_size * gradient_accumulation_steps * run.world_size / dt
                mfu = raw_model.flops_per_token(block_size) * tokens_per_s / (peak * run.world_size) \
                    if peak and packing else None
                print(f"iter {iter_num}: {'loss (answers and replayed text)' if replay_text else 'answer loss'} "
                      f"{train_loss:.4f}, lr {lr:.2e}, {dt * 1000:.0f} ms/iter, "
                      f"{answers_per_s:,.0f} answer tokens/s" + (f", MFU {mfu * 100:.1f}%" if mfu else "")
                      + f", ETA {logger.eta(iter_num)}")
                logger.log({"iter": iter_num, "tokens": answer_tokens[1], "loss": train_loss, "lr": lr,
                            "ms_per_iter": dt * 1000, "answer_tokens_per_s": answers_per_s, "mfu": mfu})
    if stopper.finished and stopper.saved_iter is not None:
        # the training state goes before the evaluation's models come (closures see these names cleared)
        optimizer = scaler = model = eval_model = None
        evaluate.after_training("SFT", None if sharded else raw_model.eval(), out_dir, base_dir, base_stage, tok,
                                data_dir, eval_per_task, run, evaluate_models=evaluate_tasks)


if __name__ == "__main__":
    run_main(main)
