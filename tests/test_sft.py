"""sft.py: answer-only loss, packing that keeps conversations apart, LoRA, resume, and the evaluation."""
import json
import os

import numpy as np
import pytest
import torch

from conftest import run
from lora import add_lora, merged_state_dict
from model import ModelArgs, Transformer
from sft import Conversations, evaluate_on_tasks, parse_names, score
from tokenizer import Tokenizer

SFT_TINY = ["--batch_size=4", "--eval_iters=2", "--log_interval=1", "--warmup_iters=2", "--learning_rate=1e-2",
            "--evaluate_tasks=False"]


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def tiny_model(**kw):
    torch.manual_seed(0)
    return Transformer(ModelArgs(**dict(dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=8192,
                                             max_seq_len=128), **kw))).eval()


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
    packed = {k: torch.from_numpy(v) for k, v in batch.items() if k != "loss_mask"}  # logits at every position
    logits, _ = model(**packed)
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
    logits, _ = model(torch.from_numpy(batch["tokens"]), torch.from_numpy(batch["targets"]))
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


@pytest.mark.parametrize("lora", [0, 4])
def test_sft_resume_continues_exactly(demo_data, tiny_ckpt, tmp_path, lora):
    common = [f"--data_dir={demo_data}", f"--init_from={tiny_ckpt}", *SFT_TINY, "--eval_interval=5",
              "--lr_decay_iters=10", f"--lora_rank={lora}"]
    run("sft.py", f"--out_dir={tmp_path / 'straight'}", *common, "--max_iters=10")
    run("sft.py", f"--out_dir={tmp_path / 'resumed'}", *common, "--max_iters=5")
    run("sft.py", f"--out_dir={tmp_path / 'resumed'}", *[a for a in common if not a.startswith("--init_from")],
        "--init_from=resume", "--max_iters=10")
    straight = {r["iter"]: r["loss"] for r in read_log(tmp_path / "straight") if "loss" in r}
    resumed = {r["iter"]: r["loss"] for r in read_log(tmp_path / "resumed") if "loss" in r}
    for it in range(6, 11):
        assert resumed[it] == pytest.approx(straight[it], rel=1e-5, abs=1e-6), it


def test_the_evaluation_scores_perfect_answers_1_and_wrong_answers_0():
    idioms = {"一马当先", "先发制人", "人山人海"}
    perfect = [("sentiment", "这条评论是正面还是负面？\n很好", "正面", "正面"),
               ("chain", "成语接龙：一马当先", "先发制人", "先发制人"),
               ("ner", "找出……：…", "人名：江泽民\n地名：香港、澳门\n机构名：无", "人名：江泽民\n地名：澳门、香港\n机构名：无"),
               ("meaning", "“人山人海”是什么意思？", "形容人聚集得非常多。", "形容人聚集得非常多。")]
    wrong = [("sentiment", "这条评论是正面还是负面？\n很好", "正面", "负面"),
             ("chain", "成语接龙：一马当先", "先发制人", "人山人海"),   # a real idiom, but the wrong first character
             ("chain", "成语接龙：一马当先", "先发制人", "先来后到"),   # the right character, but not in the list
             ("ner", "找出……：…", "人名：江泽民\n地名：香港\n机构名：无", "人名：李鹏\n地名：北京\n机构名：新华社"),
             ("meaning", "“人山人海”是什么意思？", "形容人聚集得非常多。", "形容人很少。")]
    assert [score(t, q, r, p, idioms) for t, q, r, p in perfect] == [1.0] * 4
    assert [score(t, q, r, p, idioms) for t, q, r, p in wrong] == [0.0] * 5
    assert score("ner", "", "人名：江泽民\n地名：香港\n机构名：无", "人名：江泽民\n地名：无\n机构名：无", idioms) == pytest.approx(2 / 3)
    assert parse_names("人名：江泽民、李鹏\n地名：无") == {("人名", "江泽民"), ("人名", "李鹏")}


def test_the_evaluation_skips_questions_longer_than_the_context_instead_of_cutting_them(demo_data, capsys):
    tok = Tokenizer(os.path.join(demo_data, "tokenizer.model"))
    short = {"task": "sentiment", "messages": [{"role": "user", "content": "这条评论是正面还是负面？\n很好"},
                                               {"role": "assistant", "content": "正面"}]}
    long = {"task": "sentiment", "messages": [{"role": "user", "content": "这条评论是正面还是负面？\n" + "房间很干净" * 20},
                                              {"role": "assistant", "content": "正面"}]}
    results = evaluate_on_tasks(tiny_model(max_seq_len=48), tok, [long, short, long, short], set(), "cpu", per_task=0)
    assert results["sentiment"][1] == 2  # the two short questions were answered; the long ones were not
    assert "2 question(s) longer than the context skipped" in capsys.readouterr().out
    results = evaluate_on_tasks(tiny_model(max_seq_len=48), tok, [long, short, long, short], set(), "cpu", per_task=1)
    assert results["sentiment"][1] == 1


def test_eval_only_compares_the_sft_model_with_its_base(demo_data, tiny_ckpt, tmp_path):
    run("sft.py", f"--data_dir={demo_data}", f"--init_from={tiny_ckpt}", f"--out_dir={tmp_path}", *SFT_TINY,
        "--max_iters=2", "--eval_interval=2")
    p = run("sft.py", f"--data_dir={demo_data}", f"--out_dir={tmp_path}", "--eval_only=True", "--eval_per_task=2")
    assert "sentiment (accuracy)" in p.out and "pretrained" in p.out and "SFT" in p.out
    results = json.load(open(tmp_path / "eval.json"))
    assert set(results) == {"pretrained", "SFT"} and results["SFT"]["sentiment"]["n"] == 2


def test_sft_without_a_pretrained_checkpoint_says_what_to_run(demo_data, tmp_path):
    p = run("sft.py", f"--data_dir={demo_data}", f"--init_from={tmp_path / 'nothing'}", f"--out_dir={tmp_path}", check=False)
    assert p.returncode != 0 and "pretrain.py" in p.out and "Traceback" not in p.out
