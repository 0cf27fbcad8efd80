"""
The one configurator every script shares.

Each script keeps its settings as plain globals at the top and then calls

    config = configure(globals())

which applies, in order, any config files named on the command line (`config/58m_4gpu.py`, plain
Python assignments) and any `--key=value` or `--key value` overrides. Only globals that already exist
with a simple type (int, float, bool, str, None) can be set; anything else is a one-line error, not
a traceback. Returns the final settings as a dict (saved into checkpoints and logs).
"""
import ast
import difflib
import sys

SIMPLE_TYPES = (int, float, bool, str, type(None))


def _fail(msg):
    raise SystemExit(f"error: {msg}")


def _convert(key, raw, default):
    """Turn the command-line string `raw` into the type of `default`."""
    if isinstance(default, bool):  # before int: bool is a subclass of int
        if raw.lower() in ("true", "1", "yes", "on"):
            return True
        if raw.lower() in ("false", "0", "no", "off"):
            return False
        _fail(f"--{key} expects true or false, got {raw!r}")
    if isinstance(default, int):
        try:
            return int(raw.replace("_", ""))
        except ValueError:
            try:  # allow 1e4 for integer settings when it is a whole number
                value = float(raw)
            except ValueError:
                value = None
            if value is not None and value.is_integer():
                return int(value)
            _fail(f"--{key} expects an integer, got {raw!r}")
    if isinstance(default, float):
        try:
            return float(raw)
        except ValueError:
            _fail(f"--{key} expects a number, got {raw!r}")
    if isinstance(default, str):
        return raw  # strings are taken verbatim: --start=床前明月光 needs no quoting games
    # default None: a Python literal if it parses as one, else the string itself
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def _check_key(key, settable):
    if key not in settable:
        close = difflib.get_close_matches(key, list(settable), n=1)
        hint = f" (did you mean --{close[0]}?)" if close else ""
        _fail(f"unknown setting --{key}{hint}; run with --help to list them")


def configure(g, argv=None):
    argv = sys.argv[1:] if argv is None else argv
    settable = {k: v for k, v in g.items() if not k.startswith("_") and isinstance(v, SIMPLE_TYPES)}
    if "--help" in argv or "-h" in argv:
        doc = (g.get("__doc__") or "").strip()
        lines = [doc + "\n\nsettings (override with --key=value):" if doc else "settings (override with --key=value):"]
        lines += [f"  --{k}={v!r}" for k, v in settable.items()]
        try:
            print("\n".join(lines))
            sys.stdout.flush()
        except BrokenPipeError:  # `--help | head` closed the pipe early: nothing went wrong
            sys.stdout = None
        raise SystemExit(0)
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            # a config file: plain Python assignments to existing settings
            try:
                source = open(arg, encoding="utf-8").read()
            except OSError as e:
                _fail(f"cannot read config file {arg!r}: {e.strerror}")
            file_settings = {}
            try:
                exec(compile(source, arg, "exec"), {}, file_settings)
            except Exception as e:  # a broken config file is a user error: say where
                _fail(f"config file {arg!r} failed: {type(e).__name__}: {e}")
            for key, value in file_settings.items():
                if key.startswith("_") or not isinstance(value, SIMPLE_TYPES):
                    continue  # helper names or imports inside the file
                _check_key(key, settable)
                default = settable[key]
                if default is not None and value is not None and not isinstance(value, type(default)) \
                        and not (isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool)):
                    _fail(f"{arg}: {key} should be {type(default).__name__}, got {value!r}")
                g[key] = settable[key] = float(value) if isinstance(default, float) else value
            i += 1
            continue
        body = arg[2:]
        if "=" in body:
            key, raw = body.split("=", 1)
            i += 1
        else:  # --key value (how users type --start "床前明月光"), or a bare --flag for a bool
            key = body.replace("-", "_")
            if isinstance(settable.get(key), bool) and (i + 1 >= len(argv) or argv[i + 1].startswith("--")):
                g[key] = settable[key] = True
                i += 1
                continue
            if i + 1 >= len(argv):
                _fail(f"--{key} needs a value: --{key}=VALUE")
            raw = argv[i + 1]
            i += 2
        key = key.replace("-", "_")
        _check_key(key, settable)
        g[key] = settable[key] = _convert(key, raw, settable[key])
    return dict(settable)
