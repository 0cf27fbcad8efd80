"""
The 7B recipe's memory claims, held at CPU scale with a model of a few hundred MB: what the end of a run
costs on top of its training (docs/memory.md scales these by the formula).
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from checkpoint import save_checkpoint
from conftest import ROOT, run

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
from model import ModelArgs, Transformer
from tokenizer import Tokenizer

# a fresh process that runs a script and then prints its own peak RSS, whatever way the script ends: VmHWM, the
# peak of this process's memory (ru_maxrss would also count the memory of the parent it was started from)
PEAK_RSS = ("import atexit, runpy, sys; "
            "hwm = lambda: int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) // 1024; "
            "atexit.register(lambda: print('peak_rss_mb', hwm())); "
            "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def peak_rss_mb(script, *args):
    p = run(script, *args, launcher=[sys.executable, "-c", PEAK_RSS])
    return int(p.out.rsplit("peak_rss_mb", 1)[1].split()[0]), p.out


@pytest.fixture(scope="module")
def base_250mb(demo_data, tmp_path_factory):
    """A random 62M-parameter Llama (250 MB in fp32) with the demo tokenizer: big enough for RSS to show a copy."""
    out = tmp_path_factory.mktemp("base_250mb")
    tok = Tokenizer(f"{demo_data}/tokenizer.model")
    args = ModelArgs(dim=768, n_layers=8, n_heads=12, vocab_size=tok.n_words, max_seq_len=128)
    torch.manual_seed(0)
    save_checkpoint(str(out / "ckpt.pt"), {"model": Transformer(args).state_dict(), "model_args": vars(args),
                                           "stage": "pretrain", "tokenizer_sha": tok.sha, "config": {}})
    shutil.copy(tok.model_path, out / "tokenizer.model")
    return str(out)


@pytest.mark.parametrize("tuning", [[], ["--lora_rank=4"]], ids=["full", "lora"])
def test_the_evaluation_after_training_adds_no_model_copy_to_the_peak(demo_data, base_250mb, tmp_path, tuning):
    args = [f"--data_dir={demo_data}", f"--init_from={base_250mb}", "--max_iters=2", "--eval_interval=2",
            "--eval_iters=1", "--batch_size=1", "--block_size=64", "--eval_per_task=1", *tuning]
    without, _ = peak_rss_mb("sft.py", f"--out_dir={tmp_path / 'a'}", *args, "--evaluate_tasks=False")
    with_eval, out = peak_rss_mb("sft.py", f"--out_dir={tmp_path / 'b'}", *args)
    assert "held-out task evaluation" in out and (tmp_path / "b" / "eval.json").exists()
    # the model alone is 250 MB: loading the merged checkpoint and the base beside the training state (as
    # the evaluation once did) added two of them; the evaluation's own data (questions, the idiom list, the
    # decoding caches) and the noise between two runs stay under three quarters of one
    assert with_eval - without < 190, (without, with_eval)
    if tuning:  # a LoRA checkpoint holds what was trained (adapters, AdamW moments), not the 250 MB model (once 3x it)
        assert os.path.getsize(tmp_path / "b" / "ckpt.pt") < 0.05 * os.path.getsize(f"{base_250mb}/ckpt.pt")


# a fresh process (or one of torchrun's): the fixed costs first (torch's code pages for building a model), then
# the host RAM that model_to_tune adds at its peak, in MiB
LOADING = """
import json, sys, torch
from model import ModelArgs, Transformer
from tokenizer import Tokenizer
from checkpoint import model_to_tune
def status_mib(field):  # VmRSS now, VmHWM its peak: this process's own (ru_maxrss also counts its parent's at exec)
    return int(open("/proc/self/status").read().split(field + ":")[1].split()[0]) // 1024
with torch.device("meta"):
    Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=300))
base_dir, base_dtype = sys.argv[1:3]
tok = Tokenizer(base_dir + "/tokenizer.model")
config = dict(dropout=0.0, lora_rank=4, lora_targets="wq,wk,wv,wo,w1,w2,w3", lora_alpha=8, lora_dropout=0.0,
              train_embeddings=None)
"""
LOAD_FOR_LORA = LOADING + """
before = status_mib("VmRSS")
model = model_to_tune(base_dir, tok, config, 0, base_dtype=base_dtype)[0]
print(json.dumps({"peak": status_mib("VmHWM") - before, "dtypes": sorted({str(p.dtype) for p in model.parameters()})}))
"""


@pytest.fixture(scope="module")
def hf_base_bf16(demo_data, tmp_path_factory):
    """The recipe's starting point at CPU scale: a Hugging Face Llama directory in bf16, 168M parameters, a tenth of
    them in the embedding and classifier (Llama 2 7B: 4%, 6% with an extended tokenizer)."""
    from safetensors.torch import save_file

    from checkpoint import ours_to_hf
    from export import export_hf
    out = tmp_path_factory.mktemp("hf_base_bf16")
    tok = Tokenizer(f"{demo_data}/tokenizer.model")
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=1024, n_layers=12, n_heads=16, vocab_size=tok.n_words, max_seq_len=128,
                                  tie_embeddings=False))
    export_hf(model, tok, str(out))
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in ours_to_hf(model.state_dict(), model.args).items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return str(out), sum(v.numel() * 2 for v in state.values()) / 2**20


@pytest.mark.parametrize("base_dtype", ["bfloat16", "int8"])
def test_loading_a_bf16_llama_for_lora_holds_about_one_copy_of_it(hf_base_bf16, base_dtype):
    base_dir, size_mib = hf_base_bf16
    p = subprocess.run([sys.executable, "-c", LOAD_FOR_LORA, base_dir, base_dtype], cwd=ROOT, capture_output=True,
                       text=True, env=dict(os.environ, OMP_NUM_THREADS="2"), check=True)
    result = json.loads(p.stdout.strip().splitlines()[-1])
    # the frozen blocks in the stored dtype, never a float32 copy of the whole model (once 3x the file); what is
    # over one copy: the embedding and classifier in fp32 and one layer's conversion at a time
    assert result["peak"] < 1.3 * size_mib, (result, size_mib)
    assert ("torch.int8" if base_dtype == "int8" else "torch.bfloat16") in result["dtypes"]


# under torchrun: each process's host RAM added by loading the base for LoRA and sharding it (wrap_fsdp), in MiB;
# then whether the shards hold exactly what one process loading the base alone would hold
LOAD_SHARDED = LOADING + """
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from device import setup_device, wrap_fsdp
on_rank0 = sys.argv[3] == "rank0"
run = setup_device("cpu", "float32", False)
before = status_mib("VmRSS")
model = model_to_tune(base_dir, tok, config, 0, base_dtype=base_dtype, on_rank0=on_rank0)[0]
wrap_fsdp(model, run)
peak = status_mib("VmHWM") - before
whole = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if run.master:
    alone = model_to_tune(base_dir, tok, config, 0, base_dtype=base_dtype)[0].state_dict()
    same = whole.keys() == alone.keys() and all(torch.equal(whole[k], alone[k]) for k in alone)
    print(json.dumps({"rank": 0, "peak": peak, "same": same}), flush=True)
torch.distributed.barrier()
if not run.master:
    print(json.dumps({"rank": run.rank, "peak": peak}), flush=True)
"""


def test_under_fsdp_only_rank_0_reads_the_base(hf_base_bf16, tmp_path):
    base_dir, size_mib = hf_base_bf16
    script = tmp_path / "load_sharded.py"
    script.write_text(LOAD_SHARDED)
    p = run(str(script), base_dir, "bfloat16", "rank0", launcher=[*TORCHRUN, "--nproc_per_node=2"],
            extra_env={"OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    peaks = {r["rank"]: r for r in map(json.loads, (line for line in p.out.splitlines() if line.startswith("{")))}
    assert peaks[0]["same"], "the shards differ from the base loaded by one process"
    # rank 0 reads the base (about one copy, as in the test above); the other process never holds it whole: only
    # its half of the model and one tensor in flight (on a GPU both would be GPU memory). When every process read
    # its own copy, this one's peak was above one copy. On CPU, rank 0's half of the shards is host memory too
    assert peaks[1]["peak"] < 0.85 * size_mib, (peaks, size_mib)
    assert peaks[0]["peak"] < 1.9 * size_mib, (peaks, size_mib)
