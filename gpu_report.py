"""
The GPU acceptance report: the first thing to run on a new GPU machine. Every GPU claim of docs/gpu.md,
measured in one command of a few minutes on one CUDA card, written to gpu-report.json and gpu-report.md:

    python gpu_report.py                         # about 5 minutes on one card
    python gpu_report.py --gpu_parts=decode      # only some parts (a comma list)
    python gpu_report.py --tiny=True             # every part with toy shapes on a CPU (the tests do)

Speed and memory benchmarks on any machine are bench.py's.
"""
import datetime
import functools
import gc
import importlib.metadata
import json
import os
import subprocess
import sys
import time
import traceback

import torch
import torch.nn.functional as F

from configurator import configure
from device import PTDTYPE, setup_device, wrap_ddp, wrap_fsdp
from engine import Engine, Request, compiled_step, generate
from lora import FrozenLinear, LoRALinear, add_lora
from memory import LLAMA2, predict_memory
from model import PRESETS, ModelArgs, RMSNorm, Transformer, answer_loss, chunked_cross_entropy, peak_flops
from tokenizer import write_text_file

# -----------------------------------------------------------------------------
device = "auto"              # auto: cuda, then mps, then cpu
dtype = "auto"               # auto: bfloat16 where supported, float32 on CPU
compile: bool = None         # torch.compile; None: on for CUDA, off elsewhere
tiny = False                 # small shapes and few iterations, so that the command itself runs on a CPU
gpu_report = "gpu-report"    # writes gpu-report.json and gpu-report.md
gpu_minutes = 8.0            # parts that would start after this many minutes are skipped (and say so)
gpu_parts = "loss,lora,train,sft_compile,decode,distributed"  # the parts to run (e.g. --gpu_parts=decode)
dist_wrap = ""               # set only by the report itself for its torchrun child: ddp or fsdp
# -----------------------------------------------------------------------------

# The shapes each part measures on a GPU, and the small ones --tiny runs instead (on a CPU, to test the code).
GPU_SHAPES = {
    "train_presets": ("demo", "24m", "58m", "134m"), "train_vocab": 32000, "train_batch": 32, "train_iters": 20,
    "sft_shape": "24m", "sft_batch": 8, "sft_batches": 6,
    "loss": (16384, 512, 64793),           # rows (32 x 512, the GPU configs' micro-batch), dim (58m), vocabulary
    "lora_model": "llama2-7b", "lora_seqs": (512, 2048), "lora_steps": 3,
    "decode_preset": "134m", "decode_tokens": 256, "decode_concurrency": (8, 32),
    "dist_preset": "58m", "dist_batch": 16, "dist_iters": 10,
}
TINY_SHAPE = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, max_seq_len=64)
GPU_SHAPES_TINY = {
    "train_presets": ("tiny",), "train_vocab": 512, "train_batch": 2, "train_iters": 2,
    "sft_shape": "tiny", "sft_batch": 2, "sft_batches": 3,
    "loss": (256, 64, 512),
    "lora_model": "tiny-llama", "lora_seqs": (32, 64), "lora_steps": 1,
    "decode_preset": "tiny", "decode_tokens": 8, "decode_concurrency": (2, 4),
    "dist_preset": "tiny", "dist_batch": 2, "dist_iters": 2,
}
LORA_TARGETS = {"wq", "wk", "wv", "wo", "w1", "w2", "w3"}


def shape_args(name, vocab):
    """ModelArgs of a preset, of --tiny's shape, or of a Llama 2 size (its own vocabulary)."""
    if name in LLAMA2:
        return ModelArgs(**LLAMA2[name])
    if name == "tiny-llama":  # Llama 2's layout (untied, hidden 11008/4096 of dim) at toy size
        return ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=vocab, hidden_dim=176,
                         max_seq_len=64, tie_embeddings=False)
    return ModelArgs(**(TINY_SHAPE if name == "tiny" else PRESETS[name]), vocab_size=vocab)


class GpuMeter:
    """Peak device memory (CUDA's allocator; None on a CPU) and wall time with the device synchronized."""

    def __init__(self, run):
        self.cuda = run.device_type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def start(self):
        """Free what the previous part left, reset the peak; returns the bytes still allocated."""
        gc.collect()
        if not self.cuda:
            return 0
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()

    def peak(self, since=0):
        return torch.cuda.max_memory_allocated() - since if self.cuda else None

    def time(self, fn, iters):
        """Seconds per call of fn, over iters calls after the device has finished what came before."""
        self.sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        self.sync()
        return (time.perf_counter() - t0) / iters


def error_line(e):
    """A row's error in one line: "out of memory" for what does not fit; anything else with its traceback printed."""
    if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e):
        return "out of memory"
    traceback.print_exc()
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


def timed_step(model, optimizer, run, batch):
    """One training step of model on batch (tokens and targets, or SFT's with loss_mask), in the run's precision:
    what the GPU parts time."""
    with run.autocast:
        loss = answer_loss(model, batch) if "loss_mask" in batch else model(**batch)[1]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def gpu_train(run, meter, shapes, peak_flops_s):
    """Pretraining steps (AdamW, synthetic tokens) of each preset in the run's dtype, eager and compiled."""
    rows = []
    backend = "inductor" if meter.cuda else "eager"  # --tiny on a CPU tests dynamo's tracing, not C++ codegen
    for preset in shapes["train_presets"]:
        for compiled in (False, True):
            args = shape_args(preset, shapes["train_vocab"])
            batch = shapes["train_batch"]
            tokens = batch * args.max_seq_len
            row = {"preset": preset, "compiled": compiled, "params": None, "batch": batch, "seq": args.max_seq_len,
                   "ms_per_iter": None, "tokens_per_s": None, "mfu": None, "first_iter_s": None,
                   "predicted_peak": predict_memory(args, tokens, compute=run.dtype)["total"],
                   "measured_peak": None, "error": None}
            rows.append(row)
            base = meter.start()
            try:
                torch.manual_seed(0)
                model = Transformer(args).to(run.device)
                row["params"] = model.num_params()
                optimizer = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), run.device_type, muon=False)
                step_model = torch.compile(model, backend=backend) if compiled else model
                x = torch.randint(0, args.vocab_size, (batch, args.max_seq_len), device=run.device)
                step = functools.partial(timed_step, step_model, optimizer, run, dict(tokens=x, targets=x))
                row["first_iter_s"] = meter.time(step, 1)  # the compile, where there is one
                meter.time(step, 2)
                seconds = meter.time(step, shapes["train_iters"])
                row["ms_per_iter"], row["tokens_per_s"] = seconds * 1000, tokens / seconds
                if peak_flops_s:
                    row["mfu"] = model.flops_per_token(args.max_seq_len) * tokens / seconds / peak_flops_s
                row["measured_peak"] = meter.peak(base)
            except Exception as e:
                row["error"] = error_line(e)
            finally:
                model = optimizer = step_model = None
                torch._dynamo.reset()
            print(f"train {preset}{' compiled' if compiled else ''}: " + (row["error"] or
                  f"{row['tokens_per_s']:,.0f} tokens/s, peak {fmt_gb(row['measured_peak'])} "
                  f"(predicted {fmt_gb(row['predicted_peak'])})"), flush=True)
    return rows


def sft_batch(batch, seq, vocab, generator):
    """A packed SFT batch of synthetic tokens: each row 1-3 conversations whose last part is the answer
    (loss_mask 1), positions restarting per conversation, attention within each conversation only."""
    x = torch.randint(0, vocab, (batch, seq), generator=generator)
    mask = torch.zeros(batch, seq)
    positions = torch.zeros(batch, seq, dtype=torch.long)
    segment = torch.zeros(batch, seq, dtype=torch.long)
    for b in range(batch):
        cuts = sorted(torch.randint(1, seq, (int(torch.randint(0, 3, (1,), generator=generator)),),
                                    generator=generator).tolist())
        for k, (start, end) in enumerate(zip([0] + cuts, cuts + [seq])):
            if end <= start:
                continue
            answer = int(torch.randint(1, end - start + 1, (1,), generator=generator))
            mask[b, end - answer:end] = 1.0
            positions[b, start:end] = torch.arange(end - start)
            segment[b, start:end] = k
    causal = torch.tril(torch.ones(seq, seq, dtype=torch.bool))
    attn_mask = ((segment[:, :, None] == segment[:, None, :]) & causal)[:, None]      # (B, 1, T, T)
    return {"tokens": x, "targets": torch.roll(x, -1, 1), "loss_mask": mask, "positions": positions,
            "attn_mask": attn_mask}


def gpu_sft_compile(run, meter, shapes):
    """Compiled SFT as sft.py runs it on GPUs (static shapes: the classifier on every position, non-answer
    positions weighted 0): graphs compiled and graph breaks over batches of different answer counts."""
    from torch._dynamo.utils import counters

    args = shape_args(shapes["sft_shape"], shapes["train_vocab"])
    torch._dynamo.reset()
    counters.clear()
    meter.start()
    torch.manual_seed(0)
    model = Transformer(args).to(run.device).train()
    compiled = torch.compile(model, backend="inductor" if meter.cuda else "eager", dynamic=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    answer_tokens, seconds = [], []
    for _ in range(shapes["sft_batches"]):
        batch = {k: v.to(run.device) for k, v in
                 sft_batch(shapes["sft_batch"], args.max_seq_len, args.vocab_size, generator).items()}
        answer_tokens.append(int(batch["loss_mask"].sum()))
        seconds.append(meter.time(lambda: timed_step(compiled, optimizer, run, batch), 1))
    result = {"shape": shapes["sft_shape"], "batch": shapes["sft_batch"], "seq": args.max_seq_len,
              "answer_tokens": answer_tokens, "graphs": int(counters["stats"]["unique_graphs"]),
              "graph_breaks": int(sum(counters["graph_break"].values())), "first_step_s": seconds[0],
              "later_steps_ms": [s * 1000 for s in seconds[1:]]}
    torch._dynamo.reset()
    print(f"sft compile: {result['graphs']} graph(s), {result['graph_breaks']} graph breaks over answer counts "
          f"{answer_tokens}", flush=True)
    return result


def gpu_loss(run, meter, shapes):
    """The classifier and cross-entropy, forward and backward, plain and chunked: peak above the inputs, time."""

    n, dim, vocab = shapes["loss"]
    rows = []
    for name in ("plain", "chunked"):
        row = {"loss": name, "rows": n, "dim": dim, "vocab": vocab, "peak_above_inputs": None, "ms": None,
               "value": None, "error": None}
        rows.append(row)
        meter.start()
        try:
            torch.manual_seed(0)
            h = torch.randn(n, dim, device=run.device, requires_grad=True)
            w = (torch.randn(vocab, dim, device=run.device) * 0.02).requires_grad_()
            t = torch.randint(0, vocab, (n,), device=run.device)
            base = meter.start()

            def step():
                with run.autocast:
                    if name == "plain":
                        loss = F.cross_entropy(F.linear(h, w).float(), t)
                    else:  # small chunks on --tiny's shapes, so that it is really chunked there too
                        loss = chunked_cross_entropy(h, w, t, chunk_rows=None if meter.cuda else 64)
                loss.backward()
                h.grad = w.grad = None
                row["value"] = loss.item()

            step()  # warm-up: the peak of the step is the same every time
            row["ms"] = meter.time(step, 3) * 1000
            row["peak_above_inputs"] = meter.peak(base)
        except Exception as e:
            row["error"] = error_line(e)
        finally:
            h = w = None
        print(f"loss {name}: " + (row["error"] or f"peak above inputs {fmt_gb(row['peak_above_inputs'])}, "
                                                  f"{row['ms']:.1f} ms"), flush=True)
    return rows


def materialized_lora_model(args, base_dtype, device):
    """A LoRA model of args's shape built on the meta device, materialized on device with random weights, each
    frozen matrix directly in base_dtype (no fp32 copy of the base ever exists); adapters as add_lora makes them."""
    with torch.device("meta"):
        model = add_lora(Transformer(args), LORA_TARGETS, 8, 16.0, 0.0, base_dtype)
    model.to_empty(device=device)
    model.init_rope(device)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, FrozenLinear):
                if module.scale is not None:                                  # int8: uniform codes, one scale a row
                    module.weight.random_(-127, 128)
                    module.scale.fill_(0.04 / 127)
                else:
                    module.weight.normal_(0.0, 0.02)
            elif isinstance(module, LoRALinear):
                torch.nn.init.kaiming_uniform_(module.lora_a, a=5 ** 0.5)
                module.lora_b.zero_()
            elif isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.normal_(0.0, 0.02)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
    return model


def gpu_lora(run, meter, shapes, peak_flops_s):
    """LoRA r8 on every matrix of a Llama-2-7B-shaped model (random weights), bf16 and int8 base: steps."""
    rows = []
    args = shape_args(shapes["lora_model"], shapes["train_vocab"])
    setups = [(base_dtype, seq, False) for base_dtype in ("bfloat16", "int8") for seq in shapes["lora_seqs"]]
    setups.append(("int8", shapes["lora_seqs"][-1], True))
    model, built = None, None
    for base_dtype, seq, checkpointing in setups:
        row = {"model": shapes["lora_model"], "base_dtype": base_dtype, "seq": seq, "checkpointing": checkpointing,
               "ms_per_step": None, "tokens_per_s": None, "mfu": None,
               "predicted_peak": predict_memory(args, seq, lora_rank=8, base_dtype=base_dtype, compute=run.dtype,
                                                checkpointing=checkpointing)["total"],
               "measured_peak": None, "error": None}
        rows.append(row)
        try:
            if built != base_dtype:
                model = optimizer = None
                base = meter.start()
                torch.manual_seed(0)
                model = materialized_lora_model(args, base_dtype, run.device)
                optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                              fused=meter.cuda)
                built = base_dtype
            model.checkpoint_activations = checkpointing
            model.train()
            if meter.cuda:
                torch.cuda.reset_peak_memory_stats()
            x = torch.randint(0, args.vocab_size, (1, seq), device=run.device)
            step = functools.partial(timed_step, model, optimizer, run, dict(tokens=x, targets=x))
            step()
            seconds = meter.time(step, shapes["lora_steps"])
            row["ms_per_step"], row["tokens_per_s"] = seconds * 1000, seq / seconds
            if peak_flops_s:
                row["mfu"] = model.flops_per_token(seq) * seq / seconds / peak_flops_s
            row["measured_peak"] = meter.peak(base)
        except Exception as e:
            row["error"] = error_line(e)
            model = optimizer = built = None
        print(f"lora {base_dtype} seq {seq}{' checkpointing' if checkpointing else ''}: " + (row["error"] or
              f"{row['tokens_per_s']:,.0f} tokens/s, peak {fmt_gb(row['measured_peak'])} "
              f"(predicted {fmt_gb(row['predicted_peak'])})"), flush=True)
    return rows


def gpu_decode(run, meter, shapes):
    """Greedy decoding tokens/s of a preset's shape (random weights, the run's dtype): batch 1 eager and with the
    compiled step (sample.py --compile=True), then several concurrent requests through engine.py (serve.py's)."""
    meter.start()
    torch.manual_seed(0)
    args = shape_args(shapes["decode_preset"], shapes["train_vocab"])
    model = Transformer(args).eval().to(device=run.device, dtype=PTDTYPE[run.dtype])
    n = shapes["decode_tokens"]
    prompt = torch.randint(0, args.vocab_size, (1, 8), device=run.device)
    rows = []
    step = compiled_step(model, backend="inductor" if meter.cuda else "eager")
    engine = None

    def one_request(kw):
        list(generate(model, prompt, 8, temperature=0, **kw))  # warm-up (and the compile)
        meter.sync()
        t0 = time.perf_counter()
        count = sum(1 for _ in generate(model, prompt, n, temperature=0, **kw))
        meter.sync()
        return count, time.perf_counter() - t0

    def concurrent(concurrency):
        nonlocal engine
        engine = engine or Engine(model, max(shapes["decode_concurrency"]), max_queue=256)
        requests = [Request(prompt[0].tolist(), n, temperature=0.0) for _ in range(concurrency)]
        t0 = time.perf_counter()
        for request in requests:
            engine.submit(request)
        count = 0
        for request in requests:
            while request.out.get()[0] == "token":
                count += 1
        return count, time.perf_counter() - t0

    setups = [("batch 1, eager", 1, lambda: one_request({})),
              ("batch 1, compiled step", 1, lambda: one_request({"step": step}))]
    setups += [(f"engine, {c} concurrent", c, lambda c=c: concurrent(c)) for c in shapes["decode_concurrency"]]
    for label, requests, fn in setups:
        row = {"setup": label, "requests": requests, "tokens": None, "tokens_per_s": None, "error": None}
        rows.append(row)
        try:
            row["tokens"], seconds = fn()
            row["tokens_per_s"] = row["tokens"] / seconds
        except Exception as e:
            row["error"] = error_line(e)
        print(f"decode {shapes['decode_preset']} {label}: "
              + (row["error"] or f"{row['tokens_per_s']:,.0f} tokens/s"), flush=True)
    torch._dynamo.reset()
    return rows


def gpu_distributed(run, shapes, processes):
    """The same pretraining step under DDP and under FSDP2 on `processes` GPUs (gloo CPU processes with --tiny)."""
    rows = []
    for wrap in ("ddp", "fsdp"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               os.path.abspath(__file__), f"--tiny={tiny}", f"--device={run.device_type}",
               f"--dist_wrap={wrap}"]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
        if lines:  # measured (a crash while tearing the processes down afterwards changes no number)
            row = json.loads(lines[-1])
        else:  # torchrun's own report ends stderr: the cause is the last line that names an error
            print(p.stderr[-3000:], file=sys.stderr)
            causes = [l.strip() for l in p.stderr.splitlines() if "Error" in l or "error" in l] or ["no output"]
            row = {"wrap": wrap, "error": causes[-1][:200]}
        rows.append(row)
        speed = row.get("error") or f"{row['tokens_per_s']:,.0f} tokens/s, peak {fmt_gb(row['measured_peak'])}"
        print(f"distributed {wrap} on {processes} processes: {speed}", flush=True)
    return rows


def distributed_child():
    """One process of gpu_distributed (under torchrun, with --dist_wrap set): pretraining steps of a preset under
    DDP or FSDP2."""
    shapes = GPU_SHAPES_TINY if tiny else GPU_SHAPES
    run = setup_device(device, dtype, False, keep_memory=False)
    meter = GpuMeter(run)
    args = shape_args(shapes["dist_preset"], shapes["train_vocab"])
    batch = shapes["dist_batch"]
    torch.manual_seed(0)
    model = Transformer(args).to(run.device)
    if dist_wrap == "fsdp":
        step_model = wrap_fsdp(model, run)
    else:
        step_model = wrap_ddp(model, run)
    optimizer = torch.optim.AdamW(step_model.parameters(), lr=1e-4, fused=meter.cuda)
    x = torch.randint(0, args.vocab_size, (batch, args.max_seq_len), device=run.device)
    base = meter.start()
    step = functools.partial(timed_step, step_model, optimizer, run, dict(tokens=x, targets=x))
    meter.time(step, 2)
    seconds = meter.time(step, shapes["dist_iters"])
    if run.master:
        tokens = batch * args.max_seq_len * run.world_size
        print(json.dumps({"wrap": dist_wrap, "preset": shapes["dist_preset"], "processes": run.world_size,
                          "batch_per_process": batch, "ms_per_iter": seconds * 1000, "tokens_per_s": tokens / seconds,
                          "measured_peak": meter.peak(base), "error": None}), flush=True)
    torch.distributed.barrier()  # no process tears the group down while another still talks to it
    torch.distributed.destroy_process_group()


def fmt_gb(n):
    return "-" if n is None else f"{n / 2**30:.2f} GB"


def gpu_markdown(report):
    """The report as the tables docs/gpu.md shows."""
    d = report["device"]
    lines = [f"Measured by `python gpu_report.py{' --tiny=True' if report['tiny'] else ''}` on {d['name']} "
             f"(compute capability {d['capability']}, {fmt_gb(d['memory'])}), torch {d['torch']}, CUDA {d['cuda']}, "
             f"Triton {d['triton']}, {report['dtype']}; {report['date']}.", ""]

    def table(header, rows):
        lines.extend(["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)])
        lines.extend("| " + " | ".join(str(c) for c in row) + " |" for row in rows)
        lines.append("")

    def num(x, spec):
        return "-" if x is None else format(x, spec)

    def part(name):
        value = report[name]
        if value == "not run":  # left out by --gpu_parts
            return None
        if isinstance(value, str):  # skipped, or the part failed: the reason
            lines.extend([f"{name}: {value}", ""])
            return None
        return value

    if (rows := part("train")) is not None:
        lines.append("**Pretraining steps** (AdamW, synthetic tokens; peak = `torch.cuda.max_memory_allocated`):")
        table(["preset", "compiled", "batch x seq", "ms/iter", "tokens/s", "MFU", "first iter", "peak predicted",
               "peak measured"],
              [[r["preset"], r["compiled"], f"{r['batch']} x {r['seq']}", num(r["ms_per_iter"], ".1f"),
                num(r["tokens_per_s"], ",.0f"), num(r["mfu"] and r["mfu"] * 100, ".1f") + "%" if r["mfu"] else "-",
                num(r["first_iter_s"], ".1f") + " s" if r["first_iter_s"] is not None else "-",
                fmt_gb(r["predicted_peak"]), r["error"] or fmt_gb(r["measured_peak"])] for r in rows])
    if (s := part("sft_compile")) is not None:
        lines.extend([f"**Compiled SFT** ({s['shape']}, {s['batch']} x {s['seq']}, answer tokens per batch "
                      f"{s['answer_tokens']}): {s['graphs']} graph(s) compiled, {s['graph_breaks']} graph breaks; "
                      f"first step {s['first_step_s']:.1f} s, later steps "
                      f"{', '.join(f'{ms:.0f}' for ms in s['later_steps_ms'])} ms.", ""])
    if (rows := part("loss")) is not None:
        lines.append("**Classifier + cross-entropy**, forward and backward:")
        table(["loss", "rows x dim x vocab", "peak above inputs", "ms"],
              [[r["loss"], f"{r['rows']} x {r['dim']} x {r['vocab']}", r["error"] or fmt_gb(r["peak_above_inputs"]),
                num(r["ms"], ".1f")] for r in rows])
    if (rows := part("lora")) is not None:
        lines.append("**LoRA r8 on every matrix** (random weights, batch 1, AdamW on the adapters):")
        table(["model", "base", "seq", "checkpointing", "ms/step", "tokens/s", "MFU", "peak predicted",
               "peak measured"],
              [[r["model"], r["base_dtype"], r["seq"], r["checkpointing"], num(r["ms_per_step"], ".0f"),
                num(r["tokens_per_s"], ",.0f"), num(r["mfu"] and r["mfu"] * 100, ".1f") + "%" if r["mfu"] else "-",
                fmt_gb(r["predicted_peak"]), r["error"] or fmt_gb(r["measured_peak"])] for r in rows])
    if (rows := part("decode")) is not None:
        lines.append(f"**Greedy decoding**, {report['shapes']['decode_preset']} shape, random weights:")
        table(["setup", "requests", "tokens generated", "tokens/s"],
              [[r["setup"], r["requests"], num(r["tokens"], "d"), r["error"] or num(r["tokens_per_s"], ",.0f")]
               for r in rows])
    if (rows := part("distributed")) is not None:
        lines.append("**Several GPUs**, the same pretraining step:")
        table(["wrap", "processes", "ms/iter", "tokens/s", "peak"],
              [[r["wrap"], r.get("processes", "-"), num(r.get("ms_per_iter"), ".1f"),
                num(r.get("tokens_per_s"), ",.0f"), r["error"] or fmt_gb(r.get("measured_peak"))] for r in rows])
    return "\n".join(lines)


def main():
    """
    Every GPU claim of docs/gpu.md, measured in one command of a few minutes on one CUDA card: pretraining
    tokens/s, MFU and peak memory (predicted beside measured) for the presets, eager and compiled;
    compiled SFT's graph count over batches of different answer counts; the chunked loss's memory; LoRA
    on a Llama-2-7B-shaped model with a bf16 and an int8 base; decoding at batch 1 and through the
    engine; DDP and FSDP2 where several GPUs are visible. Parts that do not fit the card say so and the
    rest go on; the report is rewritten after each part, so a run cut short keeps what it measured.
    --tiny=True runs every part with toy shapes on a CPU (the tests do).
    """
    run = setup_device(device, dtype, compile, keep_memory=False)
    cuda = run.device_type == "cuda"
    if not cuda and not tiny:
        raise SystemExit("error: gpu_report.py measures a CUDA GPU and none is visible here; --tiny=True runs it "
                         "with toy shapes on this machine")
    shapes = GPU_SHAPES_TINY if tiny else GPU_SHAPES
    meter = GpuMeter(run)
    name = torch.cuda.get_device_name() if cuda else "cpu"
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = None
    report = {"tiny": tiny, "date": datetime.date.today().isoformat(), "dtype": run.dtype, "shapes": shapes,
              "device": {"name": name, "count": torch.cuda.device_count() if cuda else 0,
                         "capability": ".".join(map(str, torch.cuda.get_device_capability())) if cuda else None,
                         "memory": torch.cuda.get_device_properties(0).total_memory if cuda else None,
                         "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton,
                         "peak_flops": peak_flops(name) if cuda else None},
              "train": "not run", "sft_compile": "not run", "loss": "not run", "lora": "not run",
              "decode": "not run", "distributed": "not run"}
    processes = torch.cuda.device_count() if cuda else 2
    # the quick parts first, so that a card that is slow to compile still reports memory
    parts = [("loss", lambda: gpu_loss(run, meter, shapes)),
             ("lora", lambda: gpu_lora(run, meter, shapes, report["device"]["peak_flops"])),
             ("train", lambda: gpu_train(run, meter, shapes, report["device"]["peak_flops"])),
             ("sft_compile", lambda: gpu_sft_compile(run, meter, shapes)),
             ("decode", lambda: gpu_decode(run, meter, shapes)),
             ("distributed", lambda: gpu_distributed(run, shapes, processes) if processes > 1 else
              f"skipped: {processes} GPU visible")]
    print(f"== gpu_report.py on {name}{' (--tiny)' if tiny else ''}, {run.dtype}; report: {gpu_report}.json/.md")
    t0 = time.time()
    for part, fn in parts:
        if part not in gpu_parts.split(","):
            continue
        if time.time() - t0 > gpu_minutes * 60:
            report[part] = f"skipped: past --gpu_minutes={gpu_minutes:g}"
        else:
            try:
                report[part] = fn()
            except Exception as e:  # one part's failure is recorded; the others still run
                report[part] = f"failed: {error_line(e)}"
                print(f"{part}: {report[part]}", flush=True)
        report["seconds"] = time.time() - t0
        write_text_file(gpu_report + ".json", json.dumps(report, indent=1))  # a run cut short keeps its last parts
        write_text_file(gpu_report + ".md", gpu_markdown(report) + "\n")
    print(f"wrote {gpu_report}.json and {gpu_report}.md in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    configure(globals())
    distributed_child() if dist_wrap else main()
