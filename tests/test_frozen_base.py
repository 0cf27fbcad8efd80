"""LoRA on a large model's terms: a frozen base stored in bf16 or int8 that takes no gradient and no optimizer
state, adapters that merge exactly, activation checkpointing that changes no gradient, and runs that learn."""
import os

import pytest
import torch
import torch.nn as nn

from checkpoint import load_checkpoint, load_model
from conftest import read_log, run, tiny
from lora import FrozenLinear, LoRALinear, add_lora, merged_state_dict, trainable_state_dict
from model import answer_loss
from training import resolve_block_size

SFT_TINY = ["--batch_size=4", "--eval_iters=2", "--log_interval=1", "--warmup_iters=2", "--evaluate_tasks=False"]


@torch.no_grad()
def sft_test_loss(out_dir, data_dir, batch_size=4, eval_iters=2):
    """The test loss sft.py logs (its test batches, its defaults), of the model loading out_dir gives."""
    import sft
    model, tok, _ = load_model(str(out_dir))
    data = sft.Conversations(data_dir, "test", resolve_block_size(sft.block_size, model), tok, sft.packing, sft.seed)
    batches = [{k: torch.from_numpy(v) for k, v in data.batch(i * batch_size, batch_size).items()}
               for i in range(eval_iters)]
    return sum(answer_loss(model, batch).item() for batch in batches) / eval_iters


def test_an_int8_layer_stays_within_its_rounding_error():
    torch.manual_seed(0)
    linear = nn.Linear(256, 96, bias=False)
    x = torch.randn(5, 256)
    exact = linear(x)
    int8 = FrozenLinear(linear, "int8")
    assert int8.weight.dtype == torch.int8 and int8.scale.shape == (96, 1)
    # each weight is off by at most half a step of its row's scale, so each output by at most this
    bound = x.abs() @ (int8.scale.expand(96, 256) / 2).t()                        # (5, 96)
    error = (int8(x) - exact).abs()
    assert (error <= bound + 1e-6).all() and error.max() > 0
    assert (error / exact.abs().mean()).mean() < 0.01  # and in practice well inside the bound
    bf16 = FrozenLinear(linear, "bfloat16")
    assert bf16.weight.dtype == torch.bfloat16 and bf16(x).dtype == torch.float32
    torch.testing.assert_close(bf16(x), x @ linear.weight.bfloat16().float().t())  # computes in the input's dtype


@pytest.mark.parametrize("base_dtype", ["float32", "bfloat16", "int8"])
def test_the_frozen_base_gets_no_gradient_and_no_optimizer_state(base_dtype):
    model = tiny()
    add_lora(model, {"wq", "wv"}, rank=4, alpha=8, dropout=0.0, base_dtype=base_dtype)
    frozen = [m for m in model.layers.modules() if isinstance(m, FrozenLinear)]
    assert len(frozen) == 7 * 2 and all(m.weight.dtype == getattr(torch, base_dtype) for m in frozen)
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 2 * 2  # wq, wv in each of 2 blocks
    optimizer = model.configure_optimizers(0.0, 1e-2, (0.9, 0.95), "cpu", muon=False)
    tokens = torch.randint(0, 97, (2, 16))
    model.train()
    model(tokens, tokens)[1].backward()
    optimizer.step()
    trained = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == trained
    assert set(map(id, optimizer.state)) == trained
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # adapters stay fp32


@pytest.mark.parametrize("base_dtype", ["float32", "int8"])
def test_the_adapters_alone_rebuild_exactly_the_merged_weights(base_dtype):
    model = add_lora(tiny(), {"wq", "wk", "wv", "wo", "w1", "w2", "w3"}, 4, 8.0, 0.0, base_dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 0.05)  # trained
    saved = trainable_state_dict(model)                  # what a checkpoint keeps besides the merged weights
    assert all(k.endswith(("lora_a", "lora_b")) for k in saved)
    again = add_lora(tiny(), {"wq", "wk", "wv", "wo", "w1", "w2", "w3"}, 4, 8.0, 0.0, base_dtype)
    again.load_state_dict(saved, strict=False)           # the same base, quantized the same way, + the adapters
    merged, rebuilt = merged_state_dict(model), merged_state_dict(again)
    assert merged.keys() == tiny().state_dict().keys()   # a plain Transformer's state dict, in fp32
    assert all(torch.equal(merged[k], rebuilt[k]) and merged[k].dtype == torch.float32 for k in merged)
    plain = tiny()
    plain.load_state_dict(merged)
    tokens = torch.randint(0, 97, (2, 16))
    torch.testing.assert_close(plain(tokens, tokens)[0], model(tokens, tokens)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lora", [False, True])
def test_activation_checkpointing_gives_the_same_gradients(lora):
    def gradients(checkpointing):
        model = tiny(dropout=0.1)  # dropout too: the recomputation must replay the same masks
        if lora:
            add_lora(model, {"wq", "w2"}, 4, 8.0, 0.1)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name.endswith("lora_b"):
                        p.normal_(0, 0.05)
        model.train()
        model.checkpoint_activations = checkpointing
        torch.manual_seed(1)
        tokens = torch.randint(0, 97, (3, 24))
        loss = model(tokens, tokens)[1]
        loss.backward()
        return loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    loss, plain = gradients(False)
    loss_ckpt, checkpointed = gradients(True)
    assert loss == loss_ckpt and plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-6, atol=1e-8, msg=name)


def test_lora_on_an_int8_base_learns_like_lora_on_the_fp32_base(demo_data, tiny_ckpt, tmp_path):
    final = {}
    for base_dtype in ("float32", "int8", "bfloat16"):
        out = tmp_path / base_dtype
        run("sft.py", f"--data_dir={demo_data}", f"--init_from={tiny_ckpt}", f"--out_dir={out}", *SFT_TINY,
            "--learning_rate=1e-2", "--max_iters=30", "--eval_interval=30", "--lora_rank=8",
            f"--base_dtype={base_dtype}", "--checkpoint_activations=True")
        val = {r["iter"]: r["val_loss"] for r in read_log(out) if "val_loss" in r}
        assert val[30] < val[0] - 0.2, (base_dtype, val)
        final[base_dtype] = val[30]
        ckpt = torch.load(out / "ckpt.pt", weights_only=True)  # what the run trained and where its base is
        assert ckpt["model"] is None and all(k.endswith(("lora_a", "lora_b")) for k in ckpt["lora"])
        assert ckpt["base"] == tiny_ckpt and ckpt["base_dtype"] == base_dtype
        # loading merges the adapters into the base stored as the run stored it: the model that was evaluated
        assert sft_test_loss(out, demo_data) == pytest.approx(val[30], rel=1e-4), base_dtype
    assert final["int8"] == pytest.approx(final["float32"], rel=0.02)
    assert final["bfloat16"] == pytest.approx(final["float32"], rel=0.02)


def test_a_bad_base_dtype_is_one_line(demo_data, tiny_ckpt, tmp_path):
    p = run("sft.py", f"--data_dir={demo_data}", f"--init_from={tiny_ckpt}", f"--out_dir={tmp_path / 'x'}",
            "--lora_rank=4", "--base_dtype=int4", check=False)
    assert p.returncode != 0 and "--base_dtype must be one of" in p.out and "Traceback" not in p.out
    assert not (tmp_path / "x").exists()


def test_resume_with_lora_int8_and_checkpointing_continues_the_same_loss_curve(demo_data, tiny_ckpt, tmp_path):
    common = [f"--data_dir={demo_data}", *SFT_TINY, "--learning_rate=1e-2", "--eval_interval=5",
              "--lr_decay_iters=10", "--lora_rank=4", "--base_dtype=int8", "--checkpoint_activations=True"]
    run("sft.py", f"--out_dir={tmp_path / 'straight'}", f"--init_from={tiny_ckpt}", *common, "--max_iters=10")
    run("sft.py", f"--out_dir={tmp_path / 'resumed'}", f"--init_from={tiny_ckpt}", *common, "--max_iters=5")
    run("sft.py", f"--out_dir={tmp_path / 'resumed'}", "--init_from=resume", *common, "--max_iters=10")
    straight = {r["iter"]: r["loss"] for r in read_log(tmp_path / "straight") if "loss" in r}
    resumed = {r["iter"]: r["loss"] for r in read_log(tmp_path / "resumed") if "loss" in r}
    for it in range(6, 11):
        assert resumed[it] == pytest.approx(straight[it], rel=1e-5, abs=1e-6), it


def test_mfu_counts_a_frozen_weight_at_four_flops_per_token_and_a_trained_one_at_six():
    model = tiny(tie_embeddings=False)
    plain = model.num_params() - 97 * 64          # minus the embedding lookup, which does no FLOPs
    attention = 12 * 2 * 16 * 64                   # 12 * layers * seq_len * dim
    assert model.flops_per_token(16) == 6 * plain + attention
    add_lora(model, {"wq", "wk", "wv", "wo", "w1", "w2", "w3"}, 4, 8.0, 0.0)
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert model.flops_per_token(16) == 4 * plain + 6 * adapters + attention


def test_continued_pretraining_with_lora_resumes_exactly_and_saves_a_plain_model(demo_data, tiny_ckpt, tmp_path):
    common = [f"--data_dir={demo_data}", "--batch_size=4", "--eval_iters=2", "--log_interval=1", "--warmup_iters=2",
              "--learning_rate=1e-2", "--eval_interval=5", "--lr_decay_iters=10", "--lora_rank=4",
              "--base_dtype=int8", "--block_size=32", "--evaluate_tasks=False"]
    p = run("pretrain.py", f"--out_dir={tmp_path / 'straight'}", f"--init_from={tiny_ckpt}", *common, "--max_iters=10")
    assert "LoRA rank 4" in p.out and "optimizer AdamW" in p.out  # Muon is for whole matrices, not adapters
    run("pretrain.py", f"--out_dir={tmp_path / 'resumed'}", f"--init_from={tiny_ckpt}", *common, "--max_iters=5")
    run("pretrain.py", f"--out_dir={tmp_path / 'resumed'}", "--init_from=resume", *common, "--max_iters=10")
    straight = {r["iter"]: r["loss"] for r in read_log(tmp_path / "straight") if "loss" in r}
    resumed = {r["iter"]: r["loss"] for r in read_log(tmp_path / "resumed") if "loss" in r}
    for it in range(6, 11):
        assert resumed[it] == pytest.approx(straight[it], rel=1e-5, abs=1e-6), it
    ckpt = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    assert ckpt["model"] is None and ckpt["lora"] and all(k.endswith(("lora_a", "lora_b")) for k in ckpt["lora"])
    base = torch.load(os.path.join(tiny_ckpt, "ckpt.pt"), weights_only=True)
    assert load_checkpoint(str(tmp_path / "straight"))["model"].keys() == base["model"].keys()  # merged on load


def test_lora_from_scratch_is_refused_in_one_line(demo_data, tmp_path):
    p = run("pretrain.py", f"--data_dir={demo_data}", f"--out_dir={tmp_path / 'x'}", "--lora_rank=4", check=False)
    assert p.returncode != 0 and "--lora_rank adapts an existing model" in p.out and "Traceback" not in p.out
    assert not (tmp_path / "x").exists()


def test_a_lora_run_whose_base_was_retrained_is_refused_not_merged_onto_the_new_one(demo_data, tiny_ckpt, tmp_path):
    import shutil
    base = tmp_path / "base"
    shutil.copytree(tiny_ckpt, base)
    run("sft.py", f"--data_dir={demo_data}", f"--init_from={base}", f"--out_dir={tmp_path / 'lora'}", *SFT_TINY,
        "--max_iters=2", "--eval_interval=2", "--lora_rank=4")
    load_model(str(tmp_path / "lora"))  # merges onto the base it was trained on
    # the base retrained in place, as `pretrain.py --overwrite=True` would: same shapes, other weights
    checkpoint = torch.load(base / "ckpt.pt", weights_only=True)
    for tensor in checkpoint["model"].values():
        tensor += 0.01
    torch.save(checkpoint, base / "ckpt.pt")
    for script, args in (("sample.py", ["--max_new_tokens=2"]),
                         ("sft.py", [f"--data_dir={demo_data}", "--init_from=resume", *SFT_TINY, "--max_iters=4"])):
        p = run(script, f"--out_dir={tmp_path / 'lora'}", *args, check=False)
        assert p.returncode == 1 and "Traceback" not in p.out and "has changed since" in p.out, p.out[-2000:]
