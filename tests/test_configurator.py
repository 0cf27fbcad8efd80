"""The one configurator: --key=value, --key value, bare boolean flags, config files, typed None defaults,
--help with descriptions, and a one-line error for every mistake."""
import pytest

from configurator import check_ranges, configure
from conftest import run


def settings():
    return {"out_dir": "out", "max_iters": 100, "learning_rate": 1e-3, "compile": None, "block_size": None,
            "muon": True, "start": "", "os": pytest,  # a module is not a setting
            "__annotations__": {"compile": bool, "block_size": int}}


def test_overrides_take_the_type_of_the_default_or_of_the_annotation():
    g = settings()
    config = configure(g, ["--max_iters=2_000", "--learning_rate=3e-4", "--compile=true", "--block_size=64",
                           "--out_dir=out/run 1"])
    assert (g["max_iters"], g["learning_rate"], g["compile"], g["block_size"], g["out_dir"]) == (2000, 3e-4, True, 64, "out/run 1")
    assert "os" not in config and config["max_iters"] == 2000


@pytest.mark.parametrize("raw, value", [("false", False), ("no", False), ("off", False), ("0", False),
                                        ("True", True), ("yes", True), ("on", True), ("1", True)])
def test_booleans_are_parsed_strictly_also_when_the_default_is_none(raw, value):
    g = settings()
    configure(g, [f"--compile={raw}", f"--muon={raw}"])
    assert g["compile"] is value and g["muon"] is value


def test_a_none_default_can_be_set_back_to_none():
    g = settings()
    configure(g, ["--block_size=64", "--block_size=none"])
    assert g["block_size"] is None


def test_space_separated_values_and_bare_flags():
    g = settings()
    configure(g, ["--start", "床前明月光，", "--compile", "--max_iters", "5"])
    assert (g["start"], g["compile"], g["max_iters"]) == ("床前明月光，", True, 5)


@pytest.mark.parametrize("order", ["file first", "flag first"])
def test_a_config_file_sets_values_and_the_command_line_wins_wherever_it_stands(tmp_path, order):
    path = tmp_path / "cfg.py"
    path.write_text("max_iters = 7\nlearning_rate = 1  # an int where a float is expected is fine\n")
    g = settings()
    configure(g, [str(path), "--max_iters=9"] if order == "file first" else ["--max_iters=9", str(path)])
    assert g["max_iters"] == 9 and g["learning_rate"] == 1.0 and isinstance(g["learning_rate"], float)


@pytest.mark.parametrize("argv, message", [
    (["--max_iter=5"], "unknown setting --max_iter (did you mean --max_iters?)"),
    (["--max_iters=lots"], "--max_iters expects an integer"),
    (["--block_size=abc"], "--block_size expects an integer"),
    (["--learning_rate=fast"], "--learning_rate expects a number"),
    (["--compile=maybe"], "--compile expects true or false"),
    (["--max_iters"], "--max_iters needs a value"),
    (["missing_config.py"], "cannot read config file"),
])
def test_mistakes_are_one_line_errors(argv, message):
    with pytest.raises(SystemExit) as e:
        configure(settings(), argv)
    assert message in str(e.value)


@pytest.mark.parametrize("text, message", [
    ("max_iters = 'many'\n", "bad.py: max_iters should be an integer"),
    ('{"max_iters": 1}\n', "assigns no setting (it reads as YAML/JSON)"),
    ("max_iters: 1\n", "assigns no setting (it reads as YAML/JSON)"),
    ("# nothing here\n", "assigns no setting"),
    ("max_iter = 1\n", "unknown setting max_iter (did you mean max_iters?)"),
])
def test_a_config_file_that_sets_nothing_or_something_wrong_is_refused(tmp_path, text, message):
    path = tmp_path / "bad.py"
    path.write_text(text)
    with pytest.raises(SystemExit) as e:
        configure(settings(), [str(path)])
    assert message in str(e.value)


def test_ranges_are_checked_in_one_line():
    config = {"eval_interval": 0, "warmup_iters": -1, "learning_rate": 0.0, "block_size": None}
    for kw, message in ((dict(at_least_1=["eval_interval"]), "--eval_interval must be at least 1, got 0"),
                        (dict(at_least_0=["warmup_iters"]), "--warmup_iters must be at least 0, got -1"),
                        (dict(positive=["learning_rate"]), "--learning_rate must be greater than 0, got 0.0")):
        with pytest.raises(SystemExit, match=message):
            check_ranges(config, **kw)
    check_ranges(config, at_least_1=["block_size"])  # None means "the default": nothing to check


def test_help_lists_the_settings_with_their_descriptions_and_no_internal_constants():
    p = run("prepare_data.py", "--help")
    assert "--vocab_size=8192" in p.out and "size of the tokenizer to train" in p.out
    assert "BATCH_CHARS" not in p.out and "--input=demo" in p.out
    p = run("pretrain.py", "--help")
    assert "--dim=None" in p.out and "override the preset" in p.out and "--tie_embeddings=True" in p.out
    assert "FIXED_ON_RESUME" not in p.out


@pytest.mark.parametrize("script", ["prepare_data.py", "pretrain.py", "sft.py", "sample.py", "export.py",
                                    "evaluate.py", "bench.py", "gpu_report.py"])
def test_every_script_declares_a_type_for_every_setting(script):
    p = run(script, "--help")  # a None default without an annotation is a TypeError here
    assert p.out.count("\n  --") >= 5
