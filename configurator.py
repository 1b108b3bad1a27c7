"""
Settings from the command line, as nanoGPT's configurator without exec: a dataclass holds a script's
defaults, configure() reads --key=value over them by each field's type; a mistake is one line.

    cfg = configure(Settings, __doc__)        # python sample.py --num_samples=8 --kv_cache=False
"""
import dataclasses
import difflib
import inspect
import math
import os
import re
import sys
import types
import typing


def fail(message):
    """End the script with one line that says what is wrong, and no traceback."""
    raise SystemExit(f"{os.path.basename(sys.argv[0])}: {message}")


def check(cfg, key, ok, rule):  # a script's own rule for a setting
    if not ok:
        fail(f"--{key}={show(getattr(cfg, key))}: {rule}")


def configure(cls, doc="", argv=None, defaults=None):
    """cls with its defaults, then `defaults` (a preset), then the --key=value arguments (a bare
    --key: a bool's True). --help prints doc, each setting, its default and its comment."""
    argv, defaults = sys.argv[1:] if argv is None else argv, defaults or {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if "-h" in argv or "--help" in argv:
        notes = dict(re.findall(r"^ +(\w+): .*?  # (.*)$", inspect.getsource(cls), re.M))
        print(doc.strip() + "\n\nsettings (--key=value):")
        for name, f in fields.items():
            default = show(defaults.get(name, f.default))
            print(f"  --{name}={default}".ljust(36) + f" {notes.get(name, '')}")
        raise SystemExit(0)
    values = dict(defaults)
    for arg in argv:
        key, eq, text = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or key not in fields:
            close = difflib.get_close_matches(key, fields, 1)
            fail(f"unknown setting {arg!r}" + (f"; did you mean --{close[0]}?" if close else ""))
        if not eq and fields[key].type is not bool:
            fail(f"--{key} needs a value: --{key}=...")
        values[key] = parse(key, text if eq else "True", fields[key].type)
    return cls(**values)


def parse(key, text, kind):
    """The text of --key=text as a value of kind: bool, int, float, str, X | None or tuple[X,
    ...]."""
    if isinstance(kind, types.UnionType):  # X | None
        return None if text == "None" else parse(key, text, typing.get_args(kind)[0])
    if typing.get_origin(kind) is tuple:  # a,b,c
        return tuple(parse(key, t, typing.get_args(kind)[0]) for t in text.split(",") if t)
    if kind is bool and text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        value = kind(text) if kind is not bool else None
    except ValueError:
        value = None
    if value is None or kind is float and not math.isfinite(value):
        fail(f"--{key}={text}: must be {'a finite number' if kind is float else kind.__name__}")
    return value


def show(value):  # a value as it is written on the command line
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
