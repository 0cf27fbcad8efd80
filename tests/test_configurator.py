"""The one configurator: --key=value, --key value, bare boolean flags, config files, and clear errors."""
import pytest

from configurator import configure


def settings():
    return {"out_dir": "out", "max_iters": 100, "learning_rate": 1e-3, "compile": False, "block_size": None,
            "start": "", "os": pytest}  # a module is not a setting


def test_overrides_take_the_type_of_the_default():
    g = settings()
    config = configure(g, ["--max_iters=2_000", "--learning_rate=3e-4", "--compile=true", "--block_size=64",
                           "--out_dir=out/run 1"])
    assert (g["max_iters"], g["learning_rate"], g["compile"], g["block_size"], g["out_dir"]) == (2000, 3e-4, True, 64, "out/run 1")
    assert "os" not in config and config["max_iters"] == 2000


def test_space_separated_values_and_bare_flags():
    g = settings()
    configure(g, ["--start", "床前明月光，", "--compile", "--max_iters", "5"])
    assert (g["start"], g["compile"], g["max_iters"]) == ("床前明月光，", True, 5)


def test_a_config_file_sets_values_and_the_command_line_wins(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text("max_iters = 7\nlearning_rate = 1  # an int where a float is expected is fine\n")
    g = settings()
    configure(g, [str(path), "--max_iters=9"])
    assert g["max_iters"] == 9 and g["learning_rate"] == 1.0 and isinstance(g["learning_rate"], float)


@pytest.mark.parametrize("argv, message", [
    (["--max_iter=5"], "unknown setting --max_iter (did you mean --max_iters?)"),
    (["--max_iters=lots"], "--max_iters expects an integer"),
    (["--learning_rate=fast"], "--learning_rate expects a number"),
    (["--compile=maybe"], "--compile expects true or false"),
    (["--max_iters"], "--max_iters needs a value"),
    (["missing_config.py"], "cannot read config file"),
])
def test_mistakes_are_one_line_errors(argv, message):
    with pytest.raises(SystemExit) as e:
        configure(settings(), argv)
    assert message in str(e.value)


def test_a_config_file_with_a_wrong_type_names_the_file(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("max_iters = 'many'\n")
    with pytest.raises(SystemExit, match="bad.py: max_iters should be int"):
        configure(settings(), [str(path)])
