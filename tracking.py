"""
Experiment tracking: every record a training stage logs to out_dir/log.jsonl (loss, lr, tokens/s, held-out
metrics, GRPO's reward) also goes to Weights & Biases and/or TensorBoard with --log_to=wandb,tensorboard,
with the run's settings. Optional: the packages are named in one line when missing, nothing needs the
network (wandb runs offline without an API key: `wandb sync` later, docs/tracking.md), a resumed run goes
on in the same wandb run and TensorBoard folder, and a tracker that fails mid-run warns once and is dropped:
training never stops for it. Only rank 0 logs (the Logger lives there).
"""
import json
import os
import sys

TRACKERS = ("wandb", "tensorboard")


def open_trackers(log_to, out_dir, run_name, project, settings, resume):
    """The trackers --log_to names, started (or continued, when resuming) for out_dir: [(name, log, close)]."""
    names = [n.strip() for n in log_to.split(",") if n.strip()]
    for name in names:
        if name not in TRACKERS:
            raise SystemExit(f"error: --log_to={log_to}: {name!r} is not one of {', '.join(TRACKERS)}")
    ids_path = os.path.join(out_dir, "tracking.json")  # the wandb run id, so that a resumed run continues it
    ids = {}
    if resume and os.path.exists(ids_path):
        with open(ids_path) as f:
            ids = json.load(f)
    trackers = [start_wandb(out_dir, run_name, project, settings, ids) if name == "wandb" else
                start_tensorboard(out_dir, settings, resume) for name in names]
    if ids:
        with open(ids_path, "w") as f:
            json.dump(ids, f)
    return trackers


def start_wandb(out_dir, run_name, project, settings, ids):
    try:
        import wandb
    except ImportError:
        raise SystemExit("error: --log_to=wandb needs the wandb package: pip install wandb")
    # no API key and no WANDB_MODE: offline, never a prompt or a network wait (`wandb sync` uploads later)
    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") or _has_wandb_login()
                                            else "offline")
    run = wandb.init(project=project, name=run_name or os.path.basename(os.path.abspath(out_dir)), dir=out_dir,
                     config=settings, id=ids.get("wandb_id"), resume="allow", mode=mode)
    ids["wandb_id"] = run.id
    if mode == "offline":
        print(f"wandb: offline in {run.dir}; upload it with `wandb sync {os.path.dirname(run.dir)}`")
    return "wandb", lambda step, record: run.log(record, step=step), run.finish


def _has_wandb_login():
    """Whether `wandb login` stored a key (~/.netrc), without asking the network."""
    import netrc
    try:
        return any(host.startswith("api.wandb") for host in netrc.netrc().hosts)
    except (OSError, netrc.NetrcParseError):
        return False


def start_tensorboard(out_dir, settings, resume):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise SystemExit("error: --log_to=tensorboard needs the tensorboard package: pip install tensorboard")
    writer = SummaryWriter(os.path.join(out_dir, "tensorboard"))  # a resumed run adds an event file beside
    if not resume:
        writer.add_text("settings", "\n".join(f"    {k} = {v!r}" for k, v in settings.items()))

    def log(step, record):
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                writer.add_scalar(key, value, step)
        writer.flush()
    return "tensorboard", log, writer.close


def log_to_trackers(trackers, record):
    """record (a log.jsonl line) to each tracker, at its iteration; a tracker that raises is warned of and dropped."""
    step = record.get("iter", 0)
    values = {k: v for k, v in record.items() if k != "iter" and v is not None}
    for tracker in list(trackers):
        name, log, _ = tracker
        try:
            log(step, values)
        except Exception as e:  # a full disk, the package's own bug: the training goes on without it
            print(f"warning: --log_to={name} failed ({type(e).__name__}: {e}); it logs no more in this run, "
                  f"log.jsonl still does", file=sys.stderr)
            trackers.remove(tracker)


def close_trackers(trackers):
    for name, _, close in trackers:
        try:
            close()
        except Exception as e:
            print(f"warning: closing --log_to={name} failed: {type(e).__name__}: {e}", file=sys.stderr)
