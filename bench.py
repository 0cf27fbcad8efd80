"""
Benchmarks: speed and memory, measured side by side in one process where a ratio is claimed. Nothing
here is asserted by the tests: machines are noisy.

    python bench.py --what=prep      # prepare_data.py tokens/s, 1 worker vs all cores; peak RSS on a generated JSONL
    python bench.py --what=train     # training tokens/s (and MFU on a GPU) for the presets in --presets
    python bench.py --what=decode    # decode tokens/s: ours (KV cache or not), llama.cpp F32/Q8_0, llama2.c if built
    python bench.py --what=load      # peak memory while importing a generated Hugging Face Llama checkpoint
    python bench.py --what=loss      # peak memory of the classifier + loss at a GPU config's shape, plain vs chunked
    python bench.py --what=serve     # serve.py: tokens/s and time to first token, batched vs one request at a time
    python bench.py --what=memory    # training memory per GPU, predicted (Llama-2-7B: LoRA, int8, FSDP), checked on CPU
    python bench.py --what=lora      # training tokens/s: full vs LoRA on fp32/bf16/int8 bases, the adapters' share

The numbers, with the machine they were measured on, are in docs/benchmarks.md. On a new GPU machine, run
gpu_report.py first: every GPU claim, measured in minutes.
"""
import contextlib
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
what = "all"                 # prep, train, decode, load, loss, serve, memory, lora, or all
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
dtype = "auto"               # auto: as pretrain.py picks it (device.auto_dtype)
compile: bool = None       # torch.compile; None: on for CUDA, off elsewhere
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
                                 "--data_dir=/tmp/bench_prep")
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
                                     "--data_dir=/tmp/bench_big")
        print(f"{os.path.getsize(path) / 2**30:.2f} GB JSONL: {dt:.0f}s, peak RSS {peak_mb:.0f} MB")
        os.remove(path)


def bench_train():
    from model import PRESETS, ModelArgs, Transformer, peak_flops
    from tokenizer import Tokenizer
    from device import cpu_has_bf16, keep_freed_memory, setup_device
    run = setup_device(device, dtype, compile, keep_memory=False, cpu_bf16=True)  # CPU: settings and dtypes below
    vocab = vocab_size or Tokenizer(os.path.join(data_dir, "tokenizer.model")).n_words
    name = torch.cuda.get_device_name() if run.device_type == "cuda" else "cpu"
    peak = peak_flops(name) if run.device_type == "cuda" else None
    print(f"== training throughput on {name} ({run.dtype if run.device_type != 'cpu' else 'float32 unless bf16 said'}, "
          f"compile {run.compile}), vocab {vocab}, batch {batch_size}")
    # on CPU, each preset is timed with glibc malloc's defaults first, then as training runs it:
    # keep_freed_memory() (mallopt) cannot be undone in a process, so the order is fixed
    # the optimizer is AdamW, then Muon + AdamW (pretrain.py's default) with the same memory setting; all in
    # float32, then, where the CPU has bf16 instructions, Muon under bf16 autocast beside it (dtype=auto's choice)
    settings = ["malloc default", "keep_freed_memory", "keep_freed_memory, Muon"] if run.device_type == "cpu" \
        else ["AdamW", "Muon"]
    if run.device_type == "cpu" and cpu_has_bf16():
        settings.append("keep_freed_memory, Muon, bf16 autocast")
    for setting in settings:
        if setting == "keep_freed_memory":
            keep_freed_memory()
        autocast = run.autocast if run.device_type != "cpu" else \
            torch.autocast("cpu", dtype=torch.bfloat16) if "bf16" in setting else contextlib.nullcontext()
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
                with autocast:
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
    Greedy decode speed, batch 1, the same threads for every engine, side by side in one process: ours (KV cache
    or not, a compiled fixed-shape step), llama.cpp (F32 and Q8_0 GGUF) and, with --runc_dir, llama2.c's run/runq;
    for the demo checkpoint and 24m- and 134m-shaped models with random weights (speed depends on the shape).
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
    """Import a generated Llama (random bf16 weights, Hugging Face's layout: one safetensors file, then sharded) in a
    fresh process: its peak RSS against the weights' bytes and against the process before loading."""
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
        # every weight read once after loading (as a forward pass would), so no page stays unread on disk
        load = (f"m = model_from_checkpoint(load_checkpoint({directory!r})); "
                f"s = sum(float(p.sum()) for p in m.parameters()); ")
        code = probe.format(root=os.path.dirname(os.path.abspath(__file__)), load=load)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        start, peak = [int(x) * 1024 for x in out.split()]  # KB
        print(f"{name}: peak RSS {peak / 2**20:.0f} MB = {peak / weight_bytes:.2f} x the weights; "
              f"above the process before loading: {(peak - start) / 2**20:.0f} MB = "
              f"{(peak - start) / weight_bytes:.2f} x")
    shutil.rmtree(root)


def bench_loss():
    """The classifier and cross-entropy, forward and backward, at a GPU config's shape (fp32 on CPU), plain and
    chunked, each in a fresh process: peak RSS above the process before the step, and time."""
    rows, dim, vocab = (int(x) for x in loss_shape.split(","))
    probe = ("import sys, time, torch, torch.nn.functional as F; sys.path.insert(0, {root!r}); "
             "from model import chunked_cross_entropy; torch.manual_seed(0); "
             "kb = lambda key: next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(key)); "
             "h = torch.randn({rows}, {dim}, requires_grad=True); "
             "w = (torch.randn({vocab}, {dim}) * 0.02).requires_grad_(); "
             "t = torch.randint(0, {vocab}, ({rows},)); before = kb('VmRSS:'); t0 = time.time(); "
             "loss = {loss}; loss.backward(); print(before, kb('VmHWM:'), time.time() - t0, loss.item())")
    losses = {"plain": "F.cross_entropy((h @ w.t()).float(), t)",
              "chunked": "chunked_cross_entropy(h, w, t)"}
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
    serve.py under load, side by side in one run: the same checkpoint served with 8 slots (batched) and with 1 (one
    request at a time), each with 1, 4, 8 and 16 concurrent clients streaming completions (128 new tokens, sampled,
    no early stop). Aggregate generated tokens/s, and the time to the first token (p50, p95) each request waited.
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
    Training memory per process, predicted, for Llama 2 7B (or memory_model) at memory_seq tokens per micro-step;
    with memory_check, the formula against the peak RSS of fp32 CPU steps of a few-hundred-MB model, in processes
    that return freed memory at once (MALLOC_MMAP_THRESHOLD_): the resident size follows what is alive.
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
              ("LoRA r8, bf16 base, checkpointing, 1 GPU",
               dict(lora_rank=8, base_dtype="bfloat16", checkpointing=True)),
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
    Training steps of one model (dim 512, 8 layers, vocabulary 32000, 512 tokens), fp32 on this CPU, in this
    process: full, LoRA r8 on every matrix over an fp32, bf16 or int8 base, with checkpointing. The adapters'
    share: 1 - (the step with them off, the backward still through every frozen block) / (the LoRA step).
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


def model_params(args):
    """Parameter count of a model with these args, from its shapes (no weights allocated)."""
    from model import Transformer
    with torch.device("meta"):
        return Transformer(args).num_params()


if __name__ == "__main__":
    configure(globals())
    if what == "gpu":
        raise SystemExit("error: the GPU acceptance report is its own script now: python gpu_report.py")
    for name, fn in (("prep", bench_prep), ("train", bench_train), ("decode", bench_decode), ("load", bench_load),
                     ("loss", bench_loss), ("serve", bench_serve), ("memory", bench_memory), ("lora", bench_lora)):
        if what in (name, "all"):
            fn()
