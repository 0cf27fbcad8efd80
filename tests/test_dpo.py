"""dpo.py: the loss against its formula, log-probs of answers only, a reference that never moves,
LoRA's disabled adapters as the reference, learning, exact resume, and every input format."""
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data_formats
import dpo
from conftest import read_log, run, tiny
from dpo import Pairs, answer_logps, batch_loss, dpo_loss
from lora import adapters_disabled, add_lora
from tokenizer import Tokenizer

DPO_TINY = ["--beta=0.1", "--sft_weight=0", "--batch_size=4", "--log_interval=1", "--warmup_iters=2", "--learning_rate=1e-3",
            "--evaluate_tasks=False", "--dtype=float32"]  # float32: a copy of the policy computes exactly what it does


def test_the_loss_is_the_dpo_formula():
    chosen, rejected = torch.tensor([-3.0, -10.0]), torch.tensor([-5.0, -2.0])
    ref_chosen, ref_rejected = torch.tensor([-4.0, -9.0]), torch.tensor([-4.0, -4.0])
    losses, margin = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1)
    # by hand: margins (-3 + 4) - (-5 + 4) = 2 and (-10 + 9) - (-2 + 4) = -3
    assert margin.tolist() == [2.0, -3.0]
    assert losses.tolist() == pytest.approx([-math.log(1 / (1 + math.exp(-0.2))), -math.log(1 / (1 + math.exp(0.3)))])
    smooth, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1, label_smoothing=0.1)
    assert smooth[0].item() == pytest.approx(0.9 * -math.log(1 / (1 + math.exp(-0.2)))
                                            + 0.1 * -math.log(1 / (1 + math.exp(0.2))))
    ipo, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1, loss_type="ipo")
    assert ipo.tolist() == pytest.approx([(2 - 5) ** 2, (-3 - 5) ** 2])


def test_a_policy_equal_to_its_reference_has_loss_ln_2_and_no_margin():
    logps = torch.tensor([-7.0, -1.5, -20.0])
    losses, margin = dpo_loss(logps, logps - 1, logps, logps - 1, beta=0.5)
    assert losses.tolist() == pytest.approx([math.log(2)] * 3) and margin.abs().max() == 0


@pytest.fixture(scope="module")
def pairs(demo_data):
    return Pairs(demo_data, "test", 128, Tokenizer(os.path.join(demo_data, "tokenizer.model")), seed=0)


def test_log_probs_are_summed_over_the_answer_tokens_only(pairs):
    model = tiny(dim=32, vocab_size=8192, max_seq_len=128)
    batch = {k: torch.from_numpy(v) for k, v in pairs.batch(pairs.pair_ids(0, 3)).items()}
    logits, _ = model(batch["tokens"], batch["targets"].clamp(min=0))  # a target everywhere: every logit
    logp = F.log_softmax(logits.float(), dim=-1)
    expected = []
    for row in range(6):
        answer = (batch["loss_mask"][row] > 0).nonzero()[:, 0]
        assert 0 < len(answer) < (batch["targets"][row] >= 0).sum()  # the prompt is not counted
        expected.append(sum(logp[row, t, batch["targets"][row, t]] for t in answer))
    torch.testing.assert_close(answer_logps(model, batch), torch.stack(expected), atol=1e-4, rtol=1e-5)
    # rows 0..2 are the chosen answers and 3..5 the rejected ones of the same prompts
    assert torch.equal(batch["tokens"][0][:5], batch["tokens"][3][:5])


def test_eval_iters_evaluates_the_first_batches_of_held_out_pairs(pairs):
    from device import setup_device
    run = setup_device("cpu", "float32", False, keep_memory=False)
    policy = tiny(dim=32, vocab_size=8192, max_seq_len=128)
    reference = tiny(dim=32, vocab_size=8192, max_seq_len=128, n_layers=1)  # another model: margins vary per pair
    ref_all = dpo.all_answer_logps(reference, pairs, 8, run)
    every = dpo.evaluate_pairs(policy, pairs, ref_all, None, 8, run)
    first = dpo.evaluate_pairs(policy, pairs, ref_all, None, 8, run, batches=2)
    asked = pairs.fits[:16]  # 2 batches of 8 pairs
    expected = dpo.pair_metrics(dpo.all_answer_logps(policy, pairs, 8, run, list(asked))[asked], ref_all[asked],
                                dpo.beta, dpo.loss_type, dpo.label_smoothing)
    assert first == pytest.approx(expected) and first != pytest.approx(every)


def test_the_reference_gets_no_gradient_and_never_moves(pairs):
    policy = tiny(dim=32, vocab_size=8192, max_seq_len=128).train()
    reference = tiny(dim=32, vocab_size=8192, max_seq_len=128).eval().requires_grad_(False)
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    batch = {k: torch.from_numpy(v) for k, v in pairs.batch(pairs.pair_ids(0, 4)).items()}
    for _ in range(3):
        with torch.no_grad():
            ref = answer_logps(reference, batch)
        loss = batch_loss(policy, batch, ref, beta=0.1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(p.grad is None for p in reference.parameters())
    assert all(torch.equal(before[k], v) for k, v in reference.state_dict().items())
    assert not torch.equal(policy.output.weight, reference.output.weight)  # the policy did move
    assert batch_loss(policy, batch, ref, beta=0.1).item() < math.log(2)


def test_lora_with_its_adapters_off_is_exactly_the_model_it_started_from(pairs):
    base = tiny(dim=32, vocab_size=8192, max_seq_len=128)
    adapted = tiny(dim=32, vocab_size=8192, max_seq_len=128)
    add_lora(adapted, {"wq", "wv", "w1", "w2"}, rank=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 0.1)  # trained adapters
    batch = {k: torch.from_numpy(v) for k, v in pairs.batch(pairs.pair_ids(0, 4)).items()}
    with torch.no_grad():
        assert not torch.equal(answer_logps(adapted, batch), answer_logps(base, batch))
        with adapters_disabled(adapted):
            assert torch.equal(answer_logps(adapted, batch), answer_logps(base, batch))
        assert not torch.equal(answer_logps(adapted, batch), answer_logps(base, batch))  # and back on after


def few_pairs(data_dir, out, n):
    """A data directory whose train and test splits are both the first n training pairs that fit a tiny context."""
    out.mkdir()
    shutil.copyfile(os.path.join(data_dir, "tokenizer.model"), out / "tokenizer.model")
    index = np.load(os.path.join(data_dir, "dpo_train_index.npy"))
    lengths = (index[1:] - index[:-1]).reshape(-1, 2).max(1)
    ids = np.flatnonzero(lengths <= 33)[:n]  # 32 predictions: the tiny model's context
    tokens = np.fromfile(os.path.join(data_dir, "dpo_train.bin"), dtype=np.uint16)
    mask = np.fromfile(os.path.join(data_dir, "dpo_train_mask.bin"), dtype=np.uint8)
    spans = [(index[2 * i + side], index[2 * i + side + 1]) for i in ids for side in (0, 1)]
    new_index = np.cumsum([0] + [end - start for start, end in spans])
    for split in ("train", "test"):
        np.concatenate([tokens[a:b] for a, b in spans]).tofile(out / f"dpo_{split}.bin")
        np.concatenate([mask[a:b] for a, b in spans]).tofile(out / f"dpo_{split}_mask.bin")
        np.save(out / f"dpo_{split}_index.npy", new_index)
        shutil.copyfile(os.path.join(data_dir, "dpo_train.json"), out / f"dpo_{split}.json")
    return str(out)


@pytest.mark.parametrize("reference", ["precomputed", "model"])
def test_a_tiny_run_learns_its_preferences(demo_data, tiny_sft, tmp_path, reference):
    # the tiny model (dim 32, 30 SFT steps) cannot generalize to unseen pairs: it is held to the pairs it
    # trains on, here also the evaluation split (the demo-sized run's held-out numbers: docs/experiments.md)
    data = few_pairs(demo_data, tmp_path / "data", 64)
    run("dpo.py", f"--data_dir={data}", f"--init_from={tiny_sft}", f"--out_dir={tmp_path}/out", *DPO_TINY,
        "--max_iters=100", "--eval_interval=50", "--learning_rate=3e-3", f"--reference={reference}")
    evals = {r["iter"]: r for r in read_log(tmp_path / "out") if "reward_accuracy" in r}
    assert evals[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert evals[0]["reward_margin"] == pytest.approx(0, abs=1e-5)  # a copy of the model computes what it does
    assert evals[100]["reward_accuracy"] > 0.8 and evals[100]["val_loss"] < evals[0]["val_loss"] - 0.2
    assert evals[100]["rejected_drift"] < evals[100]["chosen_drift"]
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert ckpt["stage"] == "dpo" and ckpt["base"] == tiny_sft


@pytest.mark.parametrize("lora, base_dtype", [(0, "auto"), (4, "auto"), (4, "int8")])
def test_dpo_resume_continues_exactly(demo_data, tiny_sft, tmp_path, lora, base_dtype):
    # the resumed run computes its reference log-probs again, from the base stored as the first run stored it
    common = [f"--data_dir={demo_data}", f"--init_from={tiny_sft}", *DPO_TINY, "--eval_interval=5",
              "--lr_decay_iters=10", f"--lora_rank={lora}", f"--base_dtype={base_dtype}"]
    run("dpo.py", f"--out_dir={tmp_path / 'straight'}", *common, "--max_iters=10")
    first = run("dpo.py", f"--out_dir={tmp_path / 'resumed'}", *common, "--max_iters=5")
    again = run("dpo.py", f"--out_dir={tmp_path / 'resumed'}", *[a for a in common if not a.startswith("--init_from")],
                "--init_from=resume", "--max_iters=10")
    # the base loaded again beside the policy for the reference's log-probs is in the resumed run's plan
    assert "a second model" not in first.out and "a second model" in again.out
    straight = {r["iter"]: r["loss"] for r in read_log(tmp_path / "straight") if "loss" in r}
    resumed = {r["iter"]: r["loss"] for r in read_log(tmp_path / "resumed") if "loss" in r}
    for it in range(6, 11):
        assert resumed[it] == pytest.approx(straight[it], rel=1e-5, abs=1e-6), it


PAIR = ([{"role": "system", "content": "你是助手"}, {"role": "user", "content": "你好"},
         {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "这条评论是正面还是负面？\n很好"}],
        "正面", "负面")
FORMATS = {
    "TRL strings": {"prompt": "这条评论是正面还是负面？\n很好", "chosen": "正面", "rejected": "负面"},
    "TRL messages": {"prompt": PAIR[0], "chosen": [{"role": "assistant", "content": "正面"}],
                     "rejected": [{"role": "assistant", "content": "负面"}]},
    "TRL implicit prompt": {"chosen": PAIR[0] + [{"role": "assistant", "content": "正面"}],
                            "rejected": PAIR[0] + [{"role": "assistant", "content": "负面"}]},
    "sharegpt": {"system": "你是助手", "conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！"},
                                                      {"from": "human", "value": "这条评论是正面还是负面？\n很好"}],
                 "chosen": {"from": "gpt", "value": "正面"}, "rejected": {"from": "gpt", "value": "负面"}},
    "hh-rlhf-cn": {"context": [{"role": "system", "text": "你是助手"}, {"role": "human", "text": "你好"},
                               {"role": "assistant", "text": "你好！"},
                               {"role": "human", "text": "这条评论是正面还是负面？\n很好"}],
                   "chosen": {"role": "assistant", "text": "正面"}, "rejected": {"role": "assistant", "text": "负面"}},
    "question": {"system": "你是助手", "history": [["你好", "你好！"]], "question": "这条评论是正面还是负面？\n很好",
                 "response_chosen": "正面", "response_rejected": "负面"},
}


@pytest.mark.parametrize("name", FORMATS)
def test_every_input_format_parses_to_the_same_pair(name):
    prompt, chosen, rejected = data_formats.to_preference(FORMATS[name])
    expected = PAIR[0][-1:] if name == "TRL strings" else PAIR[0]
    assert (prompt, chosen, rejected) == (expected, PAIR[1], PAIR[2])


def test_bad_pairs_are_counted_not_fatal(tmp_path, demo_data, tiny_sft):
    records = list(FORMATS.values()) + [
        {"prompt": "同样的回答", "chosen": "好", "rejected": "好"},                   # nothing to prefer
        {"prompt": "很长的问题" * 300, "chosen": "好", "rejected": "坏"},             # the prompt alone overflows
        {"prompt": "问题", "chosen": "回答" * 300, "rejected": "坏"},                 # a long answer is cut to fit
        {"prompt": "no answers here"},                                              # not a pair
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records) + "not json\n", encoding="utf-8")
    out = tmp_path / "out"
    p = run("prepare_data.py", "--input=", "--sft_input=", f"--dpo_input={path}", "--val_fraction=0",
            f"--tokenizer_model={demo_data}/tokenizer.model", f"--data_dir={out}", "--sft_max_len=128")
    assert "note: --sft_max_len is now --block_size" in p.out  # the old name still works
    assert "pairs.jsonl: 9 kept;" in p.out and "1 invalid JSON lines skipped" in p.out
    assert "1 records that are not a preference pair skipped" in p.out
    assert "1 skipped: chosen and rejected are the same" in p.out
    assert "1 skipped: prompt alone longer than block_size" in p.out and "1 answers cut to fit block_size" in p.out
    data = Pairs(str(out), "train", 128, Tokenizer(str(out / "tokenizer.model")))
    assert len(data) == 7
    # --val_fraction=0 holds nothing out: prepare_data.py says so, and dpo.py names that cause
    assert "warning: no DPO pair fell into the test split; raise --val_fraction" in p.out
    p = run("dpo.py", f"--data_dir={out}", f"--init_from={tiny_sft}", f"--out_dir={tmp_path / 'dpo'}", check=False)
    assert p.returncode == 1 and "Traceback" not in p.out
    assert "dpo_test.bin holds no preference pairs: prepare_data.py put none into the test split" in p.out
