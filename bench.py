"""
Benchmarks: speed and memory, measured side by side in one process where a ratio is claimed. Nothing
here is asserted by the tests: machines are noisy.

    python bench.py --what=prep      # prepare_data.py tokens/s, 1 worker vs all cores; peak RSS on a generated JSONL
    python bench.py --what=train     # training tokens/s (and MFU on a GPU) for the presets in --presets
    python bench.py --what=decode    # decode tokens/s: ours (KV cache or not), llama.cpp F32/Q8_0, llama2.c if built
    python bench.py --what=load      # peak memory while importing a generated Hugging Face Llama checkpoint
    python bench.py --what=loss      # peak memory of the classifier + loss at a GPU config's shape, plain vs chunked
    python bench.py --what=serve     # serve.py: tokens/s and time to first token, batched vs one request at a time
    python bench.py --what=memory    # training memory per GPU, predicted (Llama-2-7B: LoRA, int8, FSDP) and checked on CPU
    python bench.py --what=lora      # training tokens/s: full vs LoRA on fp32/bf16/int8 bases, checkpointing, the adapters' share
    python bench.py --what=gpu       # the first thing to run on a new GPU machine: every GPU claim, measured in minutes

The numbers, with the machine they were measured on, are in docs/benchmarks.md.
"""
import contextlib
import functools
import json
import os
import resource
import subprocess
import sys
import time

import torch

from configurator import configure
from memory import LLAMA2, predict_memory

# -----------------------------------------------------------------------------
what = "all"                 # prep, train, decode, load, loss, serve, memory, lora, gpu, or all (all but gpu)
data_dir = "data"            # prepared demo data (python prepare_data.py)
out_dir = "out"              # the checkpoint to decode with
big_jsonl_gb = 1.0           # size of the generated JSONL for the memory test; 0 skips it
presets = "demo"             # comma-separated presets for --what=train
vocab_size = 0               # train: 0 = the data's tokenizer size; 64793 matches the size table's names
batch_size = 8               # train: sequences per step
iters = 10                   # timed training iterations (after 3 warm-up ones)
decode_tokens = 200          # decode: tokens generated per measurement
runc_dir = ""                # decode: a llama2.c checkout with run and runq built, for their rows too
load_layers = 16             # load: layers of the generated checkpoint (dim 1024, vocab 32000: about 0.5 GB in bf16)
loss_shape = "16384,512,64793"  # loss: rows (32 x 512, the GPU configs' micro-batch), dim (58m), vocabulary
serve_dir = "out-sft"        # serve: the checkpoint to serve
serve_clients = "1,4,8,16"   # serve: numbers of concurrent streaming clients
serve_requests = 4           # serve: requests each client sends, one after another
memory_model = "llama2-7b"   # memory: llama2-7b, llama2-13b, a preset, or an imported Llama's directory (its config)
memory_seq = "512,2048"      # memory: sequence lengths (one sequence per GPU per micro-step)
memory_check = True          # memory: measure real CPU training steps of a few-hundred-MB model against the formula
memory_vocab = 49953         # memory: the recipe rows' vocabulary (Llama 2's extended with Chinese), embeddings trained
device = "auto"              # auto: cuda, then mps, then cpu
dtype = "auto"               # auto: bfloat16 where supported, float32 on CPU
compile: bool = None       # torch.compile; None: on for CUDA, off elsewhere
tiny = False                 # gpu: small shapes and few iterations, so that the command itself runs on a CPU
gpu_report = "gpu-report"    # gpu: writes gpu-report.json and gpu-report.md
gpu_minutes = 8.0            # gpu: parts that would start after this many minutes are skipped (and say so)
gpu_parts = "loss,lora,train,sft_compile,decode,distributed"  # gpu: the parts to run (e.g. --gpu_parts=decode)
dist_wrap = "ddp"            # gpu_dist (run by --what=gpu under torchrun): ddp or fsdp
# -----------------------------------------------------------------------------


def run_prepare(*args):
    """Run prepare_data.py; returns (its output, seconds, peak RSS in MB of the largest process)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.time()
    p = subprocess.run([sys.executable, "prepare_data.py", *args], capture_output=True, text=True)
    dt = time.time() - t0
    if p.returncode:
        raise SystemExit(p.stdout + p.stderr)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KB on Linux: the max over finished children
    return p.stdout, dt, max(peak, before) / 1024


def bench_prep():
    tok = os.path.join(data_dir, "tokenizer.model")
    if not os.path.exists(tok):
        raise SystemExit(f"error: no {tok}; run `python prepare_data.py` first")
    print("== prepare_data.py on the demo corpus (tokenizer given, so this is reading + tokenizing + writing)")
    for workers in (1, os.cpu_count()):
        out, dt, _ = run_prepare("--sft_input=", f"--tokenizer_model={tok}", f"--workers={workers}",
                                 "--out_dir=/tmp/bench_prep")
        line = next(l for l in out.splitlines() if l.startswith("pretraining tokens"))
        print(f"workers={workers}: {line.split(';')[-1].strip()}, {dt:.1f}s wall")
    if big_jsonl_gb <= 0:
        return
    print(f"== peak RSS while preparing generated JSONL files (workers={os.cpu_count()})")
    import demo
    docs = [json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in demo.documents(val_fraction=0.01)]
    for gb in (big_jsonl_gb / 4, big_jsonl_gb):
        path = f"/tmp/bench_{gb:g}gb.jsonl"
        target = int(gb * 2**30)
        with open(path, "w", encoding="utf-8") as f:
            written, i = 0, 0
            while written < target:
                line = docs[i % len(docs)]
                f.write(line)
                written += len(line.encode("utf-8"))
                i += 1
        _, dt, peak_mb = run_prepare(f"--input={path}", "--sft_input=", f"--tokenizer_model={tok}",
                                     "--out_dir=/tmp/bench_big")
        print(f"{os.path.getsize(path) / 2**30:.2f} GB JSONL: {dt:.0f}s, peak RSS {peak_mb:.0f} MB")
        os.remove(path)


def bench_train():
    from model import PRESETS, ModelArgs, Transformer, peak_flops
    from tokenizer import Tokenizer
    from device import keep_freed_memory, setup_device
    run = setup_device(device, dtype, compile, keep_memory=False)  # on CPU: measured both ways below
    vocab = vocab_size or Tokenizer(os.path.join(data_dir, "tokenizer.model")).n_words
    name = torch.cuda.get_device_name() if run.device_type == "cuda" else "cpu"
    peak = peak_flops(name) if run.device_type == "cuda" else None
    print(f"== training throughput on {name} ({run.dtype}, compile {run.compile}), vocab {vocab}, batch {batch_size}")
    # on CPU, each preset is timed with glibc malloc's defaults first, then as training runs it:
    # keep_freed_memory() (mallopt) cannot be undone in a process, so the order is fixed
    # the optimizer is AdamW, then Muon + AdamW (pretrain.py's default) with the same memory setting
    settings = ["malloc default", "keep_freed_memory", "keep_freed_memory, Muon"] if run.device_type == "cpu" \
        else ["AdamW", "Muon"]
    for setting in settings:
        if setting == "keep_freed_memory":
            keep_freed_memory()
        for preset in presets.split(","):
            args = ModelArgs(**PRESETS[preset], vocab_size=vocab)
            model = Transformer(args).to(run.device)
            optimizer = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), run.device_type, muon="Muon" in setting)
            step_model = torch.compile(model) if run.compile else model
            x = torch.randint(0, vocab, (batch_size, args.max_seq_len), device=run.device)
            for i in range(3 + iters):
                if i == 3:
                    if run.device_type == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.time()
                with run.autocast:
                    _, loss = step_model(x, x)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if run.device_type == "cuda":
                torch.cuda.synchronize()
            dt = (time.time() - t0) / iters
            tokens_per_s = batch_size * args.max_seq_len / dt
            mfu = model.flops_per_token(args.max_seq_len) * tokens_per_s / peak if peak else None
            print(f"{preset}{' (' + setting + ')' if setting else ''}: {model.num_params() / 1e6:.1f}M params, "
                  f"context {args.max_seq_len}: {dt * 1000:.0f} ms/iter, {tokens_per_s:,.0f} tokens/s"
                  + (f", MFU {mfu * 100:.1f}%" if mfu else ""))


def bench_decode():
    """
    Greedy decode speed, batch 1, the same threads for every engine, side by side in one process: our
    generate() with and without the KV cache and with a compiled fixed-shape step, llama.cpp (F32 and
    Q8_0 GGUF, through llama-cpp-python) and, with --runc_dir, llama2.c's run/runq; for the demo checkpoint and for 24m- and 134m-shaped
    models with random weights (what the speed depends on is the shape, not the weights).
    """
    import shutil
    import tempfile

    from checkpoint import load_model
    from engine import compiled_step, generate
    from export import export_gguf, export_tokenizer_bin, export_v0, export_v2, choose_group_size
    from model import PRESETS, ModelArgs, Transformer
    from device import resolve_device
    dev, _ = resolve_device(device, "float32")
    demo_model, tok, _ = load_model(out_dir, dev)
    prompt_ids = [tok.bos_id] + tok.encode("床前明月光，")
    threads = torch.get_num_threads()
    try:
        import llama_cpp
    except ImportError:
        llama_cpp = None
        print("(llama-cpp-python is not installed: no llama.cpp rows; pip install llama-cpp-python)")
    models = [("demo checkpoint", demo_model)]
    for preset in ("24m", "134m"):
        torch.manual_seed(0)
        shaped = Transformer(ModelArgs(**PRESETS[preset], vocab_size=tok.n_words)).eval()
        models.append((f"{preset} shape, random weights", shaped))
    tmp = tempfile.mkdtemp(prefix="bench_decode_")
    print(f"== greedy decode, batch 1, {threads} threads, prompt of {len(prompt_ids)} tokens; tokens/s")
    for name, model in models:
        n = min(decode_tokens, model.args.max_seq_len - len(prompt_ids))
        rows = {}
        prompt = torch.tensor([prompt_ids], device=dev)
        for use_cache in (True, False):
            list(generate(model, prompt, 5, temperature=0, use_cache=use_cache))  # warm up
            t0 = time.time()
            out = list(generate(model, prompt, n, temperature=0, use_cache=use_cache))
            rows["ours, KV cache" if use_cache else "ours, no cache"] = len(out) / (time.time() - t0)
            if use_cache:
                eager_tokens = [int(t) for t in out]
        # the fixed-shape decode step, compiled once (the compile itself is not timed)
        step = compiled_step(model)
        list(generate(model, prompt, 5, temperature=0, step=step))
        t0 = time.time()
        out = list(generate(model, prompt, n, temperature=0, step=step))
        rows["ours, compiled static step"] = len(out) / (time.time() - t0)
        same = [int(t) for t in out] == eager_tokens
        if llama_cpp is not None:
            for qtype in ("f32", "q8_0"):
                path = os.path.join(tmp, f"{qtype}.gguf")
                export_gguf(model, tok, path, qtype)
                llm = llama_cpp.Llama(model_path=path, n_ctx=model.args.max_seq_len, n_threads=threads, verbose=False)
                for warm in (True, False):
                    llm.reset()
                    t0, count = time.time(), 0
                    for _ in llm.generate(prompt_ids, temp=0.0, top_k=1, repeat_penalty=1.0):
                        count += 1
                        if count == (5 if warm else n):
                            break
                rows[f"llama.cpp {qtype.upper()}"] = n / (time.time() - t0)
                del llm
        if runc_dir:
            export_tokenizer_bin(tok, os.path.join(tmp, "tokenizer.bin"))
            export_v0(model, os.path.join(tmp, "model.bin"))
            hidden = model.layers[0].feed_forward.w1.weight.shape[0]
            export_v2(model, os.path.join(tmp, "model_q80.bin"), choose_group_size(model.args.dim, hidden, 64))
            for binary, file in (("run", "model.bin"), ("runq", "model_q80.bin")):
                p = subprocess.run([os.path.join(runc_dir, binary), os.path.join(tmp, file), "-z",
                                    os.path.join(tmp, "tokenizer.bin"), "-t", "0", "-n", str(n + len(prompt_ids)),
                                    "-i", "床前明月光，"], capture_output=True, text=True)
                speed = [line for line in p.stderr.splitlines() if "achieved tok/s" in line]
                rows[f"llama2.c {binary}"] = float(speed[0].split()[-1]) if speed else float("nan")
        print(f"{name} ({model.num_params() / 1e6:.1f}M params, {n} tokens): "
              + ", ".join(f"{k} {v:,.0f}" for k, v in rows.items())
              + f" (compiled greedy tokens {'identical' if same else 'DIFFERENT'})")
    shutil.rmtree(tmp)


def bench_load():
    """
    Import a generated Llama checkpoint (random bf16 weights in Hugging Face's layout: one safetensors
    file, then the same sharded) in a fresh process, and report its peak RSS against the weights' bytes
    and against the same process before loading.
    """
    import shutil
    import tempfile

    from safetensors.torch import save_file
    root = tempfile.mkdtemp(prefix="bench_load_")
    dim, hidden, vocab = 1024, 2816, 32000
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": dim,
              "intermediate_size": hidden, "num_hidden_layers": load_layers, "num_attention_heads": 16,
              "num_key_value_heads": 16, "vocab_size": vocab, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "max_position_embeddings": 2048, "tie_word_embeddings": False, "hidden_act": "silu"}
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (vocab, dim), "lm_head.weight": (vocab, dim), "model.norm.weight": (dim,)}
    for i in range(load_layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (dim, dim), p + "self_attn.k_proj.weight": (dim, dim),
                       p + "self_attn.v_proj.weight": (dim, dim), p + "self_attn.o_proj.weight": (dim, dim),
                       p + "mlp.gate_proj.weight": (hidden, dim), p + "mlp.up_proj.weight": (hidden, dim),
                       p + "mlp.down_proj.weight": (dim, hidden), p + "input_layernorm.weight": (dim,),
                       p + "post_attention_layernorm.weight": (dim,)})
    weights = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    weight_bytes = sum(t.numel() * t.element_size() for t in weights.values())
    layouts = {"one safetensors file": {"model.safetensors": list(weights)},
               "4 safetensors shards": {f"model-{i + 1:05d}-of-00004.safetensors": list(weights)[i::4]
                                        for i in range(4)}}
    # VmRSS/VmHWM of the child itself: ru_maxrss would carry over this process's peak through fork and exec
    probe = ("import sys; sys.path.insert(0, {root!r}); from checkpoint import load_checkpoint, model_from_checkpoint; "
             "kb = lambda key: next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(key)); "
             "before = kb('VmRSS:'); {load}print(before, kb('VmHWM:'))")
    print(f"== importing a {load_layers}-layer, dim {dim} Llama ({weight_bytes / 2**20:.0f} MB of bf16 weights) "
          f"into model_from_checkpoint, in a fresh process")
    for name, files in layouts.items():
        directory = os.path.join(root, name.replace(" ", "_"))
        os.makedirs(directory)
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(config, f)
        for file, keys in files.items():
            save_file({k: weights[k] for k in keys}, os.path.join(directory, file))
        if len(files) > 1:
            with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
                json.dump({"weight_map": {k: file for file, keys in files.items() for k in keys}}, f)
        results = {}
        # every weight read once after loading (as a forward pass would), so no page stays unread on disk
        load = (f"m = model_from_checkpoint(load_checkpoint({directory!r})); "
                f"s = sum(float(p.sum()) for p in m.parameters()); ")
        for what, load in (("loaded", load),):
            code = probe.format(root=os.path.dirname(os.path.abspath(__file__)), load=load)
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            results[what] = [int(x) * 1024 for x in out.split()]  # KB
        start, peak = results["loaded"]
        print(f"{name}: peak RSS {peak / 2**20:.0f} MB = {peak / weight_bytes:.2f} x the weights; "
              f"above the process before loading: {(peak - start) / 2**20:.0f} MB = "
              f"{(peak - start) / weight_bytes:.2f} x")
    shutil.rmtree(root)


def bench_loss():
    """
    The classifier and cross-entropy, forward and backward, at a GPU config's shape (fp32 on CPU), plainly
    and in chunks (model.chunked_cross_entropy), each in a fresh process: peak RSS above the process
    before the step, and time.
    """
    rows, dim, vocab = (int(x) for x in loss_shape.split(","))
    probe = ("import sys, time, torch, torch.nn.functional as F; sys.path.insert(0, {root!r}); "
             "from model import chunked_cross_entropy; torch.manual_seed(0); "
             "kb = lambda key: next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(key)); "
             "h = torch.randn({rows}, {dim}, requires_grad=True); "
             "w = (torch.randn({vocab}, {dim}) * 0.02).requires_grad_(); "
             "t = torch.randint(0, {vocab}, ({rows},)); before = kb('VmRSS:'); t0 = time.time(); "
             "loss = {loss}; loss.backward(); print(before, kb('VmHWM:'), time.time() - t0, loss.item())")
    losses = {"plain": "F.cross_entropy((h @ w.t()).float(), t)",
              "chunked": "chunked_cross_entropy(h, w, t, torch.ones({rows}))"}
    print(f"== classifier + cross-entropy, forward and backward: {rows} rows x dim {dim} x vocabulary {vocab}, fp32, "
          f"{torch.get_num_threads()} threads")
    for name, loss in losses.items():
        code = probe.format(root=os.path.dirname(os.path.abspath(__file__)), rows=rows, dim=dim, vocab=vocab,
                            loss=loss.format(rows=rows))
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if out.returncode:
            print(f"{name}: failed ({out.stderr.strip().splitlines()[-1]})")
            continue
        before, peak, seconds, value = out.stdout.split()
        print(f"{name}: peak {(int(peak) - int(before)) / 2**20:.2f} GB above the inputs, {float(seconds):.1f} s, "
              f"loss {float(value):.4f}")


def bench_serve():
    """
    serve.py under load, side by side in one run: the same checkpoint served with 8 slots (batched) and
    with 1 (one request at a time), each with 1, 4, 8 and 16 concurrent clients streaming completions
    (128 new tokens, sampled, no early stop). Aggregate generated tokens/s, and the time to the first
    token (p50, p95) each request waited.
    """
    import socket
    import threading
    import urllib.request

    def stream(port, seed, record):
        body = json.dumps({"prompt": "床前明月光，", "max_tokens": 128, "stream": True, "temperature": 1.0,
                           "seed": seed, "stream_options": {"include_usage": True}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        t0, first, tokens = time.time(), None, 0
        with urllib.request.urlopen(request, timeout=600) as r:
            for line in r:
                if line.startswith(b"data: {"):
                    first = first or time.time() - t0
                    event = json.loads(line[6:])
                    tokens = event["usage"]["completion_tokens"] if event.get("usage") else tokens
        record.append((first, tokens))

    print(f"== serve.py {serve_dir}: {serve_requests} streaming completions (128 tokens) per client; "
          f"{torch.get_num_threads()} threads")
    for slots in (8, 1):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "serve.py", f"--out_dir={serve_dir}", f"--port={port}",
                                 f"--slots={slots}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        proc.stdout.readline()
        try:
            for clients in (int(c) for c in serve_clients.split(",")):
                record = []

                def client(k):
                    for i in range(serve_requests):
                        stream(port, 1000 * k + i, record)

                t0 = time.time()
                threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                elapsed = time.time() - t0
                ttft = sorted(first for first, _ in record)
                tokens = sum(n for _, n in record)
                print(f"slots {slots}, {clients:>2} clients: {tokens / elapsed:7,.0f} tokens/s, first token "
                      f"p50 {ttft[len(ttft) // 2] * 1000:6.0f} ms, p95 {ttft[int(len(ttft) * 0.95)] * 1000:6.0f} ms")
        finally:
            proc.terminate()
            proc.wait()


def memory_args(name):
    """ModelArgs of a Llama 2 size, a preset (with the demo's 8192-piece vocabulary) or an imported model's config."""
    from model import PRESETS, ModelArgs
    if name in LLAMA2:
        return ModelArgs(**LLAMA2[name])
    if name in PRESETS:
        return ModelArgs(**PRESETS[name], vocab_size=8192)
    if os.path.exists(os.path.join(name, "config.json")):
        from checkpoint import hf_model_args
        with open(os.path.join(name, "config.json")) as f:
            return hf_model_args(json.load(f), name)
    raise SystemExit(f"error: --memory_model={name}: not llama2-7b, llama2-13b, a preset, or a Hugging Face directory")


MEASURE_STEP = """
import json, os, sys, torch
sys.path.insert(0, {root!r})
from lora import add_lora
from model import ModelArgs, Transformer
torch.set_num_threads(2)
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
torch.randn(64, 64) @ torch.randn(64, 64)  # the math libraries loaded before the baseline
base = rss("VmRSS")
torch.manual_seed(0)
args = ModelArgs(**{args!r})
model = Transformer(args)
if {lora_rank}:
    add_lora(model, set("wq,wk,wv,wo,w1,w2,w3".split(",")), {lora_rank}, 16.0, 0.0, {base_dtype!r})
model.checkpoint_activations = {checkpointing}
model.train()
optimizer = model.configure_optimizers(0.0, 1e-4, (0.9, 0.95), "cpu", muon=False)
open("/proc/self/clear_refs", "w").write("5")  # the peak from here on: training, not building the model
for step in range(2):
    tokens = torch.randint(0, args.vocab_size, (1, {seq}))
    _, loss = model(tokens, tokens)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
print(json.dumps({{"peak": rss("VmHWM") - base}}))
"""


def bench_memory():
    """
    Training memory per process, predicted, for Llama 2 7B (or memory_model) at memory_seq tokens per
    micro-step; and, with memory_check, the formula against the peak RSS of real fp32 CPU training steps
    of a model of a few hundred MB, in fresh processes whose large allocations go back to the system
    at once (MALLOC_MMAP_THRESHOLD_), so that the resident size follows what is alive.
    """
    gb = 1 << 30
    if memory_check:
        from model import ModelArgs
        shape = dict(dim=1024, n_layers=8, n_heads=16, n_kv_heads=16, vocab_size=32000, max_seq_len=1024,
                     tie_embeddings=False)
        args = ModelArgs(**shape)
        print(f"== the formula against measured peak RSS: fp32 on this CPU, dim 1024, 8 layers, vocab 32000 "
              f"({model_params(args) / 1e6:.0f}M parameters), AdamW, 2 steps")
        print(f"{'setup':<44} {'predicted':>10} {'measured':>10} {'error':>7}")
        for label, kw, seq in (("full fine-tuning, seq 512", {}, 512),
                               ("full fine-tuning, seq 1024", {}, 1024),
                               ("LoRA r8, fp32 base, seq 1024", dict(lora_rank=8), 1024),
                               ("LoRA r8, bf16 base, seq 1024", dict(lora_rank=8, base_dtype="bfloat16"), 1024),
                               ("LoRA r8, int8 base, seq 1024", dict(lora_rank=8, base_dtype="int8"), 1024),
                               ("LoRA r8, int8 base, checkpointing, seq 1024",
                                dict(lora_rank=8, base_dtype="int8", checkpointing=True), 1024)):
            script = MEASURE_STEP.format(root=os.path.dirname(os.path.abspath(__file__)), args=shape, seq=seq,
                                         lora_rank=kw.get("lora_rank", 0), base_dtype=kw.get("base_dtype", "float32"),
                                         checkpointing=kw.get("checkpointing", False))
            out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                 env=dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"))
            if out.returncode:
                raise SystemExit(out.stderr)
            measured = json.loads(out.stdout.strip().splitlines()[-1])["peak"]
            predicted = predict_memory(args, seq, **kw)["total"]
            print(f"{label:<44} {predicted / gb:9.2f}G {measured / gb:9.2f}G {(predicted / measured - 1) * 100:+6.1f}%")
    args = memory_args(memory_model)
    print(f"== {memory_model}: {model_params(args) / 1e9:.2f}B parameters; GB per GPU, bf16 compute, AdamW, "
          f"one sequence per GPU per micro-step")
    print(f"{'setup':<48} {'seq':>5} {'weights':>8} {'grads':>7} {'AdamW':>7} {'activ.':>7} {'peak':>7}")
    setups = (("full fine-tuning, 1 GPU", {}),
              ("full fine-tuning, FSDP 4 GPUs", dict(processes=4, fsdp=True)),
              ("full fine-tuning, FSDP 8 GPUs, checkpointing", dict(processes=8, fsdp=True, checkpointing=True)),
              ("LoRA r8, bf16 base, 1 GPU", dict(lora_rank=8, base_dtype="bfloat16")),
              ("LoRA r8, bf16 base, checkpointing, 1 GPU", dict(lora_rank=8, base_dtype="bfloat16", checkpointing=True)),
              ("LoRA r8, int8 base, 1 GPU", dict(lora_rank=8, base_dtype="int8")),
              ("LoRA r8, int8 base, checkpointing, 1 GPU", dict(lora_rank=8, base_dtype="int8", checkpointing=True)),
              ("LoRA r8, bf16 base, FSDP 4 GPUs", dict(lora_rank=8, base_dtype="bfloat16", processes=4, fsdp=True)),
              ("LoRA r8, bf16 base, FSDP 4 GPUs, checkpointing",
               dict(lora_rank=8, base_dtype="bfloat16", processes=4, fsdp=True, checkpointing=True)))
    # the README's recipe: the tokenizer extended with Chinese pieces, so the embedding and the (untied)
    # classifier grow to memory_vocab rows and are trained in full beside the adapters
    recipe = dict(lora_rank=8, vocab_rows=memory_vocab, train_embeddings=True)
    setups += (("recipe: LoRA r8 + embeddings, bf16 base, 1 GPU", dict(recipe, base_dtype="bfloat16")),
               ("recipe: LoRA r8 + embeddings, int8 base, 1 GPU", dict(recipe, base_dtype="int8")),
               ("recipe: + checkpointing, int8 base, 1 GPU", dict(recipe, base_dtype="int8", checkpointing=True)),
               ("recipe: + FSDP 4 GPUs, checkpointing, bf16 base",
                dict(recipe, base_dtype="bfloat16", processes=4, fsdp=True, checkpointing=True)))
    for seq in (int(x) for x in memory_seq.split(",")):
        for label, kw in setups:
            m = predict_memory(args, seq, compute="bfloat16", **kw)
            print(f"{label:<48} {seq:>5} " + " ".join(f"{m[k] / gb:7.1f}" for k in ("weights", "gradients",
                                                                                     "optimizer", "activations"))
                  + f" {m['total'] / gb:7.1f}")


def bench_lora():
    """
    Training steps of one model (dim 512, 8 layers, vocabulary 32000, one sequence of 512 tokens), fp32
    compute on this CPU, all rows in this process: full fine-tuning, LoRA r8 on every matrix with the
    base stored in fp32, bf16 and int8, and with activation checkpointing. The adapters' share of a LoRA
    step: 1 - (the same step with the adapters off, the backward pass still running through every frozen
    block to the embedding's output) / (the LoRA step).
    """
    from lora import adapters_disabled, add_lora
    from model import ModelArgs, Transformer
    args = ModelArgs(dim=512, n_layers=8, n_heads=8, n_kv_heads=8, vocab_size=32000, max_seq_len=512,
                     tie_embeddings=False)
    tokens = torch.randint(0, args.vocab_size, (1, 512), generator=torch.Generator().manual_seed(0))

    def step_time(model, steps=4, context=contextlib.nullcontext):
        model.train()
        trained = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trained or [torch.zeros(1, requires_grad=True)], lr=1e-4)
        times = []
        for _ in range(steps + 1):  # the first step warms up
            t0 = time.perf_counter()
            with context():
                _, loss = model(tokens, tokens)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
        return min(times[1:])

    def build(lora_rank=0, base_dtype="float32", checkpointing=False):
        torch.manual_seed(0)
        model = Transformer(args)
        if lora_rank:
            add_lora(model, {"wq", "wk", "wv", "wo", "w1", "w2", "w3"}, lora_rank, 16.0, 0.0, base_dtype)
        model.checkpoint_activations = checkpointing
        return model

    print(f"== training steps, {model_params(args) / 1e6:.0f}M parameters, 512 tokens, fp32 compute, "
          f"{torch.get_num_threads()} threads")
    for label, kw in (("full fine-tuning", {}), ("LoRA r8, fp32 base", dict(lora_rank=8)),
                      ("LoRA r8, bf16 base", dict(lora_rank=8, base_dtype="bfloat16")),
                      ("LoRA r8, int8 base", dict(lora_rank=8, base_dtype="int8")),
                      ("LoRA r8, int8 base, checkpointing", dict(lora_rank=8, base_dtype="int8", checkpointing=True))):
        t = step_time(build(**kw))
        print(f"{label:<36} {t * 1000:7.0f} ms/step {512 / t:8,.0f} tokens/s")
    model = build(lora_rank=8)
    with_adapters = step_time(model)
    # the adapters off: the backward pass still runs through every frozen block, to the embedding's output
    model.tok_embeddings.register_forward_hook(lambda module, inputs, out: out.requires_grad_(True))
    base_only = step_time(model, context=lambda: adapters_disabled(model))
    print(f"LoRA r8, fp32 base: the adapters' share of the step {(1 - base_only / with_adapters) * 100:.0f}% "
          f"({with_adapters * 1000:.0f} ms with them, {base_only * 1000:.0f} ms through the frozen base alone)")


# --- bench.py --what=gpu ------------------------------------------------------------------------------
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
    from model import PRESETS, ModelArgs
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
        import gc
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
    import traceback
    traceback.print_exc()
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


def timed_step(model, optimizer, run, batch):
    """One training step of model on batch (its keyword arguments), in the run's precision: what the GPU parts time."""
    with run.autocast:
        _, loss = model(**batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def gpu_train(run, meter, shapes, peak_flops_s):
    """Pretraining steps (AdamW, synthetic tokens) of each preset in the run's dtype, eager and compiled."""
    from model import Transformer
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
    """
    A packed SFT batch of synthetic tokens: each row 1-3 conversations whose last part is the answer
    (loss_mask 1), positions restarting per conversation, attention within each conversation only.
    """
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
    """
    Compiled SFT as sft.py runs it on GPUs (static shapes: the classifier on every position, non-answer
    positions weighted 0): graphs compiled and graph breaks over batches of different answer counts.
    """
    from torch._dynamo.utils import counters

    from model import Transformer
    args = shape_args(shapes["sft_shape"], shapes["train_vocab"])
    torch._dynamo.reset()
    counters.clear()
    meter.start()
    torch.manual_seed(0)
    model = Transformer(args).to(run.device).train()
    model.gather_masked = False
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
    import torch.nn.functional as F

    from model import chunked_cross_entropy
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
            ones = torch.ones(n, device=run.device)
            base = meter.start()

            def step():
                with run.autocast:
                    if name == "plain":
                        loss = F.cross_entropy(F.linear(h, w).float(), t)
                    else:  # small chunks on --tiny's shapes, so that it is really chunked there too
                        loss = chunked_cross_entropy(h, w, t, ones, chunk_rows=None if meter.cuda else 64)
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
    """
    A LoRA model of args's shape built on the meta device and materialized on device with random weights,
    every frozen matrix directly in base_dtype: no fp32 copy of the base ever exists (a 7B model in bf16
    takes 13.5 GB, not 27 + 13.5). Adapters as add_lora makes them (A random, B zero).
    """
    from lora import FrozenLinear, LoRALinear, add_lora
    from model import RMSNorm, Transformer
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
    """
    Greedy decoding of a preset's shape (random weights, in the run's dtype as serve.py loads it): batch 1
    eager and with the compiled fixed-shape step (sample.py --compile=True), then through engine.py with
    several concurrent requests (serve.py's batching): generated tokens/s over all requests.
    """
    from engine import Engine, Request, compiled_step, generate
    from model import Transformer
    from device import PTDTYPE
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
               os.path.abspath(__file__), "--what=gpu_dist", f"--tiny={tiny}", f"--device={run.device_type}",
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


def bench_gpu_dist():
    """One process of gpu_distributed (under torchrun): pretraining steps of a preset under DDP or FSDP2."""
    from model import Transformer
    from device import setup_device, wrap_ddp, wrap_fsdp
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
    lines = [f"Measured by `python bench.py --what=gpu{' --tiny=True' if report['tiny'] else ''}` on {d['name']} "
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


def bench_gpu():
    """
    Every GPU claim of docs/gpu.md, measured in one command of a few minutes on one CUDA card: pretraining
    tokens/s, MFU and peak memory (predicted beside measured) for the presets, eager and compiled;
    compiled SFT's graph count over batches of different answer counts; the chunked loss's memory; LoRA
    on a Llama-2-7B-shaped model with a bf16 and an int8 base; decoding at batch 1 and through the
    engine; DDP and FSDP2 where several GPUs are visible. Parts that do not fit the card say so and the
    rest go on; the report is rewritten after each part, so a run cut short keeps what it measured.
    --tiny=True runs every part with toy shapes on a CPU (the tests do).
    """
    import datetime
    import importlib.metadata
    from model import peak_flops
    from device import setup_device
    run = setup_device(device, dtype, compile, keep_memory=False)
    cuda = run.device_type == "cuda"
    if not cuda and not tiny:
        raise SystemExit("error: --what=gpu measures a CUDA GPU and none is visible here; --tiny=True runs it "
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
    print(f"== bench.py --what=gpu on {name}{' (--tiny)' if tiny else ''}, {run.dtype}; report: {gpu_report}.json/.md")
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
        with open(gpu_report + ".json", "w") as f:
            json.dump(report, f, indent=1)
        with open(gpu_report + ".md", "w") as f:
            f.write(gpu_markdown(report) + "\n")
    print(f"wrote {gpu_report}.json and {gpu_report}.md in {time.time() - t0:.0f} s")


def model_params(args):
    """Parameter count of a model with these args, from its shapes (no weights allocated)."""
    from model import Transformer
    with torch.device("meta"):
        return Transformer(args).num_params()


if __name__ == "__main__":
    configure(globals())
    for name, fn in (("prep", bench_prep), ("train", bench_train), ("decode", bench_decode), ("load", bench_load),
                     ("loss", bench_loss), ("serve", bench_serve), ("memory", bench_memory), ("lora", bench_lora),
                     ("gpu", bench_gpu), ("gpu_dist", bench_gpu_dist)):
        if what == name or (what == "all" and not name.startswith("gpu")):
            fn()
