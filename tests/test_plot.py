"""plot.py: a PNG drawn from a real training log, and a one-line message where matplotlib is missing."""
import struct

import pytest

from conftest import run


def test_the_loss_plot_is_a_png_drawn_from_a_real_log(tiny_ckpt, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install matplotlib)")
    out = tmp_path / "plots" / "loss.png"  # a directory that does not exist yet
    p = run("plot.py", f"--out_dir={tiny_ckpt}", f"--output={out}")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {out}" in p.out
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1200, 450) and len(data) > 20_000  # a drawn figure, not an empty canvas


def test_without_matplotlib_it_says_how_to_get_it(tiny_ckpt, tmp_path):
    (tmp_path / "matplotlib.py").write_text("raise ImportError('not here')\n")
    p = run("plot.py", f"--out_dir={tiny_ckpt}", check=False, extra_env={"PYTHONPATH": str(tmp_path)})
    assert p.returncode != 0 and "pip install matplotlib" in p.out and "Traceback" not in p.out


def test_a_directory_without_a_log_is_a_one_line_error(tmp_path):
    p = run("plot.py", f"--out_dir={tmp_path}", check=False)
    assert p.returncode != 0 and "no log at" in p.out and "Traceback" not in p.out


def test_a_grpo_run_is_drawn_as_its_reward_and_held_out_pass_at_1(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install matplotlib)")
    import plot
    records = [{"iter": 0, "val_loss": 0.6}, {"iter": 5, "loss": 0.0, "reward": 0.3},
               {"iter": 10, "loss": 0.01, "reward": 0.5}, {"iter": 10, "val_loss": 0.4}]
    drawn = {}

    def recording_plot(self, xs, ys, *args, label=None, **kwargs):
        drawn[label] = (list(xs), list(ys))
        return original(self, xs, ys, *args, label=label, **kwargs)

    from matplotlib.axes import Axes
    original = Axes.plot
    monkeypatch.setattr(Axes, "plot", recording_plot)
    plot.plot_runs({"grpo": records}, tmp_path / "loss.png")
    assert drawn["grpo mean reward"] == ([5, 10], [0.3, 0.5])
    assert drawn["grpo held-out pass@1"] == ([0, 10], [pytest.approx(0.4), pytest.approx(0.6)])
