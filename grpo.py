"""
Reinforcement learning with verifiable rewards (GRPO): the model answers each training question several
times, a program checks every answer (a verifier), and the answers that scored above their group's mean
become more likely, those below less, against a frozen reference (the model it starts from) so that it
moves no further than the rewards ask. No human labels, no reward model: the demo's own checkers.

    python grpo.py                                     # the demo: out-sft -> out-grpo/, then the evaluation
    python grpo.py --init_from=out-dpo --tasks=sentiment
    python grpo.py --questions=numerals.jsonl --verifier=my_checks:numerals   # your own task and checker

Each iteration: batch_size training questions, group_size answers to each, sampled by engine.py's batched
decoding engine (serve.py's) at `temperature`; each answer's reward in [0, 1] comes from the verifier, a
function (question, answer, reference) -> float: demo.score for the demo tasks (sentiment label, name F1,
idiom chain, exact pinyin), or `--verifier=module:function`. The objective, per answer token:

    advantage = reward - the mean reward of its group
    loss      = -min(ratio * advantage, clip(ratio, 1 - clip_eps, 1 + clip_eps) * advantage) + kl_coef * KL

ratio = p_policy / p_sampling (1 when a rollout batch is used once, ppo_epochs=1; then the loss is plain
policy gradient), KL the k3 estimate exp(r) - r - 1 with r = log p_reference - log p_policy (never negative,
zero with zero gradient where the two agree). The advantage is not divided by the group's standard
deviation, and the loss is summed over tokens and divided by a constant (the batch's answers x
max_new_tokens), not by each answer's length: Dr. GRPO (Liu et al. 2025) shows that both normalisations
bias the update (towards questions nearly always or never solved, and towards long wrong answers). A group
whose answers all score alike has no advantage: it is skipped, and counted. Every eval_interval: greedy
held-out pass@1 per task (the engine at temperature 0, scored by the same verifier); at the end,
evaluate.py's held-out tasks and the built-in benchmark beside the model it started from, and the report
card. Ctrl-C (or SIGTERM) saves at the end of the current iteration; --init_from=resume continues exactly.
"""
import importlib
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

import demo
import evaluate
from checkpoint import model_to_tune
from configurator import check_ranges, configure
from data_formats import iter_file_inputs, read_records
from device import run_main, setup_device
from engine import Request, complete
from lora import adapters_disabled
from model import answer_logprobs
from tokenizer import Tokenizer
from training import (Stopper, apply_schedule, claim_out_dir, compile_and_wrap, cosine_lr, lora_base_dtype,
                      make_optimizer, nothing_to_do, open_out_dir, resume, save_run, seed_step, train_step)

# -----------------------------------------------------------------------------
# I/O
out_dir = "out-grpo"              # GRPO checkpoint (ckpt.pt), log.jsonl, eval.json and report.md go here
data_dir = "data"                 # tokenizer.model, and sft_test.jsonl: the held-out questions
init_from = "out-sft"             # the chat model to train (SFT, DPO, or an imported Llama), or "resume"
overwrite = False                 # a new run into an out_dir that holds a checkpoint: replace it (else refused)
eval_interval = 50                # held-out pass@1 and a checkpoint every this many iterations
eval_per_task = 200               # held-out questions per task at each of those evaluations, and in the final one
log_interval = 5                  # iterations per log line
log_to = ""                       # also log to "wandb" and/or "tensorboard" (a comma list; tracking.py)
run_name = ""                     # the tracked run's name; "": out_dir's
wandb_project = "llama2.zh"       # the wandb project the run goes to
evaluate_tasks = True             # after training, the held-out tasks and the built-in benchmark (GRPO beside
                                  # the model it started from) for the report card, out_dir/report.md
# the task
tasks = "ner"                     # the demo tasks trained on (their training questions; docs/experiments.md#grpo)
questions = ""                    # instead: a JSONL of {"question", "reference", "task"} to train on ...
test_questions = ""               # ... and one to evaluate on ("": data_dir/sft_test.jsonl's questions of `tasks`)
verifier = ""                     # "module:function" (question, answer, reference) -> reward in [0, 1]; "": demo.score
# rollouts
batch_size = 16                   # questions per iteration, per process
group_size = 8                    # answers sampled for each question
temperature = 0.7                 # of the rollouts: below 1 the samples are nearer the greedy answer the evaluation
                                  # scores (docs/experiments.md#grpo); the loss uses the policy itself (T=1)
top_p = 1.0                       # of the rollouts; below 1 the sampler is no longer the policy the ratio assumes
max_new_tokens = 48               # longest answer; longer ones are cut (and scored as they are)
# objective
kl_coef = 0.05                    # weight of the KL penalty to the reference
clip_eps = 0.2                    # PPO's clip on the ratio to the sampling policy (matters with ppo_epochs > 1)
ppo_epochs = 1                    # optimizer steps on each rollout batch
# optimization
max_iters = 150                   # rollout batches in the whole run
learning_rate = 1e-4              # peak, after warmup
min_lr = 2e-5                     # at the end of the cosine decay
warmup_iters = 5
lr_decay_iters: int = None        # None: max_iters
weight_decay = 0.0                # decoupled AdamW weight decay
beta1 = 0.9                       # AdamW: decay of the first moment
beta2 = 0.95                      # and of the second moment
grad_clip = 1.0                   # clip the gradient norm at this; 0 disables
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
compile: bool = None              # torch.compile of the training step; None: on for CUDA where Triton runs
seed = 1337                       # the questions' order and every rollout: a run is a function of it
# -----------------------------------------------------------------------------

# settings a resumed run takes from its checkpoint, whatever the command line says
FIXED_ON_RESUME = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "train_embeddings", "base_dtype",
                   "tasks", "questions", "test_questions", "verifier", "group_size", "temperature", "top_p",
                   "max_new_tokens", "kl_coef", "clip_eps", "ppo_epochs")


def load_verifier(spec, idiom_words):
    """(task, question, reference, answer) -> reward: demo.score per task, or the user's function
    (question, answer, reference) for all."""
    if not spec:
        return lambda task, question, reference, answer: demo.score(task, question, reference, answer, idiom_words)
    module_name, _, function_name = spec.partition(":")
    if not function_name:
        raise SystemExit(f"error: --verifier={spec} is not module:function (e.g. my_checks:numerals)")
    sys.path.insert(0, os.getcwd())  # a module beside where the user runs grpo.py
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except Exception as e:  # not found, or the module's own error (a SyntaxError, what it raised on import)
        raise SystemExit(f"error: --verifier={spec}: {type(e).__name__}: {e}")

    def reward(task, question, reference, answer):
        try:
            value = function(question, answer, reference)
        except Exception as e:
            raise SystemExit(f"error: --verifier={spec} raised {type(e).__name__}: {e}, on the question "
                             f"{question[:60]!r}")
        if not isinstance(value, (int, float)) or not 0 <= value <= 1:  # None, a string, NaN, 5.0
            raise SystemExit(f"error: --verifier={spec} returned {value!r} for the question {question[:60]!r}; a "
                             f"reward is a number from 0 to 1")
        return float(value)
    return reward


def read_questions(path):
    """[(task, question, reference)] of a JSONL (JSON, Parquet) of {"question", "reference"[, "task"]}, read as
    prepare_data.py reads its inputs: a BOM, GB18030 and bad lines handled, other rows counted and skipped."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: no file {path}; pass a JSONL of {{\"question\", \"reference\", \"task\"}} lines")
    found = []
    for item, counts in iter_file_inputs([path], read_records, "reading questions"):
        if not isinstance(item, dict) or not all(isinstance(item.get(k), str) and item[k].strip()
                                                 for k in ("question", "reference")):
            counts["rows without a question and a reference (strings) skipped"] += 1
            continue
        counts["kept"] += 1
        found.append((str(item.get("task") or "custom"), item["question"], item["reference"]))
    return found


def training_questions(task_names, val_fraction=0.01):
    """The demo's training questions of the given tasks (never a held-out one): [(task, question, reference)]."""
    return [(task, messages[0]["content"], messages[1]["content"])
            for split, task, messages in demo.sft_examples(val_fraction) if split == "train" and task in task_names]


def as_tests(items):
    """[(task, question, reference)] as evaluate.py's held-out conversations."""
    return [{"task": task, "messages": [{"role": "user", "content": question},
                                        {"role": "assistant", "content": reference}]}
            for task, question, reference in items]


def rollout_seed(seed, it, question, answer):
    """Each answer's own sampling seed: a function of the run's seed, the iteration, its question's place
    among all processes' questions of that iteration and its place in the group (the 0 names the rollouts'
    stream of seeds), so that N processes sample what one process with N times the batch would."""
    return int(np.random.SeedSequence([seed, it, 0, question, answer]).generate_state(1)[0])


def rollouts(model, tok, prompts, group_size, max_new_tokens, temperature, top_p, seeds):
    """Per prompt (token ids), group_size (answer tokens, why it ended: "stop", "length", or "error" for NaN or
    infinite logits), decoded together by the engine, one seeded request per answer (as serve.py would answer)."""
    requests = [Request(ids, min(max_new_tokens, model.args.max_seq_len - len(ids) - 1), temperature, top_p,
                        seed=seeds[p][g], stop_tokens=tok.stop_ids)
                for p, ids in enumerate(prompts) for g in range(group_size)]
    done = complete(model, requests, slots=len(requests))
    return [done[p * group_size:(p + 1) * group_size] for p in range(len(prompts))]


def group_advantages(rewards):
    """rewards (groups, G) -> (advantages (groups, G): reward minus its group's mean, which groups carry signal)."""
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    signal = rewards.max(1).values > rewards.min(1).values
    return rewards - rewards.mean(1, keepdim=True), signal


def grpo_loss(logps, old_logps, ref_logps, advantages, mask, clip_eps, kl_coef, norm):
    """(the clipped policy-gradient loss with a KL penalty, summed over answer tokens and divided by norm; the mean
    per-token KL). logps, old_logps (sampling's), ref_logps, mask (1 on answers): (N, T); advantages (N,)."""
    ratio = torch.exp(logps - old_logps)
    adv = advantages[:, None]
    policy_loss = -torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    log_r = ref_logps - logps
    kl = torch.exp(log_r) - log_r - 1
    loss = ((policy_loss + kl_coef * kl) * mask).sum() / norm
    return loss, ((kl * mask).sum() / mask.sum().clamp(min=1)).detach()


def answer_batch(prompts, groups, advantages, keep, eos_id):
    """The rows to train on, prompt + answer (+ EOS where it ended itself) for every answer of a kept group, as numpy
    arrays: tokens, targets (-1 on padding), loss_mask (1 on the answer's tokens), advantages."""
    rows = []
    for p, answers in enumerate(groups):
        if keep[p]:
            for g, (tokens, finish) in enumerate(answers):
                rows.append((prompts[p], tokens + ([eos_id] if finish == "stop" else []), float(advantages[p, g])))
    T = max(len(prompt) + len(answer) for prompt, answer, _ in rows) - 1
    x = np.zeros((len(rows), T), dtype=np.int64)
    y = np.full((len(rows), T), -1, dtype=np.int64)
    m = np.zeros((len(rows), T), dtype=np.float32)
    for r, (prompt, answer, _) in enumerate(rows):
        seq = prompt + answer
        x[r, :len(seq) - 1], y[r, :len(seq) - 1] = seq[:-1], seq[1:]
        m[r, len(prompt) - 1:len(seq) - 1] = 1  # the positions that predict the answer's tokens
    return {"tokens": x, "targets": y, "loss_mask": m, "advantages": np.array([a for *_, a in rows], np.float32)}


@torch.no_grad()
def reference_logps(batch, ref_model, policy):
    """The reference's per-token log-probs: ref_model's, or (LoRA) the policy's with its adapters off."""
    if ref_model is not None:
        return answer_logprobs(ref_model, batch)
    with adapters_disabled(policy):
        return answer_logprobs(policy, batch)


def main():
    config = configure(globals())
    check_ranges(config, at_least_1=("batch_size", "group_size", "eval_interval", "log_interval", "max_new_tokens",
                                     "ppo_epochs", "eval_per_task"),
                 at_least_0=("max_iters", "warmup_iters", "lr_decay_iters", "min_lr", "weight_decay", "grad_clip",
                             "lora_rank", "lora_dropout", "kl_coef", "clip_eps", "temperature"),
                 positive=("learning_rate", "top_p"))
    if group_size < 2:
        raise SystemExit("error: --group_size must be at least 2: the advantage compares answers to one question")
    lora_base_dtype(base_dtype)  # a bad --base_dtype is refused before anything is touched
    resumed = init_from == "resume"
    claim_out_dir(out_dir, fresh=not resumed, overwrite=overwrite, init_from=None if resumed else init_from)
    run = setup_device(device, dtype, compile)
    tok = Tokenizer(os.path.join(data_dir, "tokenizer.model"))

    # ---- the model: the chat model to train, or our own to resume (LoRA, the task and the objective as it was started)
    checkpoint, iter_num, best_error, sessions = resume(resumed, out_dir, "grpo", tok, run, globals(), config,
                                                        FIXED_ON_RESUME)
    base_dir = checkpoint["base"] if resumed else init_from
    model, base_stage, _ = model_to_tune(base_dir, tok, dict(config, dropout=0.0), seed, resumed=checkpoint,
                                         verbose=run.master, base_dtype=lora_base_dtype(base_dtype, run))
    model.to(run.device)
    ref_model = None  # the reference: with LoRA the same model with its adapters off, else a frozen copy
    if not lora_rank:
        ref_model, _, _ = model_to_tune(base_dir, tok, dict(config, lora_rank=0, dropout=0.0), seed)
        ref_model.to(run.device).eval().requires_grad_(False)
    # the task comes from the settings as resumed: a run continues the task it started on
    train_items, test_items, score = the_task(tasks, questions, test_questions, verifier, data_dir, tok,
                                              model.args.max_seq_len - max_new_tokens)

    optimizer, scaler = make_optimizer(model, run, False, checkpoint, weight_decay, learning_rate, (beta1, beta2))
    checkpoint = None  # its weights and optimizer state now live in model and optimizer
    raw_model = model
    model, _ = compile_and_wrap(model, run, False, dynamic=True)  # rows are padded: lengths vary
    decay_iters = lr_decay_iters or max_iters
    if run.master:
        print(f"from {base_dir} ({base_stage}): {raw_model.num_params() / 1e6:.2f}M parameters, "
              f"{raw_model.num_params(trained=True) / 1e6:.2f}M trained; reference: "
              f"{'the model with its adapters off' if ref_model is None else 'a frozen copy'}")
        print(f"questions: {len(train_items):,} to train on, {len(test_items):,} held out; {batch_size} questions x "
              f"{group_size} answers x {run.world_size} processes per iteration, temperature {temperature}; "
              f"{'resuming at' if resumed else 'starting at'} iteration {iter_num} of {max_iters}")
    if nothing_to_do(run, out_dir, iter_num, max_iters, resumed, f" (or run evaluate.py --out_dir={out_dir})"):
        return
    logger = open_out_dir(run, out_dir, data_dir, tok, max_iters, resumed, sessions, config)
    orders = {}  # the latest epoch's order of the training questions

    def questions_of(it):
        """This process's questions at iteration it, each with its place among all processes' questions of the
        iteration: its own stretch of the shuffled stream (so N processes ask what one with N times the batch
        would), each epoch a new shuffle."""
        picked = []
        for k in range(batch_size):
            position = (it * run.world_size + run.rank) * batch_size + k
            epoch, i = divmod(position, len(train_items))
            if epoch not in orders:
                orders.clear()
                orders[epoch] = np.random.default_rng([seed, epoch]).permutation(len(train_items))
            picked.append((run.rank * batch_size + k, train_items[orders[epoch][i]]))
        return picked

    def checkpoint_now(it, error):
        save_run(out_dir, raw_model, optimizer, False, run, logger, iter_num=it, best_val_loss=error,
                 model_args=vars(raw_model.args), config=config, tokenizer_sha=tok.sha, stage="grpo", base=base_dir)

    # ---- the loop
    stats = {"reward": [], "kl": [], "length": [], "skipped": [], "groups": [], "loss": []}
    t_last = time.time()
    with Stopper(run, out_dir, checkpoint_now, False, "held-out error (1 - mean greedy pass@1)", best_error) as stopper:
        while stopper.go(iter_num):
            lr = cosine_lr(iter_num, learning_rate, min_lr, warmup_iters, decay_iters)
            apply_schedule(optimizer, lr)

            if stopper.eval_due(iter_num, eval_interval, max_iters, resumed):
                passed = {task: p for task, (p, _) in evaluate.evaluate_on_tasks(
                    raw_model, tok, test_items, set(), eval_per_task, score=score).items()}
                error = 1 - float(np.mean(list(passed.values())))
                if stopper.check_loss(error, "held-out error", iter_num):
                    print(f"iter {iter_num}: held-out greedy pass@1 " +
                          ", ".join(f"{task} {p * 100:.1f}%" for task, p in passed.items()))
                    logger.log({"iter": iter_num, "val_loss": error, **{f"pass1_{t}": p for t, p in passed.items()},
                                "time_s": time.time() - stopper.t_start})
                    stopper.evaluated(iter_num, error)
                raw_model.train()
            if iter_num >= max_iters:
                break

            # rollouts: group_size answers to each question, rewarded by the verifier
            places, items = zip(*questions_of(iter_num))
            prompts = [tok.encode_chat([{"role": "user", "content": question}])[0] for _, question, _ in items]
            seeds = [[rollout_seed(seed, iter_num, place, g) for g in range(group_size)] for place in places]
            groups = rollouts(raw_model, tok, prompts, group_size, max_new_tokens, temperature, top_p, seeds)
            raw_model.train()
            failed = any(finish == "error" for answers in groups for _, finish in answers)  # NaN or inf logits
            rewards = [[score(task, question, reference, tok.decode(tokens)) for tokens, _ in answers]
                       for (task, question, reference), answers in zip(items, groups)]
            advantages, keep = group_advantages(rewards)
            # (groups with a signal, processes whose sampling failed), summed over the processes: every process
            # steps or none (DDP's gradient all-reduce needs them all), and all stop together
            agreed = torch.tensor([int(keep.sum()), int(failed)], device=run.device)
            if run.ddp:
                dist.all_reduce(agreed)
            if agreed[1].item():
                stopper.check_loss(float("nan"), "the policy's next-token distribution", iter_num)
                continue  # diverged: the loop stops at its top, the last checkpoint kept
            stats["reward"].append(float(np.mean(rewards)))
            stats["length"].append(float(np.mean([len(t) for answers in groups for t, _ in answers])))
            stats["skipped"].append(int((~keep).sum()))
            stats["groups"].append(len(items))
            if agreed[0].item():
                no_signal = not keep.any()  # here, but other processes have some: one group that weighs nothing
                keep[0] |= no_signal
                batch = answer_batch(prompts, groups, advantages, keep, tok.eos_id)
                batch["loss_mask"] *= not no_signal
                losses, kl = update_policy(model, raw_model, ref_model, optimizer, scaler, batch, run, iter_num,
                                           norm=len(items) * group_size * max_new_tokens)
                stats["loss"] += losses
                stats["kl"].append(kl)
            iter_num += 1

            if run.master and iter_num % log_interval == 0:
                dt = (time.time() - t_last) / log_interval
                t_last = time.time()
                record = log_record(stats, lr, dt, batch_size * group_size * run.world_size)
                stopper.check_loss(record["loss"], "training GRPO loss", iter_num)
                print(f"iter {iter_num}: loss {record['loss']:.4f}, reward {record['reward']:.3f}, all-equal groups "
                      f"{record['skipped_groups'] * 100:.0f}%, KL {record['kl']:.4f}, answer length "
                      f"{record['answer_tokens']:.1f} tokens, lr {lr:.2e}, {dt:.2f} s/iter, ETA {logger.eta(iter_num)}")
                logger.log({"iter": iter_num, **record})
                stats = {k: [] for k in stats}
    if stopper.finished and stopper.saved_iter is not None:
        optimizer = scaler = model = ref_model = None
        own = bool(questions or verifier)  # the user's task: its held-out questions and verifier, not the demo's
        evaluate.after_training("GRPO", raw_model.eval(), out_dir, base_dir, base_stage, tok, data_dir, eval_per_task,
                                run, evaluate_models=evaluate_tasks, tests=test_items if own else None,
                                score=score if own else None)


def the_task(task_list, questions, test_questions, verifier, data_dir, tok, max_prompt_tokens):
    """The run's task from its settings (a resumed run's as it started): (training questions whose prompt fits
    max_prompt_tokens, held-out questions as evaluate.py's tests, the scorer (task, question, reference, answer))."""
    task_names = [t for t in task_list.split(",") if t]
    unchecked = set(task_names) - set(evaluate.CHECKABLE)
    if not questions and not verifier and unchecked:
        raise SystemExit(f"error: --tasks: {sorted(unchecked)[0]} has no verifier; the demo's checkable tasks are "
                         f"{', '.join(evaluate.CHECKABLE)} (or pass --verifier=module:function)")
    score = load_verifier(verifier, demo.idiom_words() if "chain" in task_names else set())
    train_items = read_questions(questions) if questions else training_questions(task_names)
    test_items = as_tests(read_questions(test_questions)) if test_questions else \
        [t for t in evaluate.load_tests(data_dir) or [] if t.get("task") in task_names]
    if not train_items or not test_items:
        what = "training" if not train_items else "held-out"
        raise SystemExit(f"error: no {what} questions for --tasks={task_list}" + ("" if not questions else
                         f" (--questions={questions}, --test_questions={test_questions or 'none'})"))
    asked = [item for item in train_items  # a question that leaves no room for a whole answer is not asked
             if len(tok.encode_chat([{"role": "user", "content": item[1]}])[0]) < max_prompt_tokens]
    if not asked:
        raise SystemExit("error: no training question leaves room for --max_new_tokens in the model's context; "
                         "lower --max_new_tokens")
    return asked, test_items, score


def update_policy(model, raw_model, ref_model, optimizer, scaler, batch, run, it, norm):
    """ppo_epochs optimizer steps on one rollout batch (answer_batch's arrays); norm divides the summed loss (Dr.
    GRPO: a constant, not each answer's length). Returns (the steps' losses, the first step's mean per-token KL)."""
    batch = {k: torch.from_numpy(v).to(run.device) for k, v in batch.items()}
    with torch.no_grad(), run.autocast:
        batch["ref_logps"] = reference_logps(batch, ref_model, raw_model).float()
        batch["old_logps"] = answer_logprobs(raw_model, batch).float() if ppo_epochs > 1 else None
    kls, losses = [], []

    def loss_fn(model_, b):
        logps = answer_logprobs(model_, b).float()
        old = b["old_logps"] if b["old_logps"] is not None else logps.detach()
        loss, kl = grpo_loss(logps, old, b["ref_logps"], b["advantages"], b["loss_mask"], clip_eps, kl_coef, norm)
        kls.append(kl.item())
        return loss

    for epoch in range(ppo_epochs):
        seed_step(seed, run.rank, it * ppo_epochs + epoch)
        losses.append(train_step(model, optimizer, scaler, lambda micro_step: batch, 1, run, grad_clip,
                                 loss_fn=loss_fn).item())
    return losses, kls[0]


def log_record(stats, lr, dt, answers_per_iter):
    """The log record of the iterations since the last one."""
    return {"loss": float(np.mean(stats["loss"])) if stats["loss"] else 0.0,  # 0: no group had a signal
            "reward": float(np.mean(stats["reward"])),
            "skipped_groups": sum(stats["skipped"]) / max(1, sum(stats["groups"])),
            "kl": float(np.mean(stats["kl"])) if stats["kl"] else 0.0,
            "answer_tokens": float(np.mean(stats["length"])), "lr": lr, "ms_per_iter": dt * 1000,
            "answers_per_s": answers_per_iter / dt}


if __name__ == "__main__":
    run_main(main)
