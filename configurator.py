"""
The one configurator every script shares.

Each script keeps its settings as plain globals at the top, between two `# ----` lines, each with a
comment saying what it is, and then calls

    config = configure(globals())

which applies any config files named on the command line (`config/pretrain_58m_4gpu.py`: plain Python
assignments to the same names), then any `--key=value` or `--key value` overrides: flags win over
files whatever their order. A value takes the type of its default; a setting whose default is None
declares its type as an annotation (`dim: int = None`) and also accepts "none". Anything that does not
parse, and any name that is not a setting, is a one-line error with a "did you mean". `--help` lists
the settings with their comments. Returns the final settings as a dict (saved into checkpoints and logs).
"""
import difflib
import re
import sys

SIMPLE_TYPES = (int, float, bool, str, type(None))
TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _fail(msg):
    raise SystemExit(f"error: {msg}")


def _convert(key, raw, kind):
    """Turn the command-line string `raw` into a value of type `kind`."""
    if kind is bool:
        if raw.lower() in ("true", "1", "yes", "on"):
            return True
        if raw.lower() in ("false", "0", "no", "off"):
            return False
        _fail(f"--{key} expects true or false, got {raw!r}")
    if kind is int:
        try:
            return int(raw.replace("_", ""))
        except ValueError:
            try:  # allow 1e4 for integer settings when it is a whole number
                value = float(raw)
            except ValueError:
                value = None
            if value is not None and value.is_integer():
                return int(value)
            hint = f" (--auto_{key}=True picks it)" if raw == "auto" and key == "batch_size" else ""
            _fail(f"--{key} expects an integer, got {raw!r}{hint}")
    if kind is float:
        try:
            return float(raw)
        except ValueError:
            _fail(f"--{key} expects a number, got {raw!r}")
    return raw  # strings are taken verbatim: --start=床前明月光 needs no quoting games


def _settings_block(g):
    """{name: (type, comment)} of the settings a script declares between its two `# ----` lines, read from
    its source; None when g is not a script's globals (a test's dict) or has no such block."""
    path = g.get("__file__")
    if not path:
        return None
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError:
        return None
    marks = [i for i, line in enumerate(lines) if line.startswith("# ----")]
    if len(marks) < 2:
        return None
    block, annotations = {}, g.get("__annotations__", {})
    for line in lines[marks[0] + 1:marks[1]]:
        m = re.match(r"^([a-z_][a-z0-9_]*)\s*(?::\s*\w+\s*)?=[^#]*(?:#\s*(.*))?$", line)
        if m and m.group(1) in g:
            name = m.group(1)
            block[name] = (annotations.get(name, type(g[name])), m.group(2) or "")
    return block


def _declared(g):
    """{name: (type, comment)} of every setting: the script's block, or else its lower-case simple globals."""
    block = _settings_block(g)
    if block is not None:
        return block
    annotations = g.get("__annotations__", {})
    return {k: (annotations.get(k, type(v)), "") for k, v in g.items()
            if not k.startswith("_") and k == k.lower() and isinstance(v, SIMPLE_TYPES)}


def _check_declarations(declared):
    for name, (kind, _) in declared.items():
        if kind not in TYPE_NAMES:  # our bug, not the user's: a None default needs `name: int = None`
            raise TypeError(f"setting {name!r} has no declared type: annotate it, e.g. {name}: int = None")


def _check_key(key, declared, where="--"):
    if key not in declared:
        close = difflib.get_close_matches(key, list(declared), n=1)
        hint = f" (did you mean {where}{close[0]}?)" if close else ""
        _fail(f"unknown setting {where}{key}{hint}; run with --help to list them")


def _help(g, declared):
    doc = (g.get("__doc__") or "").strip()
    lines = ([doc, ""] if doc else []) + ["settings (override with --key=value; config files are Python assignments):"]
    for name, (kind, comment) in declared.items():
        value = g[name]
        shown = f"--{name}={value!r}" if not isinstance(value, str) else f"--{name}={value}"
        lines.append(f"  {shown:<34} {comment}" if comment else f"  {shown}")
    try:
        print("\n".join(lines))
        sys.stdout.flush()
    except BrokenPipeError:  # `--help | head` closed the pipe early: nothing went wrong
        sys.stdout = None
    raise SystemExit(0)


def _apply_config_file(path, g, declared):
    try:
        source = open(path, encoding="utf-8").read()
    except OSError as e:
        _fail(f"cannot read config file {path!r}: {e.strerror}")
    file_settings = {}
    try:
        exec(compile(source, path, "exec"), {}, file_settings)
    except Exception as e:  # a broken config file is a user error: say where
        _fail(f"config file {path!r} failed: {type(e).__name__}: {e}")
    assigned = {k: v for k, v in file_settings.items() if not k.startswith("_") and isinstance(v, SIMPLE_TYPES)}
    if not assigned:
        shape = "YAML/JSON" if file_settings.get("__annotations__") or source.lstrip().startswith("{") else "nothing"
        _fail(f"config file {path!r} assigns no setting (it reads as {shape}); write Python assignments, "
              f"one per line, like: max_iters = 1000")
    for key, value in assigned.items():
        _check_key(key, declared, where="")
        kind = declared[key][0]
        if value is not None and not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            if not (kind is float and isinstance(value, int) and not isinstance(value, bool)):
                _fail(f"{path}: {key} should be {TYPE_NAMES.get(kind, kind.__name__)}, got {value!r}")
        g[key] = float(value) if kind is float and value is not None else value
    return set(assigned)


def configure(g, argv=None):
    argv = sys.argv[1:] if argv is None else argv
    declared = _declared(g)
    _check_declarations(declared)
    if "--help" in argv or "-h" in argv:
        _help(g, declared)
    files, flags, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            files.append(arg)
            i += 1
            continue
        body = arg[2:]
        if "=" in body:
            key, raw = body.split("=", 1)
            i += 1
        else:  # --key value (how users type --start "床前明月光"), or a bare --flag for a bool
            key = body.replace("-", "_")
            if declared.get(key, (None,))[0] is bool and (i + 1 >= len(argv) or argv[i + 1].startswith("--")):
                flags.append((key, "true"))
                i += 1
                continue
            if i + 1 >= len(argv):
                _fail(f"--{key} needs a value: --{key}=VALUE")
            raw = argv[i + 1]
            i += 2
        flags.append((key.replace("-", "_"), raw))
    given = set()  # the settings a file or flag set: resuming warns only about those it cannot honour
    for path in files:  # files first, then flags: a flag wins wherever it stands
        given |= _apply_config_file(path, g, declared)
    for key, raw in flags:
        _check_key(key, declared)
        if raw.lower() == "none" and key in g.get("__annotations__", {}):
            g[key] = None  # back to the default's meaning ("the preset's", "auto")
        else:
            g[key] = _convert(key, raw, declared[key][0])
        given.add(key)
    g["_given"] = given
    return {k: g[k] for k in declared}


def check_ranges(config, at_least_1=(), at_least_0=(), positive=()):
    """One-line errors for settings outside their range (a zero interval would divide by zero mid-run)."""
    for names, ok, what in ((at_least_1, lambda v: v >= 1, "at least 1"), (at_least_0, lambda v: v >= 0, "at least 0"),
                            (positive, lambda v: v > 0, "greater than 0")):
        for name in names:
            if config[name] is not None and not ok(config[name]):
                _fail(f"--{name} must be {what}, got {config[name]}")
