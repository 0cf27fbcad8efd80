"""grpo.py: reinforcement learning with verifiable rewards. The objective against hand computations, the
rollouts against the engine serve.py runs, and tiny runs with a verifier of the test's own."""
import json
import math
import os
import threading

import pytest
import torch

import grpo
from conftest import ROOT, read_log, run, tiny
from engine import Engine, Request
from lora import add_lora
from model import answer_logprobs


def test_advantages_are_rewards_minus_the_group_mean_and_all_equal_groups_carry_no_signal():
    advantages, signal = grpo.group_advantages([[1, 0, 0, 1], [0.5, 0.5, 0.5, 0.5], [0.2, 0.8, 0.5, 0.5]])
    assert torch.allclose(advantages, torch.tensor([[0.5, -0.5, -0.5, 0.5], [0, 0, 0, 0], [-0.3, 0.3, 0, 0]]))
    assert signal.tolist() == [True, False, True]  # not divided by the group's std (Dr. GRPO)


def test_the_loss_equals_a_hand_computation():
    logps = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.1, -3.0]])
    old = torch.tensor([[-1.2, -1.5, 0.0], [-0.5, -0.6, -1.0]])
    ref = torch.tensor([[-1.1, -2.0, 0.0], [-0.4, -0.1, -2.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    advantages = torch.tensor([0.5, -0.5])
    clip_eps, kl_coef, norm = 0.2, 0.1, 10.0
    loss, kl = grpo.grpo_loss(logps, old, ref, advantages, mask, clip_eps, kl_coef, norm)
    total, kls = 0.0, []
    for i in range(2):
        for t in range(3):
            if mask[i, t]:
                ratio = math.exp(logps[i, t] - old[i, t])
                a = float(advantages[i])
                policy = -min(ratio * a, min(max(ratio, 1 - clip_eps), 1 + clip_eps) * a)
                r = float(ref[i, t] - logps[i, t])
                kls.append(math.exp(r) - r - 1)
                total += policy + kl_coef * kls[-1]
    assert loss.item() == pytest.approx(total / norm, rel=1e-6)
    assert kl.item() == pytest.approx(sum(kls) / len(kls), rel=1e-6)


def test_the_kl_term_and_its_gradient_are_zero_where_the_policy_is_the_reference():
    logps = torch.tensor([[-1.0, -2.0], [-0.3, -0.7]], requires_grad=True)
    mask = torch.ones(2, 2)
    loss, kl = grpo.grpo_loss(logps, logps.detach(), logps.detach(), torch.zeros(2), mask, 0.2, 1.0, 4.0)
    loss.backward()
    assert loss.item() == 0 and kl.item() == 0 and torch.all(logps.grad == 0)


def test_a_group_whose_rewards_are_all_equal_adds_no_row_and_no_gradient():
    model = tiny()
    prompts = [[1, 5, 6], [1, 7]]
    groups = [[([8, 9], "stop"), ([10], "length")], [([11], "stop"), ([12, 13], "stop")]]
    advantages, keep = grpo.group_advantages([[1.0, 0.0], [0.5, 0.5]])
    batch = {k: torch.from_numpy(v) for k, v in grpo.answer_batch(prompts, groups, advantages, keep, 2).items()}
    assert batch["tokens"].shape[0] == 2  # only the first group's two answers
    # row 0: [1, 5, 6, 8, 9, EOS]: the answer's three tokens (EOS included) are predicted at positions 2..4
    assert batch["tokens"][0].tolist() == [1, 5, 6, 8, 9] and batch["targets"][0].tolist() == [5, 6, 8, 9, 2]
    assert batch["loss_mask"][0].tolist() == [0, 0, 1, 1, 1] and batch["loss_mask"][1].tolist() == [0, 0, 1, 0, 0]

    def gradient(b):
        model.zero_grad()
        logps = answer_logprobs(model, b)
        loss, _ = grpo.grpo_loss(logps, logps.detach(), logps.detach(), b["advantages"], b["loss_mask"], 0.2, 0.1, 8)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    with_both = gradient(batch)
    everything = {k: torch.from_numpy(v) for k, v in
                  grpo.answer_batch(prompts, groups, advantages, torch.tensor([True, True]), 2).items()}
    assert torch.allclose(gradient(everything), with_both, atol=1e-7)  # the equal group's rows add nothing
    assert with_both.abs().sum() > 0


def test_the_reference_never_changes_while_the_policy_trains():
    for lora in (False, True):
        policy = tiny()
        reference = None if lora else tiny()
        if lora:
            add_lora(policy, {"wq", "wv", "w2"}, 4, 8.0, 0.0)
        batch = {"tokens": torch.tensor([[1, 5, 6, 8]]), "targets": torch.tensor([[5, 6, 8, 9]]),
                 "loss_mask": torch.tensor([[0.0, 1.0, 1.0, 1.0]]), "advantages": torch.tensor([1.0])}
        before = grpo.reference_logps(batch, reference, policy).clone()
        optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(3):
            logps = answer_logprobs(policy, batch)
            loss, _ = grpo.grpo_loss(logps, logps.detach(), before, batch["advantages"], batch["loss_mask"],
                                     0.2, 0.1, 4)
            (loss - logps.sum()).backward()  # push the policy away for sure
            optimizer.step()
            optimizer.zero_grad()
        assert not torch.allclose(answer_logprobs(policy, batch), before)
        assert torch.equal(grpo.reference_logps(batch, reference, policy), before), lora


def test_rollouts_are_reproducible_and_what_the_served_engine_gives_for_the_same_seed(demo_data, tiny_sft):
    from checkpoint import load_model
    model, tok, _ = load_model(tiny_sft)
    prompts = [tok.encode_chat([{"role": "user", "content": q}])[0] for q in ("你好", "“一马当先”是什么意思？")]
    seeds = [[grpo.rollout_seed(7, 0, q, g) for g in range(3)] for q in range(2)]
    first = grpo.rollouts(model, tok, prompts, 3, 10, 1.0, 1.0, seeds)
    assert first == grpo.rollouts(model, tok, prompts, 3, 10, 1.0, 1.0, seeds)
    assert len({tuple(tokens) for tokens, _ in first[1]}) > 1  # the answers of a group differ
    engine = Engine(model, slots=1)  # as serve.py runs it: one request at a time, scheduled in its own thread
    for p, ids in enumerate(prompts):
        for g in range(3):
            request = Request(ids, 10, 1.0, 1.0, seed=seeds[p][g], stop_tokens=tok.stop_ids)
            engine.submit(request)
            tokens = []
            while (item := request.out.get(timeout=60))[0] == "token":
                tokens.append(item[1])
            assert (tokens, item[1]) == first[p][g]
    engine.close()
    assert threading.active_count() >= 1


QUESTIONS = os.path.join(ROOT, "tests", "grpo_questions.jsonl")  # short questions a tiny model's context fits
GRPO_TINY = ["--batch_size=4", "--group_size=4", "--max_new_tokens=6", "--eval_per_task=4", "--log_interval=1",
             "--warmup_iters=0", "--evaluate_tasks=False", "--device=cpu"]


def write_task(tmp_path, verifier_body):
    """Short questions for a tiny model, and a verifier module of the test's own (it logs every call)."""
    questions = [{"question": q, "reference": "短", "task": "short"} for q in ("你好", "早上好", "谢谢", "再见")]
    for name in ("train.jsonl", "test.jsonl"):
        (tmp_path / name).write_text("\n".join(json.dumps(q, ensure_ascii=False) for q in questions), encoding="utf-8")
    (tmp_path / "my_checks.py").write_text(
        "CALLS = []\n"
        "def reward(question, answer, reference):\n"
        f"    open({str(tmp_path / 'calls.txt')!r}, 'a', encoding='utf-8').write(question + '\\n')\n"
        f"    {verifier_body}\n", encoding="utf-8")
    return [f"--questions={tmp_path / 'train.jsonl'}", f"--test_questions={tmp_path / 'test.jsonl'}",
            "--verifier=my_checks:reward"]


def test_a_user_verifier_is_called_and_its_rewards_are_the_ones_trained_on(demo_data, tiny_sft, tmp_path):
    task = write_task(tmp_path, "return 1.0")
    run("grpo.py", f"--data_dir={demo_data}", f"--init_from={tiny_sft}", f"--out_dir={tmp_path / 'out'}", *GRPO_TINY,
        *task, "--max_iters=2", "--eval_interval=2", extra_env={"PYTHONPATH": str(tmp_path)})
    calls = (tmp_path / "calls.txt").read_text(encoding="utf-8").split()
    assert set(calls) == {"你好", "早上好", "谢谢", "再见"} and len(calls) >= 2 * 4 * 4  # every rollout was scored
    steps = [r for r in read_log(tmp_path / "out") if "reward" in r]
    assert [r["reward"] for r in steps] == [1.0, 1.0] and all(r["skipped_groups"] == 1.0 for r in steps)
    assert all(r["loss"] == 0 for r in steps)  # every group alike: nothing to learn, no step taken


def test_a_tiny_run_raises_the_mean_training_reward(demo_data, tiny_sft, tmp_path):
    # the reward: shorter answers are better; the tiny SFT model's sampled answers vary in length
    task = write_task(tmp_path, "return max(0.0, 1 - len(answer) / 12)")
    run("grpo.py", f"--data_dir={demo_data}", f"--init_from={tiny_sft}", f"--out_dir={tmp_path / 'out'}", *GRPO_TINY,
        *task, "--max_iters=24", "--eval_interval=24", "--learning_rate=3e-3", "--kl_coef=0",
        extra_env={"PYTHONPATH": str(tmp_path)})
    rewards = [r["reward"] for r in read_log(tmp_path / "out") if "reward" in r]
    first, last = sum(rewards[:6]) / 6, sum(rewards[-6:]) / 6
    assert last > first + 0.1, rewards


def test_a_task_without_a_verifier_is_refused_in_one_line(demo_data, tiny_sft, tmp_path):
    p = run("grpo.py", f"--data_dir={demo_data}", f"--init_from={tiny_sft}", f"--out_dir={tmp_path / 'out'}",
            "--tasks=meaning", check=False)
    assert p.returncode == 1 and "Traceback" not in p.out and "--tasks: meaning has no verifier" in p.out
    p = run("grpo.py", f"--data_dir={demo_data}", f"--init_from={tiny_sft}", f"--out_dir={tmp_path / 'out2'}",
            "--verifier=nonexistent_module:f", check=False)
    assert p.returncode == 1 and "Traceback" not in p.out and "--verifier=nonexistent_module:f" in p.out


def test_the_shaped_idiom_chain_reward_gives_partial_credit_and_full_credit_only_for_a_real_idiom():
    import demo
    question = "成语接龙：一马当先"
    assert demo.chain_shaped(question, "先声夺人", "先睹为快") == 1.0  # any real idiom that chains
    assert demo.chain_shaped(question, "先先先先", "先睹为快") == 0.5  # four characters, the right first one
    assert demo.chain_shaped(question, "天天向上", "先睹为快") == 0.25
    assert demo.chain_shaped(question, "先来后到吗", "先睹为快") == 0.25
    assert demo.chain_shaped(question, "", "先睹为快") == 0.0


def test_two_processes_train_what_one_process_with_twice_the_questions_trains(demo_data, tiny_sft, tmp_path):
    from test_fsdp import TORCHRUN
    common = [f"--data_dir={demo_data}", f"--init_from={tiny_sft}", "--group_size=4", "--max_new_tokens=6",
              "--eval_per_task=2", "--log_interval=1", "--warmup_iters=0", "--evaluate_tasks=False", "--device=cpu",
              f"--questions={QUESTIONS}", f"--test_questions={QUESTIONS}", "--verifier=tests.grpo_checks:shorter",
              "--max_iters=3", "--eval_interval=3", "--dtype=float32"]  # bf16 would round by thread count
    run("grpo.py", f"--out_dir={tmp_path / 'one'}", *common, "--batch_size=4")
    run("grpo.py", f"--out_dir={tmp_path / 'two'}", *common, "--batch_size=2", launcher=TORCHRUN)
    one = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)["model"]
    two = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)["model"]
    start = torch.load(f"{tiny_sft}/ckpt.pt", weights_only=True)["model"]
    assert not torch.equal(one["layers.0.attention.wq.weight"], start["layers.0.attention.wq.weight"])  # it trained
    for key in one:
        assert torch.allclose(one[key], two[key], atol=1e-5), key


def test_a_run_on_your_own_task_is_evaluated_and_resumed_on_that_task(demo_data, tiny_sft, tmp_path):
    task = write_task(tmp_path, "return 1.0 if len(answer) < 4 else 0.0")
    out, env = tmp_path / "out", {"PYTHONPATH": str(tmp_path)}
    common = [f"--data_dir={demo_data}", f"--out_dir={out}", *GRPO_TINY[:-2], "--eval_interval=2", "--device=cpu"]
    run("grpo.py", f"--init_from={tiny_sft}", *common, *task, "--max_iters=2", "--evaluate_tasks=True",
        extra_env=env)
    # the end-of-run evaluation: the user's held-out questions, scored by the user's verifier, beside the start
    evaluation = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    assert list(evaluation["models"]) == ["SFT", "GRPO"]
    for model in evaluation["models"].values():
        assert list(model["tasks"]) == ["short"] and model["tasks"]["short"]["metric"] == "verifier"
    calls = len((tmp_path / "calls.txt").read_text(encoding="utf-8").split())
    # resumed with no flags, and with another task asked for: the run goes on with its own task and verifier
    run("grpo.py", "--init_from=resume", *common, "--max_iters=4", extra_env=env)
    again = len((tmp_path / "calls.txt").read_text(encoding="utf-8").split())
    assert again >= calls + 2 * 4 * 4
    p = run("grpo.py", "--init_from=resume", *common, "--max_iters=6", "--tasks=sentiment", "--verifier=",
            "--questions=", extra_env=env)
    assert "--tasks=sentiment is ignored" in p.out and "--questions= is ignored" in p.out
    assert len((tmp_path / "calls.txt").read_text(encoding="utf-8").split()) >= again + 2 * 4 * 4
    assert [r["iter"] for r in read_log(out) if "reward" in r] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("body, phrase", [("return 5.0", "returned 5.0 for the question"),
                                          ("return float('nan')", "returned nan"),
                                          ("return None", "returned None"),
                                          ("raise KeyError('x')", "raised KeyError"),
                                          ("return (", "SyntaxError")])
def test_a_verifier_that_misbehaves_stops_the_run_in_one_line(demo_data, tiny_sft, tmp_path, body, phrase):
    task = write_task(tmp_path, body)
    p = run("grpo.py", f"--data_dir={demo_data}", f"--init_from={tiny_sft}", f"--out_dir={tmp_path / 'out'}",
            *GRPO_TINY, *task, "--max_iters=2", check=False, extra_env={"PYTHONPATH": str(tmp_path)})
    assert p.returncode == 1 and "Traceback" not in p.out and phrase in p.out, p.out[-1500:]
    assert "--verifier=my_checks:reward" in p.out and "diverged" not in p.out


def test_question_files_are_read_as_prepare_data_reads_inputs(tmp_path):
    rows = [{"question": "你好", "reference": "好", "task": "t"}, ["a", "list"], {"question": 3, "reference": "x"},
            {"question": "再见", "reference": "见"}]
    text = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\nnot json\n"
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    (tmp_path / "gbk.jsonl").write_bytes(text.encode("gbk"))
    for name in ("bom.jsonl", "gbk.jsonl"):
        assert grpo.read_questions(str(tmp_path / name)) == [("t", "你好", "好"), ("custom", "再见", "见")]
