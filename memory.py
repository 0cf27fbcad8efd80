"""
What a training run will need, known before it starts: the memory formula (checked against real steps
on a CPU and on an H200: docs/memory.md, docs/gpu.md), the memory the device has, and the pre-flight
check that pretrain.py, sft.py and dpo.py run before they put the model on the device.
"""
import os

import torch

GB = 1 << 30


def gb(n):
    """Bytes as GB for a message: one decimal from 10 GB up, two from 0.1 GB, three below."""
    return f"{n / GB:.1f}" if n >= 10 * GB else f"{n / GB:.2f}" if n >= GB / 10 else f"{n / GB:.3f}"


# Llama 2's published shapes (Meta's params.json / Hugging Face config.json), for memory planning without the weights
LLAMA2 = {"llama2-7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, vocab_size=32000, hidden_dim=11008,
                            max_seq_len=4096, tie_embeddings=False),
          "llama2-13b": dict(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, vocab_size=32000, hidden_dim=13824,
                             max_seq_len=4096, tie_embeddings=False)}
WEIGHT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}


def predict_memory(args, tokens, lora_rank=0, base_dtype="float32", compute="float32", checkpointing=False,
                   processes=1, fsdp=False, vocab_rows=None, train_embeddings=False, reuse_freed=True):
    """
    Bytes one process holds at its peak while training args's model on `tokens` tokens per micro-step:
    a dict of weights, gradients, optimizer state, activations and the total. The counts (docs/memory.md):
    - weights: fp32 for everything trained; with LoRA the blocks' frozen matrices in base_dtype (int8:
      plus an fp32 scale per output row), the embedding, classifier and norms in fp32, the adapters fp32
      (train_embeddings: the embedding and classifier trained in full beside them).
      Training everything under bf16 autocast adds autocast's bf16 copy of each matrix during the forward.
    - gradients: fp32, one per trained parameter; AdamW state: two fp32 moments per trained parameter.
    - activations, per token and block, counted from what model.py's autograd graph keeps for the
      backward pass: trained in full, 9 dim + 2 kv + 4 hidden values (each norm's input, its normalized
      value and its scaled output; q, k, v after RoPE; attention's output and its reshaped copy; the
      MLP's gate, SiLU, up and product); with LoRA on every matrix 7 dim + 2 kv + 4 hidden (frozen norm
      gains need no saved input). kv is dim when heads are grouped (k and v repeated before attention).
      Checkpointing keeps one dim per block and recomputes one block at a time. Values are fp32 on the
      residual stream and in the norms, the compute dtype elsewhere. The classifier adds 4 logits-sized
      fp32 tensors (logits, log-softmax, and their gradients) where the loss is not chunked.
    - the peak: weights + optimizer state + the larger of (activations + logits) at the start of the
      backward pass and (gradients + one fp32 temporary per trained parameter) at the optimizer step,
      where freed memory is reused for what comes next (a GPU's caching allocator). reuse_freed=False
      (the training scripts on a CPU, whose malloc keeps freed blocks: device.keep_freed_memory) adds the
      two instead: measured, the step's moments and temporaries do not land in the activations' freed blocks.
    - FSDP over N processes: weights, gradients and optimizer state divided by N, plus the gathered
      weights in the compute dtype of the unsharded root (embedding, classifier) and two blocks (one
      computing, one prefetched). DDP: every process holds everything, plus its gradient buckets.
      With reuse_freed=False only the optimizer state is divided: every process receives rank 0's whole
      weights tensor by tensor, computes full-size gradients and copies them for the reduce-scatter, and a
      checkpoint gathers the trained weights whole; malloc keeps all of it beside the shards.
    """
    from model import CHUNKED_LOSS_ABOVE
    D, L, V = args.dim, args.n_layers, vocab_rows or args.vocab_size
    H = args.hidden_dim or args.multiple_of * ((int(8 * D / 3) + args.multiple_of - 1) // args.multiple_of)
    kv_dim = D // args.n_heads * (args.n_kv_heads or args.n_heads)
    kv = D if kv_dim < D else kv_dim                                   # GQA: k and v repeated to every head
    block_matrices = L * (2 * D * D + 2 * D * kv_dim + 3 * D * H)
    embeddings = V * D * (1 if args.tie_embeddings else 2)
    norms = L * 2 * D + D
    c = WEIGHT_BYTES[compute]
    if lora_rank:
        adapters = L * lora_rank * (2 * D + 2 * (D + kv_dim) + 2 * D + 3 * (D + H))
        trained = adapters + (embeddings if train_embeddings else 0)
        scales = L * (2 * D + 2 * kv_dim + 2 * H + D) * 4 if base_dtype == "int8" else 0
        weights = block_matrices * WEIGHT_BYTES[base_dtype] + scales + (embeddings + norms + adapters) * 4
        per_block = (7 * D + 2 * kv + 4 * H)
        fp32_share = 4 * D                                             # block inputs and norm outputs
    else:
        trained = block_matrices + embeddings + norms
        weights = trained * 4 + ((block_matrices + embeddings) * 2 if c == 2 else 0)  # autocast's bf16 copies
        per_block = (9 * D + 2 * kv + 4 * H)
        fp32_share = 6 * D
    block_bytes = fp32_share * 4 + (per_block - fp32_share) * c        # per token
    if checkpointing:
        activations = tokens * (L * D * 4 + block_bytes)
    else:
        activations = tokens * L * block_bytes
    activations += tokens * D * 4 * 3                                  # the embedding output and the final norm
    logits = 4 * tokens * V * 4 if tokens * V <= CHUNKED_LOSS_ABOVE else 4 * (CHUNKED_LOSS_ABOVE // 4) * 4
    gradients, optimizer = trained * 4, trained * 8
    if fsdp and processes > 1:
        gathered = (embeddings + norms + 2 * block_matrices // L) * c
        optimizer = optimizer / processes
        if reuse_freed:
            weights, gradients = weights / processes + gathered, gradients / processes
        else:  # full-size weights and gradients pass through every process, and malloc keeps them (docs/memory.md)
            weights, gradients = weights + gathered + trained * 4, gradients * 2 + gradients / processes
    step = gradients + trained * 4 / (processes if fsdp else 1)
    peak = weights + optimizer + (max(activations + logits, step) if reuse_freed else activations + logits + step)
    return {"weights": weights, "gradients": gradients, "optimizer": optimizer, "activations": activations + logits,
            "total": peak}


def available_memory(run):
    """(bytes one process may use on its device, where that number comes from), or (None, why not)."""
    if run.device_type == "cuda":
        free, total = torch.cuda.mem_get_info(run.device)
        return free, f"{torch.cuda.get_device_name(run.device)} has {free / GB:.1f} GB free of {total / GB:.1f}"
    if run.device_type == "mps":
        if hasattr(torch.mps, "recommended_max_memory"):
            return torch.mps.recommended_max_memory(), "the Apple GPU's recommended maximum"
        return None, "this torch cannot say how much memory the Apple GPU has"
    try:
        with open("/proc/meminfo") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None, "this system does not report its available memory"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # processes on this machine share its memory
    share = f", shared by {local} processes" if local > 1 else ""
    limit = container_memory_left()
    if limit is not None and limit < kb * 1024:  # a container's (Docker's, Slurm's) limit, below the machine's
        return limit // local, f"this container has {limit / GB:.1f} GB left under its memory limit{share}"
    return kb * 1024 // local, f"this machine has {kb * 1024 / GB:.1f} GB available{share}"


def stored_bytes(model):
    """The bytes a model's weights and buffers take where they are stored (a tied weight once; none on the meta
    device, where FSDP's other processes hold the model until rank 0's weights arrive)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()) if not t.is_meta)


def largest_of_processes(value):
    """The largest of a number that every process of a torchrun run passes."""
    import torch.distributed as dist
    t = torch.tensor([float(value)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def resident_bytes():
    """This process's resident memory now (Linux's /proc/self/status VmRSS), or None where it is not known."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return None


def container_memory_left(root="/sys/fs/cgroup"):
    """Bytes this process's cgroup may still use (its memory limit less its use), or None without a limit:
    cgroup v2's memory.max and memory.current, or v1's limit_in_bytes and usage_in_bytes."""
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            with open(os.path.join(root, limit_file)) as f:
                limit = f.read().strip()
            with open(os.path.join(root, usage_file)) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # "max", or v1's huge number: no limit
            return max(0, int(limit) - usage)
    return None


def preflight(model, run, block_size, batch_size, accumulation, lora_rank=0, base_dtype="float32",
              checkpointing=False, fsdp=False, rows_per_item=1, extra_bytes=0, memory_gb=0.0, auto_batch=False,
              extra_rows=0):
    """
    Print the plan (parameters, the predicted peak per device, the device's memory) and stop, in one line naming
    settings that fit, when the prediction exceeds the memory; with auto_batch, first pick the largest micro-batch
    that fits among the divisors of batch_size x accumulation, keeping their product (the tokens per optimizer
    step). model: built, not yet on the device (on the CPU it is already in memory: its bytes count as available).
    rows_per_item: sequences per batch item (a DPO pair is two). extra_bytes: what else lives on the device (DPO's
    reference model). extra_rows: sequences each micro-step adds beside the batch (SFT's replayed text). memory_gb >
    0 plans for that much memory instead of what the device reports. The optimizer state is counted as AdamW's two
    moments (Muon keeps one for its matrices: an overestimate there). Returns (batch_size, accumulation, the plan:
    its predicted GB by part and the memory it planned against, for the trackers).
    """
    trained, total = model.num_params(trained=True), model.num_params()
    train_embeddings = bool(lora_rank) and model.tok_embeddings.weight.requires_grad

    # on the CPU the device is this process: its peak is also Python, torch and the data it has read (all
    # it holds now but the model, which is already in memory here), and its malloc keeps freed blocks.
    # memory_gb plans for a device of that size (a GPU one does not have): the tensors alone
    on_cpu = run.device_type == "cpu" and not memory_gb > 0
    model_bytes = stored_bytes(model)
    now = resident_bytes() if on_cpu else None
    process = max(0, now - model_bytes) if now is not None else 0
    if on_cpu and run.ddp:  # every process plans for the largest: under FSDP rank 0 alone has read the base so far
        process = largest_of_processes(process)

    def predict(batch=None, **changes):
        settings = dict(lora_rank=lora_rank, base_dtype=base_dtype, checkpointing=checkpointing,
                        processes=run.world_size, fsdp=fsdp, reuse_freed=not on_cpu)
        settings.update(changes)
        tokens = ((batch or batch_size) * rows_per_item + extra_rows) * block_size
        m = predict_memory(model.args, tokens, compute=run.dtype, train_embeddings=train_embeddings, **settings)
        return dict(m, total=m["total"] + extra_bytes + process)

    if memory_gb > 0:
        limit, source = memory_gb * GB, f"--device_memory_gb={memory_gb:g}"
    else:
        limit, source = available_memory(run)
        if limit is not None and on_cpu:  # what this process holds now is not available, and counted above
            limit += now if now is not None else model_bytes
    if auto_batch and limit is not None:
        per_step = batch_size * accumulation
        fitting = [b for b in range(per_step, 0, -1) if per_step % b == 0 and predict(b)["total"] <= limit]
        if fitting and fitting[0] != batch_size and run.master:
            print(f"auto_batch_size: {fitting[0]} x {per_step // fitting[0]} accumulation "
                  f"(was {batch_size} x {accumulation}): the largest micro-batch that fits, the same per step")
        if fitting:
            batch_size, accumulation = fitting[0], per_step // fitting[0]
    m = predict()
    if run.master:
        parts = ", ".join(f"{k} {gb(m[k])}" for k in ("weights", "optimizer", "gradients", "activations"))
        print(f"pre-flight: {total / 1e6:.2f}M parameters ({trained / 1e6:.2f}M trained, "
              f"{(total - trained) / 1e6:.2f}M frozen), {batch_size} x {rows_per_item * block_size} tokens "
              f"per micro-step"
              + (f" + {extra_rows} x {block_size} replayed" if extra_rows else ""))
        print(f"pre-flight: predicted peak per device {gb(m['total'])} GB ({parts}"
              + (f", a second model {gb(extra_bytes)}" if extra_bytes else "")
              + (f", the process itself {gb(process)}" if process else "") + f"); {source}")
    plan = {f"{k}_gb": m[k] / GB for k in ("total", "weights", "optimizer", "gradients", "activations")}
    plan["device_memory_gb"] = limit / GB if limit is not None else None
    if limit is None or m["total"] <= limit:
        return batch_size, accumulation, plan
    # what would fit instead, each change alone (then with checkpointing), keeping the tokens per step
    fixes = []
    per_step = batch_size * accumulation
    smaller = [b for b in range(batch_size - 1, 0, -1) if per_step % b == 0 and predict(b)["total"] <= limit]
    if smaller:
        fixes.append(f"--batch_size={smaller[0]} --gradient_accumulation_steps={per_step // smaller[0]} "
                     f"({gb(predict(smaller[0])['total'])} GB)")
    if not checkpointing and predict(checkpointing=True)["total"] <= limit:
        fixes.append(f"--checkpoint_activations=True ({gb(predict(checkpointing=True)['total'])} GB)")
    if lora_rank and base_dtype != "int8" and predict(base_dtype="int8")["total"] <= limit:
        fixes.append(f"--base_dtype=int8 ({gb(predict(base_dtype='int8')['total'])} GB)")
    if run.device_type == "cuda" and not fsdp:
        n = next((n for n in (2, 4, 8) if predict(fsdp=True, processes=n)["total"] <= limit), None)
        if n:
            fixes.append(f"FSDP over {n} GPUs: torchrun --nproc_per_node={n} ... --fsdp=True "
                         f"({gb(predict(fsdp=True, processes=n)['total'])} GB each)")
    if not fixes and predict(1, checkpointing=True)["total"] <= limit:
        fixes.append(f"--batch_size=1 --gradient_accumulation_steps={per_step} --checkpoint_activations=True")
    raise SystemExit(f"error: this run needs about {gb(m['total'])} GB per device, more than the {gb(limit)} "
                     f"GB it has ({source}); " + ("settings that fit: " + "; or ".join(fixes) if fixes else
                                                   "no single change of batch, checkpointing or base dtype fits: "
                                                   "use more GPUs with --fsdp=True, or a smaller model")
                     if run.master else 1)
