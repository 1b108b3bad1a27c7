"""Fixtures the lab's tests share: the scripts run in this process, a tiny dataset, tiny trained
models."""
import contextlib
import io
import json
import os
import runpy
import subprocess
import sys

import pytest

from test_esolm import watchdog  # noqa: F401  (autouse: a hung test fails)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
        "--eval_iters=1", "--device=cpu", "--warmup_iters=2", "--learning_rate=1e-2"]


def run(script, *args, cwd=ROOT, ok=True):
    """Run `python script args` in this process (a module name: python -m): (exit status, stdout,
    stderr). A script that ends with SystemExit(message) prints the message on stderr, as Python
    does."""
    out, err, argv, status = io.StringIO(), io.StringIO(), sys.argv, 0
    with contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        sys.argv = [os.path.join(ROOT, script) if ".py" in script else script, *map(str, args)]
        try:
            if script.endswith(".py"):
                runpy.run_path(sys.argv[0], run_name="__main__")
            else:
                runpy.run_module(script, run_name="__main__", alter_sys=True)
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else int(e.code is not None)
            if not isinstance(e.code, int | None):
                print(e.code, file=sys.stderr)
        finally:
            sys.argv = argv
    if ok:
        assert status == 0, out.getvalue()[-2000:] + err.getvalue()[-3000:]
    return status, out.getvalue(), err.getvalue()


def subprocess_run(*args, cwd=ROOT):  # for what needs a process of its own: torchrun, tracebacks
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def records(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small byte-level dataset in <tmp>/data/tiny."""
    root = tmp_path_factory.mktemp("tiny")
    for i in range(12):
        (root / "corpus").mkdir(exist_ok=True)
        text = f"**SPEAKER {i % 3}**\n" + "To be, or not to be. " * (20 + i)
        (root / "corpus" / f"doc{i:02d}.txt").write_text(text)
    run("prepare_data.py", f"--input={root / 'corpus'}", "--name=tiny",
        f"--data_dir={root / 'data'}", "--val_fraction=0.3")
    return root


def train(tiny_data, name, *args):
    out = tiny_data / name
    if not (out / "ckpt.pt").exists():
        run("train.py", "--dataset=tiny", f"--out_dir={out}", *TINY, *args, cwd=tiny_data)
    return out


@pytest.fixture(scope="session")
def trained(tiny_data):  # a 6-iteration run at alpha0 = 0.25
    return train(tiny_data, "out_e2e", "--max_iters=6", "--eval_interval=3", "--log_interval=2")


@pytest.fixture(scope="session")
def mdlm(tiny_data):
    return train(tiny_data, "out_mdlm", "--variant=MDLM", "--alpha0=1", "--max_iters=4",
                 "--eval_interval=4")


@pytest.fixture(scope="session")
def ar(tiny_data):
    return train(tiny_data, "out_ar", "--alpha0=0", "--max_iters=4", "--eval_interval=4")
