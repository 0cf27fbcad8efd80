"""
The GPU paths, checked without a GPU: the automatic dtype/compile choices from the facts a GPU would
report, the MFU table on real device names, the chunked loss against the plain one, static shapes for
compiled SFT (dynamo's own counters), and the distributed decisions on gloo processes (stopping
together, Ctrl-C under torchrun, sharded Muon, SFT's token weighting). docs/gpu.md says what is not
covered.
"""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import model as model_module
from conftest import ROOT, TINY_MODEL, read_log, run, tiny
from engine import generate
from model import answer_loss, chunked_cross_entropy, peak_flops
from device import auto_compile, auto_dtype, cpu_has_bf16, resolve_device

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("capability, dtype", [((6, 0), "float16"), ((7, 0), "float16"), ((7, 5), "float16"),
                                               ((8, 0), "bfloat16"), ((8, 9), "bfloat16"), ((9, 0), "bfloat16")])
def test_bfloat16_only_where_the_gpu_computes_it_natively(capability, dtype):
    # P100, V100, T4 emulate bf16 (torch.cuda.is_bf16_supported() says yes there): float16 + GradScaler
    assert auto_dtype("cuda", capability) == dtype
    assert auto_dtype("cpu", None) == "float32" and auto_dtype("mps", None) == "float32"


def test_cpu_pretraining_takes_bfloat16_only_where_the_cpu_has_bf16_instructions():
    assert auto_dtype("cpu", None, cpu_bf16=True) == "bfloat16"   # AVX-512 BF16 / AMX: faster, same loss
    assert auto_dtype("cpu", None, cpu_bf16=False) == "float32"   # emulated bf16 would be slower
    assert auto_dtype("mps", None, cpu_bf16=True) == "float32"
    pretraining = resolve_device("cpu", "auto", cpu_bf16=True)[1]
    assert pretraining == ("bfloat16" if cpu_has_bf16() else "float32")
    assert resolve_device("cpu", "auto")[1] == "float32"  # the other stages and the decoders (exact exports' answers)


def test_compile_only_where_triton_can_run():
    assert auto_compile("cuda", (8, 0), has_triton=True) == (True, None)
    on, why = auto_compile("cuda", (8, 6), has_triton=False)  # Windows wheels have no Triton
    assert not on and "Triton is not installed" in why
    on, why = auto_compile("cuda", (6, 0), has_triton=True)   # a P100
    assert not on and "6.0 is below Triton's 7.0" in why
    assert auto_compile("cpu", None, has_triton=True) == (False, None)


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835), ("NVIDIA H800", 989),
    ("NVIDIA H20", 148), ("NVIDIA H200", 989), ("NVIDIA B200", 2250), ("NVIDIA A100-SXM4-80GB", 312),
    ("NVIDIA A800-SXM4-80GB", 312), ("NVIDIA L40S", 362), ("NVIDIA L40", 181), ("NVIDIA L4", 121),
    ("NVIDIA L20", 119.5), ("NVIDIA A10G", 70), ("NVIDIA A10", 125), ("NVIDIA GeForce RTX 4090", 165),
    ("NVIDIA GeForce RTX 3090", 71), ("Tesla V100-SXM2-32GB", 125), ("Tesla T4", 65), ("Tesla P100-PCIE-16GB", 21),
])
def test_mfu_peaks_match_the_names_gpus_report(name, tflops):
    assert peak_flops(name) == pytest.approx(tflops * 1e12)


def test_an_unknown_gpu_has_no_peak_rather_than_a_wrong_one():
    assert peak_flops("NVIDIA GeForce GTX 1080") is None


def test_the_chunked_loss_equals_the_plain_one_with_its_gradients():
    torch.manual_seed(0)
    h = torch.randn(300, 32, requires_grad=True)
    weight = torch.randn(1000, 32, requires_grad=True)
    targets = torch.randint(0, 1000, (300,))
    targets[::7] = -1  # padding, or a position outside the answer
    plain = F.cross_entropy(h @ weight.t(), targets, ignore_index=-1)
    grads = torch.autograd.grad(plain * 3, (h, weight))
    chunked = chunked_cross_entropy(h, weight, targets, chunk_rows=64)
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-5)
    for got, want in zip(torch.autograd.grad(chunked * 3, (h, weight)), grads):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_a_model_above_the_threshold_computes_the_same_loss_in_chunks(monkeypatch, masked):
    model = tiny(vocab_size=500).train()
    tokens = torch.randint(0, 500, (4, 40))
    targets = tokens.masked_fill(torch.rand(4, 40) > 0.4, -1) if masked else tokens  # SFT: answers only
    plain_logits, plain = model(tokens, targets)
    plain_grad = torch.autograd.grad(plain, model.output.weight)[0]
    monkeypatch.setattr(model_module, "CHUNKED_LOSS_ABOVE", 1000)  # 4 x 40 rows x 500 ids is far above it
    logits, chunked = model(tokens, targets)
    assert logits is None and (plain_logits is None) == masked  # masked on a CPU: the answers' logits alone
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-5)
    torch.testing.assert_close(torch.autograd.grad(chunked, model.output.weight)[0], plain_grad, atol=1e-6, rtol=1e-4)


def sft_batches(demo_data, n):
    from sft import Conversations
    from tokenizer import Tokenizer
    tok = Tokenizer(os.path.join(demo_data, "tokenizer.model"))
    data = Conversations(demo_data, "train", 64, tok, packed=True, seed=0)
    return [{k: torch.from_numpy(v) for k, v in data.batch(4 * i, 4).items()} for i in range(n)]


def test_compiled_sft_compiles_once_for_batches_of_varying_answer_counts(demo_data):
    # eager CPU code runs the classifier on the answers alone (a data-dependent shape); compiled code must not
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model = tiny(dim=32, vocab_size=8192, max_seq_len=64).train()
    compiled = torch.compile(model, backend="eager", dynamic=False)
    batches = sft_batches(demo_data, 6)
    assert len({int(b["loss_mask"].sum()) for b in batches}) > 3  # the answer counts really vary
    for batch in batches:
        answer_loss(compiled, batch).backward()
    graph_breaks = sum(counters["graph_break"].values())
    frames = counters["stats"]["unique_graphs"]
    assert graph_breaks == 0 and frames <= 2, (graph_breaks, frames)


def test_two_processes_weigh_sft_tokens_like_one_process_with_twice_the_accumulation(demo_data, tiny_ckpt, tmp_path):
    common = [f"--data_dir={demo_data}", f"--init_from={tiny_ckpt}", "--batch_size=2", "--eval_iters=2",
              "--log_interval=1", "--warmup_iters=2", "--learning_rate=1e-2", "--evaluate_tasks=False",
              "--max_iters=6", "--eval_interval=3", "--device=cpu", "--dtype=float32"]  # exact whatever the threads
    run("sft.py", f"--out_dir={tmp_path / 'one'}", *common, "--gradient_accumulation_steps=2")
    run("sft.py", f"--out_dir={tmp_path / 'two'}", *common, "--gradient_accumulation_steps=1", launcher=TORCHRUN,
        extra_env=ONE_THREAD)
    one = {r["iter"]: r["val_loss"] for r in read_log(tmp_path / "one") if "val_loss" in r}
    two = {r["iter"]: r["val_loss"] for r in read_log(tmp_path / "two") if "val_loss" in r}
    assert sorted(one) == sorted(two) == [0, 3, 6] and one[6] < one[0]
    for it in one:  # rows hold different numbers of answer tokens: equal only if every token weighs the same
        assert two[it] == pytest.approx(one[it], abs=1e-4), it


def test_a_divergence_stops_every_process_promptly_with_the_message(demo_data, tmp_path):
    t0 = time.time()
    p = run("pretrain.py", f"--data_dir={demo_data}", f"--out_dir={tmp_path}", *TINY_MODEL, "--max_iters=100",
            "--eval_interval=100", "--learning_rate=1e9", "--device=cpu", launcher=TORCHRUN, extra_env=ONE_THREAD,
            check=False, timeout=300)
    assert p.returncode != 0 and "training diverged" in p.out and "This run saved no checkpoint" in p.out
    assert time.time() - t0 < 120  # not the collective timeout: both processes stopped at the same iteration


def test_ctrl_c_to_torchrun_saves_once_at_an_iteration_boundary(demo_data, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(TORCHRUN + [os.path.join(ROOT, "pretrain.py"), f"--data_dir={demo_data}", f"--out_dir={out}",
                                        *TINY_MODEL, "--max_iters=100000", "--eval_interval=100000", "--device=cpu"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1", **ONE_THREAD))
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("iter 3:"):
            break
    proc.send_signal(signal.SIGINT)  # to the torchrun agent, which passes a signal on to both workers
    t0 = time.time()
    rest, _ = proc.communicate(timeout=120)
    assert time.time() - t0 < 60 and "interrupted: saved" in rest, rest
    saved = torch.load(out / "ckpt.pt", weights_only=True)
    assert saved["iter_num"] >= 3 and saved["world_size"] == 2


SHARDED_MUON = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
from muon import MuonAdamW
dist.init_process_group("gloo")
torch.manual_seed(0)
shapes = [(24, 16)] * 5 + [(16, 40)] * 3 + [(8, 8)]  # buckets of 5, 3 and 1 matrices over 2 processes
params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
grads = [[torch.randn(s) for s in shapes] for _ in range(3)]
copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
sharded = MuonAdamW([dict(params=params, muon=True)], lr=0.02, shard=True)
alone = MuonAdamW([dict(params=copies, muon=True)], lr=0.02, shard=False)
assert sharded.shard and not alone.shard
for step in grads:
    for p, q, g in zip(params, copies, step):
        p.grad, q.grad = g.clone(), g.clone()
    sharded.step()
    alone.step()  # no collective: every matrix in this process
assert all(torch.equal(p, q) for p, q in zip(params, copies)), "sharded != unsharded"
open({out!r} + str(dist.get_rank()), "w").write("equal")  # a file per rank: two ranks' prints interleave
dist.barrier()  # no rank tears gloo down while the other still talks to it (seen: "terminate called" at exit)
dist.destroy_process_group()
"""


def test_sharded_muon_gives_every_matrix_the_update_it_gets_unsharded(tmp_path):
    script = tmp_path / "sharded_muon.py"
    script.write_text(SHARDED_MUON.format(root=ROOT, out=str(tmp_path / "rank")))
    p = subprocess.run(TORCHRUN + [str(script)], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, **ONE_THREAD))
    assert p.returncode == 0, p.stdout + p.stderr
    assert [(tmp_path / f"rank{r}").read_text() for r in (0, 1)] == ["equal", "equal"]


def test_ddp_raises_no_deprecation_warning(demo_data, tmp_path):
    p = run("pretrain.py", f"--data_dir={demo_data}", f"--out_dir={tmp_path}", *TINY_MODEL, "--max_iters=2",
            "--eval_interval=2", "--device=cpu", launcher=TORCHRUN, extra_env=ONE_THREAD)
    assert "FutureWarning" not in p.out and "broadcast_buffers" not in p.out


def test_the_gpu_measurement_command_runs_every_part_on_a_cpu_with_toy_shapes(tmp_path):
    # `gpu_report.py` is what a user runs first on a new GPU machine: with --tiny it must run whole here
    report = tmp_path / "report"
    p = run("gpu_report.py", "--tiny=True", f"--gpu_report={report}", timeout=300)
    import json
    r = json.loads((tmp_path / "report.json").read_text())
    assert set(r) >= {"device", "train", "sft_compile", "loss", "lora", "decode", "distributed"}, p.out
    parts = {k: r[k] for k in ("train", "sft_compile", "loss", "lora", "decode", "distributed")}
    assert not [k for k, v in parts.items() if isinstance(v, str)], parts  # none failed or was skipped
    for row in r["train"] + r["lora"]:
        assert row["error"] is None and row["tokens_per_s"] > 0 and row["predicted_peak"] > 0
        assert "measured_peak" in row and "mfu" in row  # None on a CPU: no CUDA allocator, no peak FLOP/s
    assert {row["compiled"] for row in r["train"]} == {False, True}
    assert {(row["base_dtype"], row["checkpointing"]) for row in r["lora"]} == \
        {("bfloat16", False), ("int8", False), ("int8", True)}
    plain, chunked = r["loss"]
    assert chunked["value"] == pytest.approx(plain["value"], rel=1e-4)  # the same loss, computed in chunks
    assert r["sft_compile"]["graphs"] == 1 and r["sft_compile"]["graph_breaks"] == 0
    assert len(set(r["sft_compile"]["answer_tokens"])) > 1  # the batches really differ
    n = r["shapes"]["decode_tokens"]
    assert [row["tokens"] for row in r["decode"]] == [n, n] + [c * n for c in r["shapes"]["decode_concurrency"]]
    assert {row["wrap"] for row in r["distributed"]} == {"ddp", "fsdp"}
    assert all(row["error"] is None and row["processes"] == 2 for row in r["distributed"])
    table = (tmp_path / "report.md").read_text()
    assert "**Pretraining steps**" in table and "| tiny | True |" in table


def test_decoding_keeps_cudnn_attention_out_and_training_keeps_it_in(monkeypatch):
    # cuDNN's attention builds a plan for every new shape, and a KV cache has a new length every token:
    # on an H200 that made decoding 8x slower (docs/gpu.md). Training's fixed shapes keep every kernel.
    from engine import Engine, Request
    seen = []
    plain_sdpa = F.scaled_dot_product_attention

    def recording_sdpa(*args, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return plain_sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    model = tiny(dim=32, vocab_size=64, max_seq_len=32)
    prompt = torch.tensor([[1, 5, 6]])
    list(generate(model, prompt, 4, temperature=0))
    list(generate(model, prompt, 4, temperature=0, use_cache=False))
    engine = Engine(model, slots=2)
    requests = [Request([1, 5, 6], 4), Request([1, 7], 4)]
    for request in requests:
        engine.submit(request)
    for request in requests:
        while request.out.get()[0] == "token":
            pass
    assert seen and not any(seen)
    seen.clear()
    model.train()
    model(prompt, prompt)
    assert seen and all(seen)
