"""
Draw the loss curves of one or more runs from their out_dir/log.jsonl into a PNG.

    python plot.py                              # out/log.jsonl -> out/loss.png
    python plot.py --out_dir=out,out-sft        # several runs, one picture
    python plot.py --out_dir=out --output=loss.png

Left: training loss (lines) and val/test loss (dots) against iterations. Right: the val loss in bits
per character against tokens seen, which compares runs with different tokenizers and batch sizes
(pretraining logs have it; an SFT log has the test answer loss against answer tokens trained on; a DPO
log has its held-out DPO loss against iterations only; a GRPO log its mean reward and held-out pass@1).
Needs matplotlib (pip install matplotlib), which nothing else in the kit needs.
"""
import json
import os

from configurator import configure

# -----------------------------------------------------------------------------
out_dir = "out"              # the run to plot, or comma-separated runs (each a directory with log.jsonl)
output = ""                  # the PNG to write; "": loss.png in the first run's directory
# -----------------------------------------------------------------------------


def read_log(path):
    """The records of one log.jsonl; a line cut short by a crash is skipped."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return records


def plot_runs(runs, path):
    """runs: {label: records}. Writes the PNG to path."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, (by_iter, by_tokens) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, records in runs.items():
        if any("reward" in r for r in records):  # GRPO: the mean reward, and held-out pass@1 (1 - its "val loss")
            train = [(r["iter"], r["reward"]) for r in records if "reward" in r]
            val = [dict(r, val_loss=1 - r["val_loss"]) for r in records if "val_loss" in r]
            names = ("mean reward", "held-out pass@1")
        else:
            train = [(r["iter"], r["loss"]) for r in records if "loss" in r]
            val, names = [r for r in records if "val_loss" in r], ("train", "val")
        line, = by_iter.plot(*zip(*train), label=f"{label} {names[0]}", linewidth=1) if train else (None,)
        color = line.get_color() if line else None
        if val:
            by_iter.plot([r["iter"] for r in val], [r["val_loss"] for r in val], "o--", color=color,
                         label=f"{label} {names[1]}", markersize=4)
            with_tokens = [r for r in val if "tokens" in r]
            if with_tokens:
                key = "val_bpc" if all("val_bpc" in r for r in with_tokens) else "val_loss"
                by_tokens.plot([r["tokens"] for r in with_tokens], [r[key] for r in with_tokens], "o-", color=color,
                               label=f"{label} ({'bits per character' if key == 'val_bpc' else 'val loss'})",
                               markersize=4)
    by_iter.set(xlabel="iteration", ylabel="loss (nats per token); GRPO: reward, pass@1", title="loss")
    by_tokens.set(xlabel="tokens seen (SFT: answer tokens)", ylabel="val bits per character / val loss",
                  title="val against tokens")
    for ax in (by_iter, by_tokens):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    configure(globals())
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("error: plot.py needs matplotlib: pip install matplotlib")
    dirs = [d.strip() for d in out_dir.split(",") if d.strip()]
    runs = {}
    for d in dirs:
        path = os.path.join(d, "log.jsonl")
        if not os.path.exists(path):
            raise SystemExit(f"error: no log at {path}; train with pretrain.py or sft.py --out_dir={d} first")
        records = read_log(path)
        if not any("loss" in r or "val_loss" in r for r in records):
            raise SystemExit(f"error: {path} has no loss records yet")
        runs[d] = records
    path = output or os.path.join(dirs[0], "loss.png")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    plot_runs(runs, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
