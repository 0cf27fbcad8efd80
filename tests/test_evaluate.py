"""evaluate.py and demo.py's scoring: answers scored as the task defines, batching that changes no
answer, the command's table and its machine-readable report, the sentiment baselines, and on-policy DPO pairs."""
import json
import os

import pytest

import demo
import data_formats
from conftest import run, tiny
from evaluate import balance_sentiment_labels, evaluate_on_tasks, load_tests
from tokenizer import Tokenizer


def test_answers_are_scored_as_each_task_defines():
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
    assert [demo.score(t, q, r, p, idioms) for t, q, r, p in perfect] == [1.0] * 4
    assert [demo.score(t, q, r, p, idioms) for t, q, r, p in wrong] == [0.0] * 5
    half = demo.score("ner", "", "人名：江泽民\n地名：香港\n机构名：无", "人名：江泽民\n地名：无\n机构名：无", idioms)
    assert half == pytest.approx(2 / 3)


def test_the_name_answer_format_reads_back_what_it_writes():
    words = [("江", "nr"), ("泽民", "nr"), ("在", "p"), ("香港", "ns"), ("和", "c"), ("澳门", "ns"), ("会见", "v"),
             ("新华社", "nt"), ("记者", "n"), ("李鹏", "nr")]
    ents = demo.entities(words)
    assert ents == {"nr": ["江泽民", "李鹏"], "ns": ["香港", "澳门"], "nt": ["新华社"]}  # a surname joins its name
    answer = demo.ner_answer(ents)
    assert answer == "人名：江泽民、李鹏\n地名：香港、澳门\n机构名：新华社"
    assert demo.parse_names(answer) == {("人名", "江泽民"), ("人名", "李鹏"), ("地名", "香港"), ("地名", "澳门"),
                                        ("机构名", "新华社")}
    assert demo.parse_names(demo.ner_answer({"nr": [], "ns": [], "nt": []})) == set()  # 无 is no name


def test_questions_longer_than_the_context_are_skipped_not_cut(demo_data, capsys):
    tok = Tokenizer(os.path.join(demo_data, "tokenizer.model"))
    short = {"task": "sentiment", "messages": [{"role": "user", "content": "这条评论是正面还是负面？\n很好"},
                                               {"role": "assistant", "content": "正面"}]}
    long = {"task": "sentiment", "messages": [{"role": "user", "content": "这条评论是正面还是负面？\n" + "房间很干净" * 20},
                                              {"role": "assistant", "content": "正面"}]}
    model = tiny(dim=32, vocab_size=8192, max_seq_len=48)
    results = evaluate_on_tasks(model, tok, [long, short, long, short], set(), per_task=0)
    assert results["sentiment"][1] == 2  # the two short questions were answered; the long ones were not
    assert "2 question(s) longer than the context skipped" in capsys.readouterr().out
    assert evaluate_on_tasks(model, tok, [long, short, long, short], set(), per_task=1)["sentiment"][1] == 1


def test_answering_in_batches_gives_each_question_the_answer_it_gets_alone(demo_data, tiny_ckpt):
    from checkpoint import load_model
    model, tok, _ = load_model(tiny_ckpt)
    tests = [t for t in load_tests(demo_data) if t["task"] in ("sentiment", "pinyin")]
    batched, alone = [], []
    evaluate_on_tasks(model, tok, tests, set(), per_task=40, batch_size=32, record=batched)
    evaluate_on_tasks(model, tok, tests, set(), per_task=40, batch_size=1, record=alone)
    assert len(batched) == 80 and sorted(batched) == sorted(alone)
    assert len({answer for *_, answer in batched}) > 1  # the model does answer, and not always the same


def test_the_command_compares_a_checkpoint_with_its_base_and_writes_a_report(demo_data, tiny_ckpt, tiny_sft):
    p = run("evaluate.py", f"--out_dir={tiny_sft}", f"--data_dir={demo_data}", "--per_task=3")
    assert "sentiment (accuracy)" in p.out and "pretrained" in p.out and "SFT" in p.out
    report = json.load(open(os.path.join(tiny_sft, "eval.json")))
    assert list(report["models"]) == ["pretrained", "SFT"]
    assert report["models"]["pretrained"]["checkpoint"] == tiny_ckpt
    assert report["models"]["SFT"]["checkpoint"] == tiny_sft
    sentiment = report["models"]["SFT"]["tasks"]["sentiment"]
    assert sentiment["n"] == 3 and sentiment["metric"] == "accuracy" and 0 <= sentiment["score"] <= 1
    assert report["models"]["SFT"]["tasks"].keys() == report["models"]["pretrained"]["tasks"].keys()


def test_the_sentiment_baselines_beat_the_majority_label(demo_data, tiny_sft):
    p = run("evaluate.py", f"--out_dir={tiny_sft}", f"--data_dir={demo_data}", "--per_task=2", "--base=none",
            "--baselines")
    report = json.load(open(os.path.join(tiny_sft, "eval.json")))["models"]
    majority = report["majority label"]["tasks"]["sentiment"]
    bigrams = report["Naive Bayes, chars+bigrams"]["tasks"]["sentiment"]
    assert majority["n"] == bigrams["n"] > 600  # every held-out review, not --per_task of them
    assert 0.5 < majority["score"] < 0.6 and bigrams["score"] > majority["score"] + 0.1
    assert "pretrained" not in p.out


def test_a_missing_checkpoint_says_how_to_make_one(tmp_path):
    p = run("evaluate.py", f"--out_dir={tmp_path}", check=False)
    assert p.returncode != 0 and "sft.py" in p.out and "Traceback" not in p.out


def test_onpolicy_pairs_are_the_models_own_wrong_answers_on_training_questions(demo_data, tiny_sft, tmp_path):
    path = tmp_path / "onpolicy.jsonl"
    p = run("evaluate.py", f"--out_dir={tiny_sft}", f"--data_dir={demo_data}", f"--onpolicy_pairs={path}",
            "--onpolicy_tasks=sentiment")
    pairs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert pairs and f"{len(pairs):,} wrong answers written" in p.out
    held_out = {t["messages"][0]["content"] for t in load_tests(demo_data)}
    for pair in pairs:
        prompt, chosen, rejected = data_formats.to_preference(pair)  # a pair prepare_data.py reads
        assert chosen in ("正面", "负面") and rejected != chosen and rejected.strip()
        assert prompt[-1]["content"] not in held_out  # training questions only
    chosen = [pair["chosen"] for pair in pairs]
    assert chosen.count("正面") == chosen.count("负面")


def test_onpolicy_sentiment_pairs_choose_each_label_equally_often():
    pairs = ([{"task": "sentiment", "chosen": "正面", "rejected": "负面", "i": i} for i in range(5)]
             + [{"task": "sentiment", "chosen": "负面", "rejected": "正面", "i": i} for i in range(5, 7)]
             + [{"task": "ner", "chosen": "人名：张三", "rejected": "人名：无", "i": 7}])
    kept, dropped = balance_sentiment_labels(pairs)
    assert dropped == 3 and [p["chosen"] for p in kept].count("正面") == 2
    assert [p for p in kept if p["chosen"] != "正面"] == pairs[5:]  # the rarer label and the other tasks: all
    assert [p["i"] for p in kept] == sorted(p["i"] for p in kept)  # in their order
    # errors that all lean one way teach nothing but the lean: none of them is kept
    assert balance_sentiment_labels(pairs[:5] + pairs[7:]) == (pairs[7:], 5)


def test_pass_at_k_is_the_mean_of_the_samples_and_the_mean_best_of_k(demo_data, monkeypatch):
    import evaluate as evaluate_module
    tok = Tokenizer(os.path.join(demo_data, "tokenizer.model"))
    tests = [{"task": "sentiment", "messages": [{"role": "user", "content": f"评论{i}"},
                                                {"role": "assistant", "content": "正面"}]} for i in range(2)]
    answers = {0: ["正面", "负面", "负面"], 1: ["负面", "负面", "负面"]}  # 1 of 3 right, then none
    seeded = []

    def fake_complete(model, requests, slots):
        seeded.extend(r.generator is not None for r in requests)
        return [(tok.encode(answers[i // 3][i % 3]), "stop") for i in range(len(requests))]
    monkeypatch.setattr(evaluate_module, "complete", fake_complete)
    result = evaluate_module.pass_at_k(tiny(vocab_size=tok.n_words, max_seq_len=64), tok, tests, set(), 0, 3, 1.0)
    assert result == {"sentiment": (pytest.approx(1 / 6), 0.5, 2)} and len(seeded) == 6 and all(seeded)
