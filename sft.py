"""
Instruction-tune a pretrained checkpoint on the chat data prepare_data.py wrote. The loss counts only
answer tokens (and the EOS that ends each answer); prompts and system messages are context.

    python sft.py                                   # the demo: out/ckpt.pt + data/sft_* -> out-sft/
    python sft.py --lora_rank=8                     # train LoRA adapters instead of every weight
    python sft.py --eval_only=True                  # the held-out task evaluation of out-sft and of out
    torchrun --standalone --nproc_per_node=4 sft.py --init_from=out-58m --data_dir=data-belle --out_dir=out-58m-sft

At the end it evaluates the held-out test questions (demo data: sentiment accuracy, idiom-chain
validity, name-extraction F1, exact match on the rest) for the SFT model and for the pretrained
model prompted with the same template, so the gain from SFT is visible.
"""
import json
import math
import os
import shutil
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import configure
from lora import adapter_state_dict, add_lora, merged_state_dict
from model import ModelArgs, Transformer
from tokenizer import Tokenizer
from training import (Logger, check_tokenizer, claim_out_dir, cosine_lr, load_checkpoint, model_from_checkpoint, save_checkpoint,
                      setup_device, stop_if_diverged, train_step)

# -----------------------------------------------------------------------------
# I/O
out_dir = "out-sft"               # SFT checkpoints (ckpt.pt), log.jsonl and eval.json go here
data_dir = "data"                 # prepare_data.py's output: sft_train.*, sft_test.*, tokenizer.model
init_from = "out"                 # a pretraining checkpoint directory, or "resume" to continue out_dir
overwrite = False                 # a new run into an out_dir that holds a checkpoint: replace it (else refused)
eval_interval = 200               # answer loss on the test split and a checkpoint every this many iterations
eval_iters = 20                   # test batches per loss evaluation
log_interval = 25
evaluate_tasks = True             # after training, the held-out task evaluation (SFT model vs pretrained model)
eval_only = False                 # only run the task evaluation of out_dir and its base model, then exit
eval_per_task = 1000              # held-out questions per task in the evaluation (demo: 833 reviews, 200 of the rest); 0: all
# data
batch_size = 4                    # rows per micro-step, per process
packing = True                    # pack several conversations into each row (True) or pad each batch to its longest (False)
gradient_accumulation_steps = 1
# optimization
max_iters = 3200                  # 1.46 epochs of the demo SFT set
learning_rate = 1e-3              # 5e-3: the same sentiment accuracy, but name F1 9% instead of 17% (README)
min_lr = 1e-4
warmup_iters = 30
lr_decay_iters = None             # None: max_iters
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
dropout = 0.0
# LoRA
lora_rank = 0                     # 0: full fine-tuning; > 0: freeze the model and train rank-r adapters
lora_alpha = 16.0
lora_dropout = 0.0
lora_targets = "wq,wk,wv,wo,w1,w2,w3"
# system
device = "auto"
dtype = "auto"
compile = None                    # None: on for CUDA, off elsewhere
seed = 1337
# -----------------------------------------------------------------------------


class Conversations:
    """
    One SFT split: tokenized conversations with their loss masks, memory-mapped, served as an endless
    stream of rows in which every conversation appears exactly once per epoch, in a shuffled order.
    Packed: each row (block_size tokens) holds several whole conversations; padded: one per row.
    """

    OPEN_ROWS = 8  # packing fills the first of this many open rows with room: rows ~97% full instead of ~80%

    def __init__(self, data_dir, split, block_size, tok, packed=True, seed=0):
        prefix = os.path.join(data_dir, f"sft_{split}")
        if not os.path.exists(prefix + "_index.npy"):
            raise SystemExit(f"error: no SFT {split} data in {data_dir}/; run `python prepare_data.py` "
                             f"(with --sft_input=... for your own conversations)")
        with open(prefix + ".json") as f:
            check_tokenizer(json.load(f)["tokenizer_sha"], tok.sha, prefix + ".bin")
        self.tokens_path, self.mask_path = prefix + ".bin", prefix + "_mask.bin"
        self.block_size, self.packed, self.seed = block_size, packed, seed
        index = np.load(prefix + "_index.npy")
        starts, ends = index[:-1].copy(), index[1:].copy()
        # a conversation of L tokens gives L - 1 predictions; one longer than block_size is cut after
        # its last whole answer that fits (each user turn starts with BOS), or skipped
        tokens, mask = self._maps()
        self.cut = self.skipped = 0
        for i in np.flatnonzero(ends - starts - 1 > block_size):
            bos = starts[i] + np.flatnonzero(tokens[starts[i]:ends[i]] == tok.bos_id)
            fits = bos[(bos > starts[i]) & (bos - starts[i] - 1 <= block_size)]
            if len(fits) and mask[starts[i]:fits[-1]].any():
                ends[i], self.cut = fits[-1], self.cut + 1
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
        return np.memmap(self.tokens_path, dtype=np.uint16, mode="r"), np.memmap(self.mask_path, dtype=np.uint8, mode="r")

    def __len__(self):
        return len(self.starts)

    def _lay_out(self, epoch):
        """
        Every conversation once, shuffled anew each epoch. Packed, each goes into the first of the open
        rows with room for it. (Drawing conversations at random until one does not fit would train a
        200-token conversation 3x less often than a 30-token one: measured on the demo data.)
        """
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


# ---------------------------------------------------------------------------- the task evaluation

def parse_names(text):
    """{(kind, name)} from an answer like '人名：江泽民\\n地名：香港、澳门\\n机构名：无'."""
    names = set()
    for line in text.split("\n"):
        kind, _, rest = line.partition("：")
        if kind in ("人名", "地名", "机构名"):
            names |= {(kind, n.strip()) for n in rest.split("、") if n.strip() and n.strip() != "无"}
    return names


def score(task, question, reference, prediction, idioms):
    """
    One held-out answer's score in [0, 1]. sentiment: the label; chain: any real idiom that starts with
    the question idiom's last character; ner: F1 of the (kind, name) pairs; every other task: exact match.
    """
    prediction, reference = prediction.strip(), reference.strip()
    if task == "chain":
        first = question.split("：", 1)[1].strip()
        return float(prediction in idioms and prediction[0] == first[-1] and prediction != first)
    if task == "ner":
        got, want = parse_names(prediction), parse_names(reference)
        if not got and not want:
            return float(prediction == reference)
        hits = len(got & want)
        return 2 * hits / (len(got) + len(want))
    return float(prediction == reference)


METRIC_NAMES = {"sentiment": "accuracy", "chain": "valid idiom rate", "ner": "name F1"}


def evaluate_on_tasks(model, tok, tests, idioms, device_, per_task, batch_size=32):
    """
    Greedy answers to the held-out questions; returns {task: (mean score, n)}. Questions whose prompts
    have the same number of tokens are answered together in one batch: no padding, so each answer is
    the one the model gives to that question alone (up to float rounding; on the demo checkpoint, the
    same 83.5% as one question at a time, 6x faster).
    """
    model.eval()
    by_task = {}
    for t in tests:
        by_task.setdefault(t.get("task", "exact"), []).append(t)
    results = {}
    for task, examples in sorted(by_task.items()):
        by_length, n, too_long = {}, 0, 0  # prompt length -> [(prompt ids, answer budget, question, reference)]
        for t in examples:
            if per_task and n == per_task:
                break
            *context, answer = t["messages"]
            ids, _ = tok.encode_chat(context)
            budget = len(tok.encode(answer["content"])) + 8  # room for the answer and a little more
            if len(ids) + budget > model.args.max_seq_len:  # skipped, as in training: a cut prompt loses the question
                too_long += 1
                continue
            by_length.setdefault(len(ids), []).append((ids, budget, context[-1]["content"], answer["content"]))
            n += 1
        scores = []
        for group in by_length.values():
            for i in range(0, len(group), batch_size):
                chunk = group[i:i + batch_size]
                prompts = torch.tensor([ids for ids, *_ in chunk], device=device_)
                answers, done = [[] for _ in chunk], [False] * len(chunk)
                for step in model.generate(prompts, max(b for _, b, *_ in chunk), temperature=0,
                                           stop_tokens=(tok.eos_id, tok.bos_id)):
                    for r, token in enumerate(step.tolist()):
                        if done[r] or token in (tok.eos_id, tok.bos_id) or len(answers[r]) == chunk[r][1]:
                            done[r] = True
                        else:
                            answers[r].append(token)
                    if all(done):
                        break
                scores += [score(task, question, reference, tok.decode(out), idioms)
                           for (_, _, question, reference), out in zip(chunk, answers)]
        if too_long:
            print(f"  {task}: {too_long} question(s) longer than the context skipped")
        if scores:
            results[task] = (float(np.mean(scores)), len(scores))
    return results


def load_idioms():
    """The idiom list that judges idiom-chain answers (empty when the demo package is missing)."""
    try:
        from prepare_data import demo_idioms
        return set(demo_idioms())
    except SystemExit:
        return set()


def print_comparison(results):
    names = list(results)
    tasks = sorted({task for r in results.values() for task in r})
    print(f"{'task (metric)':<28}" + "".join(f"{n:>18}" for n in names))
    for task in tasks:
        label = f"{task} ({METRIC_NAMES.get(task, 'exact match')})"
        cells = "".join(f"{results[n][task][0] * 100:>13.1f}% n={results[n][task][1]:<3}" if task in results[n] else f"{'-':>18}"
                        for n in names)
        print(f"{label:<28}{cells}")


def run_evaluation(sft_model, base_model, tok, device_):
    path = os.path.join(data_dir, "sft_test.jsonl")
    if not os.path.exists(path):
        print(f"no {path}: skipping the task evaluation")
        return None
    with open(path, encoding="utf-8") as f:
        tests = [json.loads(line) for line in f]
    idioms = load_idioms()
    results, t0 = {}, time.time()
    for name, m in (("pretrained", base_model), ("SFT", sft_model)):
        if m is not None:
            results[name] = evaluate_on_tasks(m, tok, tests, idioms, device_, eval_per_task)
    print(f"held-out task evaluation ({time.time() - t0:.0f}s, greedy, the same chat template for both):")
    print_comparison(results)
    with open(os.path.join(out_dir, "eval.json"), "w") as f:
        json.dump({n: {t: {"score": s, "n": k} for t, (s, k) in r.items()} for n, r in results.items()}, f, indent=1)
    return results


# ---------------------------------------------------------------------------- training

def main():
    config = configure(globals())
    if not eval_only:
        resume = init_from == "resume"
        claim_out_dir(out_dir, fresh=not resume, overwrite=overwrite, init_from=None if resume else init_from)
    sys_ = setup_device(device, dtype, compile)
    master, device_type, world_size = sys_["master"], sys_["device_type"], sys_["world_size"]
    torch.manual_seed(seed + sys_["rank"])
    tok = Tokenizer(os.path.join(data_dir, "tokenizer.model"))

    if eval_only:
        checkpoint = load_checkpoint(out_dir)
        check_tokenizer(checkpoint["tokenizer_sha"], tok.sha, f"{out_dir}/ckpt.pt")
        base = checkpoint.get("base") or (init_from if init_from != "resume" else None)
        base_model = model_from_checkpoint(load_checkpoint(base), sys_["device"]) if base else None
        run_evaluation(model_from_checkpoint(checkpoint, sys_["device"]), base_model, tok, sys_["device"])
        return

    # ---- the model: the pretrained checkpoint, or our own to resume
    resume = init_from == "resume"
    checkpoint = load_checkpoint(out_dir, sys_["device"]) if resume else None
    base_dir = checkpoint["base"] if resume else init_from
    base = load_checkpoint(base_dir, sys_["device"])
    check_tokenizer(base["tokenizer_sha"], tok.sha, f"{base_dir}/ckpt.pt")
    model_args = ModelArgs(**dict(base["model_args"], dropout=dropout))
    model = Transformer(model_args)
    model.load_state_dict(base["model"])
    # a resumed run keeps the adapters it was started with
    lora = {k: (checkpoint["config"] if resume else config)[k] for k in ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")}
    use_lora = lora["lora_rank"] > 0
    if use_lora:
        add_lora(model, set(lora["lora_targets"].split(",")), lora["lora_rank"], lora["lora_alpha"], lora["lora_dropout"])
        if resume:
            model.load_state_dict(checkpoint["lora"], strict=False)
    elif resume:
        model.load_state_dict(checkpoint["model"])
    model.to(sys_["device"])
    block_size = model_args.max_seq_len
    train_data = Conversations(data_dir, "train", block_size, tok, packing, seed)
    test_data = Conversations(data_dir, "test", block_size, tok, packing, seed)

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": weight_decay},
                                   {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=learning_rate, betas=(beta1, beta2), fused=device_type == "cuda")
    iter_num, best_val_loss = 0, float("inf")
    if resume:
        optimizer.load_state_dict(checkpoint["optimizer"])
        torch.set_rng_state(checkpoint["torch_rng"].cpu())
        iter_num, best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
    scaler = torch.amp.GradScaler(device_type, enabled=sys_["dtype"] == "float16")
    raw_model = model
    if sys_["compile"]:
        model = torch.compile(model, dynamic=not packing)  # padded batches change length every step
    eval_model = model
    if sys_["ddp"]:
        model = DDP(model, device_ids=[sys_["local_rank"]] if device_type == "cuda" else None, broadcast_buffers=False)

    decay_iters = lr_decay_iters or max_iters
    if master:
        n_train = sum(p.numel() for p in trainable)
        print(f"from {base_dir}/ckpt.pt: {raw_model.num_params() / 1e6:.2f}M parameters, "
              f"{'LoRA rank %d on %s: ' % (lora['lora_rank'], lora['lora_targets']) if use_lora else ''}{n_train / 1e6:.2f}M trained")
        print(f"data: {len(train_data):,} train conversations ({train_data.cut} cut at a turn boundary, "
              f"{train_data.skipped} skipped: longer than block_size={block_size}), {len(test_data):,} test; "
              f"{'packed' if packing else 'padded'} batches of {batch_size} x {gradient_accumulation_steps} "
              f"accumulation x {world_size} processes")
        rows_per_epoch = len(train_data.rows_of_epoch(0))
        print(f"{rows_per_epoch:,} rows per epoch: {max_iters:,} iterations are "
              f"{max_iters * batch_size * gradient_accumulation_steps * world_size / rows_per_epoch:.2f} epochs")
        os.makedirs(out_dir, exist_ok=True)
        if os.path.abspath(data_dir) != os.path.abspath(out_dir):
            shutil.copyfile(tok.model_path, os.path.join(out_dir, "tokenizer.model"))
    logger = Logger(out_dir, max_iters, resume=resume) if master else None

    def to_device(batch):
        out = {}
        for k, v in batch.items():
            t = torch.from_numpy(v)
            out[k] = t.pin_memory().to(sys_["device"], non_blocking=True) if device_type == "cuda" else t.to(sys_["device"])
        return out

    answer_tokens = [0]  # answer tokens trained on since the last log line

    def train_batch(it, micro_step):
        # each process takes its own rows of the one stream: (iteration, process, micro-step, row)
        first_row = ((it * world_size + sys_["rank"]) * gradient_accumulation_steps + micro_step) * batch_size
        batch = train_data.batch(first_row, batch_size)
        answer_tokens[0] += int(batch["loss_mask"].sum())
        return to_device(batch)

    @torch.no_grad()
    def evaluate_loss():
        eval_model.eval()
        losses = []
        for k in range(eval_iters):
            batch = to_device(test_data.batch(k * batch_size, batch_size))
            with sys_["autocast"]:
                _, loss = eval_model(**batch)
            losses.append(loss.item())
        eval_model.train()
        return float(np.mean(losses))

    def checkpoint_now(it, val_loss):
        save_checkpoint(os.path.join(out_dir, "ckpt.pt"), {
            "model": merged_state_dict(raw_model) if use_lora else raw_model.state_dict(),
            "lora": adapter_state_dict(raw_model) if use_lora else None,
            "optimizer": optimizer.state_dict(), "model_args": vars(model_args), "iter_num": it,
            "best_val_loss": val_loss if math.isfinite(val_loss) else best_val_loss, "config": config,
            "tokenizer_sha": tok.sha, "world_size": world_size, "torch_rng": torch.get_rng_state(),
            "stage": "sft", "base": base_dir,
        })
        logger.commit()

    model.train()
    t_last, t_start, start_iter = time.time(), time.time(), iter_num
    try:
        while True:
            lr = cosine_lr(iter_num, learning_rate, min_lr, warmup_iters, decay_iters)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if master and (iter_num % eval_interval == 0 or iter_num == max_iters) and (iter_num > start_iter or not resume):
                val_loss = evaluate_loss()
                stop_if_diverged(val_loss, "test answer loss", iter_num, out_dir)
                print(f"iter {iter_num}: test answer loss {val_loss:.4f}")
                logger.log({"iter": iter_num, "val_loss": val_loss, "time_s": time.time() - t_start})
                best_val_loss = min(best_val_loss, val_loss)
                if iter_num > 0:
                    checkpoint_now(iter_num, val_loss)
            if iter_num >= max_iters:
                break
            loss = train_step(model, optimizer, scaler, lambda micro_step: train_batch(iter_num, micro_step),
                              gradient_accumulation_steps, sys_["autocast"], sys_["ddp"], grad_clip)
            iter_num += 1
            if master and iter_num % log_interval == 0:
                train_loss = loss.item()
                stop_if_diverged(train_loss, "training loss", iter_num, out_dir)
                dt = (time.time() - t_last) / log_interval
                t_last = time.time()
                answers_per_s = answer_tokens[0] * world_size / (dt * log_interval)
                answer_tokens[0] = 0
                print(f"iter {iter_num}: answer loss {train_loss:.4f}, lr {lr:.2e}, {dt * 1000:.0f} ms/iter, "
                      f"{answers_per_s:,.0f} answer tokens/s, ETA {logger.eta(iter_num)}")
                logger.log({"iter": iter_num, "loss": train_loss, "lr": lr, "ms_per_iter": dt * 1000,
                            "answer_tokens_per_s": answers_per_s})
    except KeyboardInterrupt:
        if master:
            optimizer.zero_grad(set_to_none=True)
            checkpoint_now(iter_num, float("nan"))
            print(f"\ninterrupted: saved {out_dir}/ckpt.pt at iteration {iter_num}; continue with --init_from=resume")
        return
    finally:
        if sys_["ddp"]:
            dist.destroy_process_group()
    if not master:
        return
    print(f"done: {iter_num} iterations in {(time.time() - t_start) / 60:.1f} min, best test answer loss "
          f"{best_val_loss:.4f}; checkpoint in {out_dir}/ckpt.pt")
    if evaluate_tasks:
        sft_model = model_from_checkpoint(load_checkpoint(out_dir, sys_["device"]), sys_["device"])
        base_model = model_from_checkpoint(base, sys_["device"])
        run_evaluation(sft_model, base_model, tok, sys_["device"])


if __name__ == "__main__":
    main()
