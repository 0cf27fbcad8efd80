"""sft.py: answer-only loss, packing that keeps conversations apart, LoRA, and resume."""
import json
import os

import numpy as np
import pytest
import torch

from conftest import read_log, run, tiny
from lora import add_lora, merged_state_dict
from sft import Conversations, with_text_rows
from shards import TokenShards
from tokenizer import Tokenizer

SFT_TINY = ["--batch_size=4", "--eval_iters=2", "--log_interval=1", "--warmup_iters=2", "--learning_rate=1e-2",
            "--evaluate_tasks=False"]


def tiny_model(**kw):
    return tiny(**dict(dict(dim=32, vocab_size=8192, max_seq_len=128), **kw))


@pytest.mark.parametrize("packed", [True, False])
def test_the_loss_mask_covers_exactly_the_answers(demo_data, packed):
    tok = Tokenizer(os.path.join(demo_data, "tokenizer.model"))
    data = Conversations(demo_data, "test", 128, tok, packed)
    batch = data.batch(0, 6)
    tests = [json.loads(line) for line in open(os.path.join(demo_data, "sft_test.jsonl"), encoding="utf-8")]
    answers = {m["content"] for t in tests for m in t["messages"] if m["role"] == "assistant"}
    for row_targets, row_mask in zip(batch["targets"], batch["loss_mask"]):
        masked = row_targets[row_mask == 1].tolist()
        assert masked and masked.count(tok.eos_id) >= 1 and masked[-1] == tok.eos_id
        for span in _split_at(masked, tok.eos_id):
            assert tok.decode(span) in answers
        assert (row_targets[row_mask == 0] == tok.eos_id).sum() == 0  # no unmasked answer ends


def _split_at(ids, sep):
    spans, cur = [], []
    for t in ids:
        if t == sep:
            spans.append(cur)
            cur = []
        else:
            cur.append(t)
    return spans


@pytest.mark.parametrize("packed", [True, False])
def test_every_conversation_is_trained_on_once_per_epoch_whatever_its_length(demo_data, packed):
    tok = Tokenizer(os.path.join(demo_data, "tokenizer.model"))
    data = Conversations(demo_data, "train", 128, tok, packed)
    lengths = data.ends - data.starts - 1
    epoch0, epoch1 = data.rows_of_epoch(0), data.rows_of_epoch(1)
    for rows in (epoch0, epoch1):
        assert sorted(i for row in rows for i in row) == list(range(len(data)))
        assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    assert epoch0 != epoch1  # shuffled anew
    if packed:
        assert lengths.sum() / (len(epoch0) * 128) > 0.9  # rows are nearly full
    # the stream of rows runs through epoch 0, then epoch 1
    assert data.row(0) == epoch0[0] and data.row(len(epoch0)) == epoch1[0] and data.row(len(epoch0) - 1) == epoch0[-1]


def test_packed_conversations_never_attend_across_each_other(demo_data):
    tok = Tokenizer(os.path.join(demo_data, "tokenizer.model"))
    data = Conversations(demo_data, "test", 128, tok, packed=True, seed=3)
    model = tiny_model()
    batch = data.batch(0, 2)
    packed = {k: torch.from_numpy(v) for k, v in batch.items() if k != "loss_mask"}
    logits, _ = model(**dict(packed, targets=packed["targets"].clamp(min=0)))  # a target everywhere: all logits
    # every conversation in the row, run alone from position 0, gives the same logits
    pos = batch["positions"][0]
    starts = [i for i in range(128) if pos[i] == 0] + [128]
    checked = 0
    for a, b in zip(starts, starts[1:]):
        if batch["targets"][0, a] == -1:  # padding
            continue
        alone, _ = model(torch.from_numpy(batch["tokens"][:1, a:b]), torch.from_numpy(batch["targets"][:1, a:b]))
        torch.testing.assert_close(logits[0, a:b], alone[0], atol=1e-4, rtol=1e-4)
        checked += 1
    assert checked >= 2  # the row really held several conversations


def test_padding_changes_nothing_before_it(demo_data):
    tok = Tokenizer(os.path.join(demo_data, "tokenizer.model"))
    data = Conversations(demo_data, "test", 128, tok, packed=False, seed=5)
    model = tiny_model()
    batch = data.batch(0, 4)
    logits, _ = model(torch.from_numpy(batch["tokens"]), torch.from_numpy(batch["targets"]).clamp(min=0))  # all logits
    for b in range(4):
        n = int((batch["targets"][b] != -1).sum())
        alone, _ = model(torch.from_numpy(batch["tokens"][b:b + 1, :n]), torch.from_numpy(batch["targets"][b:b + 1, :n]))
        torch.testing.assert_close(logits[b, :n], alone[0], atol=1e-4, rtol=1e-4)


def test_long_conversations_are_cut_after_a_whole_answer_or_skipped(demo_data):
    tok = Tokenizer(os.path.join(demo_data, "tokenizer.model"))
    data = Conversations(demo_data, "train", 48, tok)
    assert data.cut > 0 and data.skipped > 0
    tokens = np.fromfile(os.path.join(demo_data, "sft_train.bin"), dtype=np.uint16)
    lengths = data.ends - data.starts
    assert (lengths - 1 <= 48).all()
    assert (tokens[data.ends - 1] == tok.eos_id).all()  # every kept conversation ends with a whole answer


@pytest.mark.parametrize("packed", [True, False])
def test_replayed_text_rows_are_trained_on_every_token_and_see_only_themselves(demo_data, packed):
    tok = Tokenizer(os.path.join(demo_data, "tokenizer.model"))
    batch = Conversations(demo_data, "train", 64, tok, packed=packed).batch(0, 3)
    T = batch["tokens"].shape[1]
    text = TokenShards(demo_data, "train", tok.sha).batch(np.random.default_rng(0), 2, T)
    mixed = with_text_rows(batch, text)
    assert mixed.keys() == batch.keys() and all(len(v) == 5 for v in mixed.values())
    assert (mixed["tokens"][3:] == text[:, :-1]).all() and (mixed["targets"][3:] == text[:, 1:]).all()
    assert (mixed["loss_mask"][3:] == 1).all() and (mixed["loss_mask"][:3] == batch["loss_mask"]).all()
    if packed:  # one causal segment from position 0, as in pretraining
        assert (mixed["positions"][3:] == np.arange(T)).all()
        assert (mixed["attn_mask"][3:, 0] == np.tril(np.ones((T, T), dtype=bool))).all()


def test_lora_merged_forward_equals_the_adapted_forward():
    model = tiny_model()
    add_lora(model, {"wq", "wv", "w2"}, rank=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 0.05)  # a trained adapter, not the zero it starts from
    tokens = torch.randint(0, 8192, (2, 20))
    adapted, _ = model(tokens, tokens)
    plain = tiny_model()
    plain.load_state_dict(merged_state_dict(model))
    merged, _ = plain(tokens, tokens)
    torch.testing.assert_close(adapted, merged, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(merged, tiny_model()(tokens, tokens)[0])  # the adapters did change the function
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_a", "lora_b")) for n in trainable)


def test_a_tiny_sft_run_lowers_the_answer_loss(demo_data, tiny_ckpt, tmp_path):
    run("sft.py", f"--data_dir={demo_data}", f"--init_from={tiny_ckpt}", f"--out_dir={tmp_path}", *SFT_TINY,
        "--max_iters=30", "--eval_interval=30")
    val = {r["iter"]: r["val_loss"] for r in read_log(tmp_path) if "val_loss" in r}
    assert val[30] < val[0] - 0.3
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["stage"] == "sft" and ckpt["base"] == tiny_ckpt


@pytest.mark.parametrize("lora, replay, muon", [(0, 0, False), (4, 0, False), (0, 1, False), (0, 0, True)])
def test_sft_resume_continues_exactly(demo_data, tiny_ckpt, tmp_path, lora, replay, muon):
    common = [f"--data_dir={demo_data}", f"--init_from={tiny_ckpt}", *SFT_TINY, "--eval_interval=5",
              "--lr_decay_iters=10", f"--lora_rank={lora}", f"--replay_rows={replay}"]
    optimizer = [f"--muon={muon}"]  # left out when resuming: the run's own optimizer comes back
    run("sft.py", f"--out_dir={tmp_path / 'straight'}", *common, *optimizer, "--max_iters=10")
    run("sft.py", f"--out_dir={tmp_path / 'resumed'}", *common, *optimizer, "--max_iters=5")
    run("sft.py", f"--out_dir={tmp_path / 'resumed'}", *[a for a in common if not a.startswith("--init_from")],
        "--init_from=resume", "--max_iters=10")
    straight = {r["iter"]: r["loss"] for r in read_log(tmp_path / "straight") if "loss" in r}
    resumed = {r["iter"]: r["loss"] for r in read_log(tmp_path / "resumed") if "loss" in r}
    for it in range(6, 11):
        assert resumed[it] == pytest.approx(straight[it], rel=1e-5, abs=1e-6), it


def test_sft_on_muon_under_fsdp_is_refused_before_anything_is_written(demo_data, tiny_ckpt, tmp_path):
    p = run("sft.py", f"--data_dir={demo_data}", f"--init_from={tiny_ckpt}", f"--out_dir={tmp_path / 'x'}",
            "--muon=True", "--fsdp=True", check=False)
    assert p.returncode != 0 and "Muon orthogonalizes whole weight matrices" in p.out and "Traceback" not in p.out
    assert not (tmp_path / "x").exists()


def test_sft_without_a_pretrained_checkpoint_says_what_to_run(demo_data, tmp_path):
    p = run("sft.py", f"--data_dir={demo_data}", f"--init_from={tmp_path / 'nothing'}", f"--out_dir={tmp_path}", check=False)
    assert p.returncode != 0 and "pretrain.py" in p.out and "Traceback" not in p.out
