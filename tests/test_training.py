"""training.py: the learning-rate schedule, device resolution and its refusals, the stop decision,
the deferred log, and the out_dir guard."""
import os
import signal

import pytest
import torch

from device import resolve_device, setup_device
from training import Logger, Stopper, claim_out_dir, cosine_lr, warmdown_lr


def test_cosine_lr_warms_up_decays_and_stays_at_the_minimum():
    lr = lambda it: cosine_lr(it, learning_rate=1.0, min_lr=0.1, warmup_iters=10, decay_iters=110)  # noqa: E731
    assert lr(0) == pytest.approx(1 / 11)          # warmup starts above zero: the first step already learns
    assert lr(9) == pytest.approx(10 / 11) and lr(9) < lr(10)
    assert lr(10) == pytest.approx(1.0)           # the peak, at the end of warmup
    assert lr(60) == pytest.approx(0.55)          # halfway through the decay: halfway between peak and minimum
    assert lr(110) == pytest.approx(0.1) and lr(5000) == 0.1
    assert all(lr(i) >= lr(i + 1) for i in range(10, 200))


def test_warmdown_lr_holds_the_peak_then_falls_linearly_to_the_minimum():
    lr = lambda it: warmdown_lr(it, 1.0, 0.0, warmup_iters=10, decay_iters=110, warmdown_iters=40)  # noqa: E731
    assert lr(0) == pytest.approx(1 / 11) and lr(9) < lr(10)
    assert all(lr(i) == 1.0 for i in range(10, 71))        # constant until the last 40 iterations
    assert lr(90) == pytest.approx(0.5) and lr(109) == pytest.approx(1 / 40)  # a straight line down
    assert lr(110) == 0.0 and lr(500) == 0.0


def test_auto_resolves_to_what_this_machine_has():
    device, dtype = resolve_device("auto", "auto")
    if not torch.cuda.is_available():
        assert (device, dtype) in (("cpu", "float32"), ("mps", "float32"))


@pytest.mark.parametrize("device, dtype, message", [
    ("gpu", "auto", "--device=gpu is not a device"),
    ("cuda:x", "auto", "is not a device"),
    ("cpu:0:1", "auto", "is not a device"),
    ("cpu", "fp16", "--dtype must be auto, float32, bfloat16 or float16"),
])
def test_unknown_devices_and_dtypes_are_one_line_errors(device, dtype, message):
    with pytest.raises(SystemExit, match=message):
        resolve_device(device, dtype)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_a_gpu_that_is_not_there_is_refused():
    with pytest.raises(SystemExit, match="no CUDA GPU is visible"):
        resolve_device("cuda", "auto")
    with pytest.raises(SystemExit, match="float16 training needs a CUDA GPU"):
        setup_device("cpu", "float16", None, keep_memory=False)


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="checks the refusal on a machine without an Apple GPU")
def test_mps_where_there_is_none_is_refused():
    with pytest.raises(SystemExit, match="no Apple GPU"):
        resolve_device("mps", "auto")


def test_a_signal_asks_the_loop_to_stop_and_a_second_ctrl_c_quits_at_once():
    run = setup_device("cpu", "float32", False, keep_memory=False)
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        stopper = Stopper(run)
        assert stopper.agreed() == Stopper.GO
        os.kill(os.getpid(), signal.SIGTERM)
        assert stopper.agreed() == Stopper.INTERRUPTED
        os.kill(os.getpid(), signal.SIGTERM)  # a second SIGTERM changes nothing
        assert stopper.agreed() == Stopper.INTERRUPTED
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def test_a_non_finite_loss_marks_the_run_diverged():
    run = setup_device("cpu", "float32", False, keep_memory=False)
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        stopper = Stopper(run)
        assert stopper.check_loss(2.5, "val loss", 10) and stopper.agreed() == Stopper.GO
        assert not stopper.check_loss(float("nan"), "val loss", 20)
        assert stopper.agreed() == Stopper.DIVERGED and "val loss is nan at iteration 20" in stopper.message
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def test_a_fresh_run_over_a_checkpoint_replaces_the_log_only_when_it_commits(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"an earlier run")
    (tmp_path / "log.jsonl").write_text('{"iter": 1700}\n')
    logger = Logger(str(tmp_path), 10, resume=False)
    logger.log({"iter": 0})
    assert (tmp_path / "log.jsonl").read_text() == '{"iter": 1700}\n'
    logger.commit()
    logger.log({"iter": 1})
    assert (tmp_path / "log.jsonl").read_text() == '{"iter": 0}\n{"iter": 1}\n'
    resumed = Logger(str(tmp_path), 10, resume=True)
    resumed.log({"iter": 2})
    assert (tmp_path / "log.jsonl").read_text().count("\n") == 3


@pytest.mark.parametrize("make, message", [
    (lambda d: d.write_text("a file"), "is a file, not a directory"),
    (lambda d: (d.mkdir(), (d / "ckpt.pt").write_bytes(b"x")), "already holds a run"),
])
def test_claim_out_dir_refuses_what_would_lose_work(tmp_path, make, message):
    out = tmp_path / "out"
    make(out)
    with pytest.raises(SystemExit, match=message):
        claim_out_dir(str(out), fresh=True, overwrite=False)


def test_claim_out_dir_refuses_to_fine_tune_into_the_base(tmp_path):
    with pytest.raises(SystemExit, match="would overwrite the model it starts from"):
        claim_out_dir(str(tmp_path / "a"), fresh=True, overwrite=False, init_from=str(tmp_path / "a" / "."))


def test_the_import_graph_is_acyclic_and_the_shared_modules_never_import_a_stage():
    import ast
    import glob
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    modules = {os.path.basename(p)[:-3]: p for p in glob.glob(os.path.join(root, "*.py"))}
    imports = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module.split(".")[0])
        imports[name] = found & set(modules) - {name}
    shared = {"configurator", "muon", "lora", "tokenizer", "engine", "model", "demo", "memory", "checkpoint",
              "device", "training", "tracking", "data_formats", "shards"}
    assert shared <= set(modules)
    for name in shared:
        assert imports[name] <= shared, f"{name} imports the stage script(s) {imports[name] - shared}"
    # the loop protocol is for the scripts that train: a decoder, an evaluator or a report asks device.py
    assert {name for name in modules if "training" in imports[name]} <= {"pretrain", "sft", "dpo", "grpo"}
    assert not imports["device"] and not imports["engine"] - {"model"}  # the floor of the house
    done, visiting = set(), []

    def visit(name):  # depth first: meeting a module already on the path is a cycle
        assert name not in visiting, f"import cycle: {' -> '.join(visiting + [name])}"
        if name not in done:
            visiting.append(name)
            for dep in imports[name]:
                visit(dep)
            visiting.pop()
            done.add(name)

    for name in modules:
        visit(name)
