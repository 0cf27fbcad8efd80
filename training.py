"""
The loop protocol the training stages (pretrain.py, sft.py, dpo.py, grpo.py) share, so that each script
tells only its own stage. A stage's main, in order:

    config = configure(globals())                       # settings; check_ranges refuses bad ones
    claim_out_dir(out_dir, fresh, overwrite, init_from) # before anything is loaded or deleted
    run = setup_device(device, dtype, compile)          # device.py: where and how this process runs
    checkpoint, iter_num, ... = resume(resumed, ...)    # --init_from=resume: fixed settings written back
    model = ...                                         # scratch, checkpoint.model_to_tune, or the resumed one
    preflight(...)                                      # memory.py: will it fit (and auto batch size)
    optimizer, scaler = make_optimizer(...)             # shards first under FSDP; loads a resumed state
    model, eval_model = compile_and_wrap(model, run, sharded)
    logger = open_out_dir(...)                          # log.jsonl, the tokenizer beside the checkpoint
    with Stopper(run, out_dir, save, ...) as stopper:   # Ctrl-C/SIGTERM, divergence, the end-of-run words
        while stopper.go(iter_num):
            ... cosine_lr -> apply_schedule, stopper.eval_due -> stopper.evaluated (save_run), seed_step, train_step ...
    evaluate.after_training(...)                        # when stopper.finished

Here: the optimizer and its state (full_state, make_optimizer), resuming, the guard on out_dir, batches
to the device, the schedule and the optimizer step, the checkpoint a run writes, the loop's frame and the log.
"""
import atexit
import datetime
import json
import math
import os
import shutil
import signal
import time

import torch
import torch.distributed as dist

from checkpoint import STAGES, check_tokenizer, load_checkpoint, save_checkpoint
from device import command_line, end_distributed, git_commit, peak_memory_gb, wrap_ddp, wrap_fsdp
from lora import base_storage, has_adapters, trainable_state_dict
from tokenizer import write_text_file
from tracking import close_trackers, log_to_trackers, open_trackers


def full_state(model, optimizer, sharded, trained_only=False):
    """(model state dict, optimizer state dict), whole; trained_only: a LoRA run's trained parameters, not its base.
    Sharded (FSDP): gathered onto rank 0's CPU, a collective every process calls (the others get empty dicts), the
    optimizer's keyed by parameter name, as load_optimizer_state reads it."""
    if not sharded:
        state, optimizer_state = model.state_dict(), optimizer.state_dict()
    else:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trained_only)
        state, optimizer_state = get_model_state_dict(model, options=options), \
            get_optimizer_state_dict(model, optimizer, options=options)
    return (trainable_state_dict(model, state) if trained_only else state), optimizer_state


MUON_UNDER_FSDP = ("error: Muon orthogonalizes whole weight matrices, which FSDP shards; with --fsdp=True pass "
                   "--muon=False (AdamW), or train adapters (--lora_rank)")


def make_optimizer(model, run, sharded, resumed, weight_decay, learning_rate, betas, muon=False,
                   embedding_lr_scale=1.0):
    """(optimizer, grad scaler): under FSDP the model is sharded first, so that the optimizer sees each process's
    shard; a resumed run's checkpoint (else None) gives its optimizer state."""
    if sharded and muon:  # the stages refuse it before anything is touched; a resumed run's settings come here
        raise SystemExit(MUON_UNDER_FSDP)
    if sharded:
        wrap_fsdp(model, run)
    optimizer = model.configure_optimizers(weight_decay, learning_rate, betas, run.device_type, muon, shard=run.ddp,
                                           embedding_lr_scale=embedding_lr_scale)
    if resumed is not None:
        load_optimizer_state(model, optimizer, resumed["optimizer"], sharded)
    return optimizer, torch.amp.GradScaler(run.device_type, enabled=run.dtype == "float16")


def load_optimizer_state(model, optimizer, state, sharded):
    """An optimizer state saved by full_state into the optimizer of a model sharded (FSDP) or not."""
    by_name = any(isinstance(k, str) for k in state.get("state", {}))
    if by_name and not sharded:  # FSDP needs torchrun's processes, however many
        raise SystemExit("error: the checkpoint was saved by a sharded run (--fsdp=True under torchrun); resume it "
                         "the same way: torchrun --nproc_per_node=N ... --fsdp=True --init_from=resume (any N)")
    if sharded and not by_name:
        raise SystemExit("error: the checkpoint was saved without --fsdp; resume it with --fsdp=False")
    if not sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def seed_step(seed, rank, it):
    """Seed every generator from (seed, process, iteration) before each step: dropout is then a function of the
    three, so a resumed run draws what an uninterrupted one would, with no generator state in the checkpoint."""
    torch.manual_seed((seed * 1_000_003 + it) * 1_009 + rank)


BASE_DTYPES = ("auto", "float32", "bfloat16", "float16", "int8")


def lora_base_dtype(setting, run=None):
    """How a LoRA run stores its frozen base: "auto" is the compute dtype on GPUs, float32 on CPUs (bf16 autocast is
    for speed there: the base stays exact, as exported adapters expect). Without a run: only checks the setting."""
    if setting not in BASE_DTYPES:
        raise SystemExit(f"error: --base_dtype must be one of {', '.join(BASE_DTYPES)}, not {setting!r}")
    if setting != "auto" or run is None:
        return setting
    return run.dtype if run.device_type != "cpu" else "float32"


def resume(resumed, out_dir, stage, tok, run, settings, config, fixed):
    """Where the loop starts: (checkpoint, iter_num, best_val_loss, sessions) of the run in out_dir, to continue it
    (refused when another stage wrote it or another tokenizer's data is given), or (None, 0, inf, []) when not
    resumed. Each setting in `fixed` takes the checkpoint's value, in the script's globals and config alike; a
    warning says so where the command line or a config file asked for another."""
    if not resumed:
        return None, 0, float("inf"), []
    checkpoint = load_checkpoint(out_dir, merge=False)  # a LoRA run's adapters are loaded onto its base again
    if checkpoint.get("stage") != stage:
        raise SystemExit(f"error: {out_dir}/ckpt.pt is a {checkpoint.get('stage', 'unknown')} checkpoint, not "
                         f"{STAGES[stage].run} to resume; to {STAGES[stage].verb} it, pass --init_from={out_dir} "
                         f"and a new --out_dir")
    check_tokenizer(checkpoint["tokenizer_sha"], tok.sha, f"{out_dir}/ckpt.pt",
                    fix="resume with --data_dir pointing at the data it was trained on")
    saved = checkpoint["config"]
    given = settings.get("_given", set(config))
    for key in fixed:
        if key in saved and config[key] != saved[key]:
            if run.master and key in given:
                print(f"warning: --{key}={config[key]} is ignored: the run being resumed has {key}={saved[key]}")
            settings[key] = config[key] = saved[key]
    if run.master and saved.get("world_size", run.world_size) * saved.get("gradient_accumulation_steps", 1) \
            != run.world_size * config.get("gradient_accumulation_steps", 1):  # (grpo.py has no accumulation)
        print("warning: resuming with a different world_size x gradient_accumulation_steps: "
              "the batches will differ from the original run's")
    # sessions: the commands that trained it so far, for the report card
    return checkpoint, checkpoint["iter_num"], checkpoint["best_val_loss"], checkpoint.get("sessions", [])


def resolve_block_size(block_size, model):
    """The length of the rows a stage trains on: block_size (within the model's context), or the context."""
    if (block_size or 0) > model.args.max_seq_len:
        raise SystemExit(f"error: --block_size={block_size} is longer than the model's context "
                         f"({model.args.max_seq_len})")
    return block_size or model.args.max_seq_len


def stream_position(it, micro_step, run, accumulation_steps, batch_size):
    """Where a micro-batch starts in a stage's one stream of rows (or pairs): each process takes its own
    stretch, (iteration, process, micro-step, row), so N processes train on what one process with N times
    the accumulation would."""
    return ((it * run.world_size + run.rank) * accumulation_steps + micro_step) * batch_size


def compile_and_wrap(model, run, sharded, dynamic=None):
    """(the model the loop trains, the one it evaluates with): compiled where run.compile says (dynamic: for batches
    whose length varies); the first under DDP when unsharded (FSDP wraps before the optimizer is made)."""
    if run.compile:
        if run.master:
            print("compiling the model (takes a minute)...")
        model = torch.compile(model, dynamic=dynamic)
    return (wrap_ddp(model, run) if run.ddp and not sharded else model), model


def to_device(batch, run):
    """numpy arrays (one, or a dict of them) as tensors on the run's device; pinned on the way to a GPU."""
    if isinstance(batch, dict):
        return {k: to_device(v, run) for k, v in batch.items()}
    t = torch.from_numpy(batch)
    return t.pin_memory().to(run.device, non_blocking=True) if run.device_type == "cuda" else t.to(run.device)


def save_run(out_dir, model, optimizer, sharded, run, logger, **fields):
    """Write out_dir/ckpt.pt (weights, optimizer state, world size, the sessions that trained it, `fields`), then
    the log catches up (Logger.commit). A LoRA run saves what it trained under "lora" and how it stored its base
    (fields["base"] names it), never the base: load_checkpoint merges them again. Sharded: every process calls it."""
    lora = has_adapters(model)
    state, optimizer_state = full_state(model, optimizer, sharded, trained_only=lora)
    if not run.master:
        return
    if lora:
        fields.update(lora=state, base_dtype=base_storage(model), base_abspath=os.path.abspath(fields["base"]),
                      base_fingerprint=getattr(model, "base_fingerprint", None))
    save_checkpoint(os.path.join(out_dir, "ckpt.pt"), {
        "model": None if lora else state, "optimizer": optimizer_state, "world_size": run.world_size,
        "sessions": logger.sessions_so_far(run, fields.get("iter_num")), **fields})
    logger.commit()


def open_out_dir(run, out_dir, data_dir, tok, max_iters, resumed, sessions=(), config=None):
    """Rank 0's Logger for out_dir (None elsewhere), and the tokenizer copied beside the checkpoint, so that
    sample.py and export.py need nothing else. sessions: those of the run being resumed (its checkpoint's).
    config: the run's settings, whose log_to, run_name and wandb_project start the trackers (tracking.py)."""
    if not run.master:
        return None
    if os.path.abspath(data_dir) != os.path.abspath(out_dir):
        shutil.copyfile(tok.model_path, os.path.join(out_dir, "tokenizer.model"))
    return Logger(out_dir, max_iters, resumed, run, sessions, config)


def cosine_lr(it, learning_rate, min_lr, warmup_iters, decay_iters):
    """Linear warmup to learning_rate, cosine decay to min_lr at decay_iters, min_lr after."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= decay_iters:
        return min_lr
    progress = (it - warmup_iters) / max(1, decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


def apply_schedule(optimizer, lr, momentum=None):
    """The schedule's values into the optimizer: lr times each group's lr_scale, and Muon groups' momentum."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        if momentum is not None and group.get("muon"):
            group["momentum"] = momentum


def warmdown_lr(it, learning_rate, min_lr, warmup_iters, decay_iters, warmdown_iters):
    """Linear warmup to learning_rate, constant, then linear to min_lr over the warmdown_iters before decay_iters."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= decay_iters:
        return min_lr
    left = decay_iters - it  # iterations to the end of the decay
    if left >= warmdown_iters:
        return learning_rate
    return min_lr + (learning_rate - min_lr) * left / max(1, warmdown_iters)


def train_step(model, optimizer, scaler, get_batch, accumulation_steps, run, grad_clip, count=None, loss_fn=None):
    """
    One optimizer step over accumulation_steps micro-batches; get_batch(micro_step) returns the model's
    keyword arguments. Under DDP or FSDP, gradients are averaged across processes only after the last micro-step.

    Pretraining (count None): every micro-batch has as many tokens as the next, so their mean losses are
    averaged, and each batch is prepared while the device works on the one before. A loss that is a
    mean over a varying number of tokens (SFT's answer tokens) passes count(batch) -> its number of
    tokens: each micro-batch's mean is then weighted by its share of all the step's tokens in all
    processes (one all-reduce of a number), so every token counts the same wherever it lands and N
    processes train exactly like one process with N times the accumulation.
    loss_fn(model, batch) -> loss: the stage's head (model.answer_loss for SFT, DPO's from the answers' log-probs);
    without it, the model's own loss on the batch's tokens and targets (pretraining).
    Returns this process's mean loss of the step (a tensor: reading it forces a device sync, so log sparingly).
    """
    if count is None:
        batches, weights = None, [1.0 / accumulation_steps] * accumulation_steps
    else:
        batches = [get_batch(i) for i in range(accumulation_steps)]
        counts = torch.stack([count(b).float() for b in batches])
        total = counts.sum()
        if run.ddp:
            dist.all_reduce(total)
        weights = counts * run.world_size / total.clamp(min=1)  # DDP divides by world_size: undo it
    batch = batches[0] if batches else get_batch(0)
    losses = []
    for micro_step in range(accumulation_steps):
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP: reduce-scatter only after the last micro-step
            model.set_requires_gradient_sync(micro_step == accumulation_steps - 1)
        elif run.ddp:
            model.require_backward_grad_sync = micro_step == accumulation_steps - 1
        with run.autocast:
            loss = loss_fn(model, batch) if loss_fn else model(**batch)[1]
        if micro_step + 1 < accumulation_steps:
            batch = batches[micro_step + 1] if batches else get_batch(micro_step + 1)  # ready before the GPU is
        scaler.scale(loss * weights[micro_step]).backward()
        losses.append(loss.detach())
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if batches:
        return (torch.stack(losses) * counts).sum() / counts.sum().clamp(min=1)
    return torch.stack(losses).mean()


class Stopper:
    """
    The frame of a training loop (`with Stopper(...) as stopper: while stopper.go(iter_num): ...`): why
    it stops early, decided by every process together at an iteration boundary so that none is left
    waiting in a collective for one that has gone, and what each way of stopping leaves behind.
    - Ctrl-C or SIGTERM (Slurm preemption, `docker stop`, a spot instance going away) only sets a
      flag; the loop then saves a checkpoint at the next iteration boundary (sharded: all processes
      together) and exits. A second Ctrl-C quits at once, without saving.
    - a loss that is NaN or infinite (rank 0 reads the losses) marks the run diverged: it stops
      without saving, so the last checkpoint on disk stays the last good one.
    - the end: rank 0 says how it went; `finished` tells the script to go on (the task evaluation).
    save(iteration, best loss so far) writes out_dir/ckpt.pt; sharded, every process calls it.
    """
    GO, INTERRUPTED, DIVERGED = 0, 1, 2

    def __init__(self, run, out_dir="", save=None, sharded=False, metric="val loss", best=float("inf"),
                 advice="lower --learning_rate"):
        self.run, self.out_dir, self.save_fn, self.sharded = run, out_dir, save, sharded
        self.metric, self.best, self.advice = metric, best, advice
        self.code, self.message = self.GO, ""
        self.stop = self.GO  # what the processes last agreed
        self.iter_num = self.start_iter = self.saved_iter = None
        self.finished, self.t_start = False, time.time()
        self.previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore(self):
        """Put the signal handlers back: after the loop, Ctrl-C interrupts again at once."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum, frame):
        if self.code == self.INTERRUPTED and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C
        self.code = max(self.code, self.INTERRUPTED)
        if self.run.master:
            print(f"\n{signal.Signals(signum).name}: stopping at the end of this iteration "
                  f"(Ctrl-C again to quit at once, without saving)", flush=True)

    def check_loss(self, loss, what, iter_num):
        if not math.isfinite(loss):
            self.code, self.message = self.DIVERGED, f"{what} is {loss} at iteration {iter_num}: training diverged"
        return self.code != self.DIVERGED

    def agreed(self):
        """The stop code all processes agree on (the largest any of them has); GO to carry on."""
        if not self.run.ddp:
            return self.code
        code = torch.tensor([self.code], device=self.run.device)
        dist.all_reduce(code, op=dist.ReduceOp.MAX)
        return int(code.item())

    def go(self, iter_num):
        """At the top of each iteration: whether all processes carry on."""
        self.iter_num = iter_num
        if self.start_iter is None:
            self.start_iter = iter_num
        self.stop = self.agreed()
        return self.stop == self.GO

    def eval_due(self, iter_num, eval_interval, max_iters, resumed):
        """Whether this process evaluates now: every eval_interval and at the end, on rank 0 (every process when
        sharded); a resumed run had the evaluation of the iteration it starts at."""
        due = iter_num % eval_interval == 0 or iter_num == max_iters
        return due and (self.run.master or self.sharded) and (iter_num > self.start_iter or not resumed)

    def evaluated(self, iter_num, loss):
        """A finite held-out loss: the best so far, and a checkpoint once the run has trained."""
        self.best = min(self.best, loss)
        if iter_num > 0:
            self.save(iter_num, loss)

    def save(self, iter_num, loss):
        self.save_fn(iter_num, loss if math.isfinite(loss) else self.best)
        self.saved_iter = iter_num

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.restore()
        if exc_type is KeyboardInterrupt:  # the second Ctrl-C
            if self.run.master:
                print(f"\nquit without saving; {self.out_dir}/ckpt.pt holds " + (
                    f"iteration {self.saved_iter}" if self.saved_iter is not None else "what it held before this run"))
            end_distributed(self.run, finished=False)
            raise SystemExit(130)
        if exc_type is not None:
            end_distributed(self.run, finished=False)
            return False
        if self.sharded and self.stop == self.INTERRUPTED:
            self.save(self.iter_num, float("nan"))  # gathered from every process, before they part
        end_distributed(self.run, finished=True)
        if not self.run.master:
            return False
        stop = max(self.stop, self.code)  # a divergence seen in this iteration, after the processes last agreed
        if stop == self.INTERRUPTED:
            if not self.sharded:  # (sharded, the processes saved together above)
                self.save(self.iter_num, float("nan"))
            print(f"interrupted: saved {self.out_dir}/ckpt.pt at iteration {self.saved_iter}; continue with "
                  f"--init_from=resume")
        elif stop == self.DIVERGED:
            raise SystemExit(f"error: {self.message}. " + last_checkpoint_note(self.out_dir, self.saved_iter)
                             + f"; {self.advice}")
        else:
            self.finished = True
            saved = f"checkpoint in {self.out_dir}/ckpt.pt" if self.saved_iter is not None else \
                "no checkpoint written (no iteration was trained)"
            print(f"done: {self.iter_num} iterations in {(time.time() - self.t_start) / 60:.1f} min, best "
                  f"{self.metric} {self.best:.4f}; {saved}")
        return False


def nothing_to_do(run, out_dir, iter_num, max_iters, resumed, hint=""):
    """A resumed run already at max_iters: say so, and leave (True)."""
    if not resumed or iter_num < max_iters:
        return False
    if run.master:
        print(f"nothing to do: {out_dir}/ckpt.pt is at iteration {iter_num} and --max_iters={max_iters}; "
              f"raise --max_iters to train on{hint}")
    end_distributed(run, finished=True)
    return True


def last_checkpoint_note(out_dir, saved_iter):
    """What a run that stopped early leaves on disk, in words (never a checkpoint it did not write)."""
    if saved_iter is not None:
        return f"The last good checkpoint is {out_dir}/ckpt.pt (iteration {saved_iter})"
    if os.path.exists(os.path.join(out_dir, "ckpt.pt")):
        return f"This run saved no checkpoint: {out_dir}/ckpt.pt is still the one it started from"
    return "This run saved no checkpoint"


_out_dir_lock = None  # the open lock file: held for as long as this process lives


def claim_out_dir(out_dir, fresh, overwrite, init_from=None):
    """Make sure this run may write out_dir, before anything is loaded or deleted: a fresh run refuses a checkpoint
    there unless overwrite (a forgotten --init_from=resume must not destroy a finished run), a fine-tuning run the
    directory it starts from. Rank 0 takes out_dir/lock (its pid): a second run there at once is refused."""
    global _out_dir_lock
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise SystemExit(f"error: --out_dir={out_dir} is a file, not a directory; choose another --out_dir")
    if init_from and os.path.abspath(init_from) == os.path.abspath(out_dir):
        raise SystemExit(f"error: --init_from and --out_dir are both {out_dir}: the run would overwrite the model it "
                         f"starts from; choose another --out_dir (or --init_from=resume to continue {out_dir})")
    checkpoint = os.path.join(out_dir, "ckpt.pt")
    if fresh and os.path.exists(checkpoint) and not overwrite:
        raise SystemExit(f"error: {checkpoint} already holds a run; continue it with --init_from=resume, choose "
                         f"another --out_dir, or pass --overwrite=True to replace it")
    if int(os.environ.get("RANK", 0)) != 0:
        return
    created = not os.path.isdir(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
        lock = open(os.path.join(out_dir, "lock"), "a+")
    except OSError as e:
        raise SystemExit(f"error: cannot write to --out_dir={out_dir}: {e.strerror}; choose another --out_dir")
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; two runs into one directory are the user's to avoid
        return
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        raise SystemExit(f"error: {out_dir} is in use by another run (pid {holder}); wait for it to finish or "
                         f"choose another --out_dir")
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    _out_dir_lock = lock
    atexit.register(release_out_dir, out_dir, lock, created)


def release_out_dir(out_dir, lock, created):
    """At exit, the lock goes, and a directory this run created and left empty goes too: a run refused before it
    wrote anything (its memory plan, its data) leaves nothing behind."""
    lock.close()
    try:
        os.remove(os.path.join(out_dir, "lock"))
        if created and not os.listdir(out_dir):
            os.rmdir(out_dir)
    except OSError:
        pass


class Logger:
    """
    One line per log interval to the terminal, the same record in out_dir/log.jsonl and to the trackers of
    config's log_to (tracking.py). A fresh run over an earlier checkpoint (--overwrite=True) keeps its records
    in memory until commit() with its first checkpoint. It keeps this session's facts too (sessions_so_far).
    """

    def __init__(self, out_dir, max_iters, resume, run=None, sessions=(), config=None):
        self.path = os.path.join(out_dir, "log.jsonl")
        self.max_iters = max_iters
        os.makedirs(out_dir, exist_ok=True)
        self.pending = None  # None: append to the file
        if not resume and os.path.exists(os.path.join(out_dir, "ckpt.pt")):
            self.pending = []
        elif not resume and os.path.exists(self.path):
            os.remove(self.path)  # the log of a run that never saved a checkpoint
        self.t_start, self.it_start = time.time(), None
        self.steps_seen, self.timing_mark = 0, None  # first_timing's count, and (iteration, time) it started at
        self.sessions = list(sessions)
        self.session = {"command": command_line(run) if run else None, "git_commit": git_commit(),
                        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        "device": (torch.cuda.get_device_name(run.device) if run.device_type == "cuda" else run.device)
                        if run else None, "dtype": run.dtype if run else None,
                        "world_size": run.world_size if run else None,
                        "first_iter": sessions[-1]["last_iter"] if sessions else 0}
        self.session_start = time.time()
        config = config or {}
        self.trackers = open_trackers(config.get("log_to", ""), out_dir, config.get("run_name", ""),
                                      config.get("wandb_project", ""), config, resume)
        atexit.register(close_trackers, self.trackers)

    def sessions_so_far(self, run, iter_num):
        """The earlier sessions of this run (a resumed run's) and this one up to now: its command, commit,
        device, wall time, the iterations it trained and its peak memory."""
        device_gb, host_gb = peak_memory_gb(run)
        self.session.update(last_iter=iter_num, wall_s=time.time() - self.session_start,
                            peak_device_gb=device_gb, peak_host_gb=host_gb)
        return self.sessions + [dict(self.session)]

    def log(self, record):
        log_to_trackers(self.trackers, record)
        if self.pending is not None:
            self.pending.append(record)
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def commit(self):
        if self.pending is None:
            return
        write_text_file(self.path, "".join(json.dumps(record) + "\n" for record in self.pending))
        self.pending = None

    def first_timing(self, it, run, warmup=2, timed=10):
        """After each step: once `timed` steps past the first `warmup` ones (the compile, the allocator's growth),
        say how long the run will take at that pace (a GPU synchronized at both ends: the work, not its queueing)."""
        sync = torch.cuda.synchronize if run.device_type == "cuda" else lambda: None
        self.steps_seen += 1
        if self.steps_seen == warmup:
            sync()
            self.timing_mark = (it, time.time())
        elif self.timing_mark and (self.steps_seen == warmup + timed or it >= self.max_iters):
            sync()
            per_iter = (time.time() - self.timing_mark[1]) / (it - self.timing_mark[0])
            left_s = per_iter * (self.max_iters - it)
            peak = f", peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GB allocated" \
                if run.device_type == "cuda" else ""
            print(f"pre-flight: {it - self.timing_mark[0]} steps at {per_iter * 1000:.0f} ms/iter{peak}: about "
                  f"{int(left_s // 3600)}h{int(left_s % 3600 // 60):02d}m{int(left_s % 60):02d}s more to iteration "
                  f"{self.max_iters} (evaluations not counted)")
            self.timing_mark = None

    def eta(self, it):
        if self.it_start is None:
            self.it_start, self.t_start = it, time.time()
            return "?"
        done = it - self.it_start
        if done <= 0:
            return "?"
        left_s = (time.time() - self.t_start) / done * (self.max_iters - it)
        return f"{int(left_s // 60)}m{int(left_s % 60):02d}s"
