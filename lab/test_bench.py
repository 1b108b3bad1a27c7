"""lab/bench.py at tiny sizes, in-process: each mode's results, the bad settings, the timer, BD3."""
import contextlib
import json
import time
from types import SimpleNamespace

import pytest
import torch

from esolm import EsoLM, EsoLMConfig
from lab import bench, common, metrics

TINY = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=16", "--vocab_size=32",
        "--repeats=1", "--sample_batch=2", "--train_batch=2"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():  # tiny models: on a busy machine a second thread only waits for a core
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(tmp_path, *args):
    out = tmp_path / "bench.json"
    bench.main([*TINY, *args, f"--json={out}"])
    return json.loads(out.read_text())


def positive(rows, key="seconds"):
    return all(row[key] > 0 for row in rows.values())


def test_default_mode(tmp_path):
    res = run(tmp_path, "--threshold=0.01")
    assert {"machine", "torch", "dtype", "settings"} <= res.keys()
    rows = res["sampling"]["rows"]
    assert {f"B {c}cached T={T}" for c in ("", "un") for T in (16, 4, 1)} <= rows.keys()
    assert {f"A {c}cached a0={a}" for c in ("", "un") for a in (1.0, 0.25)} <= rows.keys()
    assert {"AR", "B adaptive tau=None", "B adaptive tau=0.01"} <= rows.keys()
    # a random model scores every mask about 1/32 > tau: one call decodes them all
    assert rows["B adaptive tau=0.01"]["nfe"] == 1 < rows["B adaptive tau=None"]["nfe"]
    assert positive(rows) and rows["AR"]["nfe"] == 16 and rows["B cached T=1"]["nfe"] == 1
    assert "B uncached T=16 / cached" in res["sampling"]["ratios"]
    steps = res["training"]["rows"]
    assert steps.keys() == {"a0=1.0", "a0=0.25", "a0=0.0"} and positive(steps, "ms")
    saved = {k: r["saved_MiB"] for k, r in steps.items()}
    assert min(saved.values()) > 0 and saved["a0=0.0"] > saved["a0=1.0"]  # the 2L layout


def test_lengths_mode(tmp_path):
    res = run(tmp_path, "--lengths=16,32", "--uncached_calls=3")
    assert [r["L"] for r in res["lengths"]] == [16, 32]
    for r in res["lengths"]:
        assert r["rows"].keys() == {"B", "AR", "A a0=0.25", "MDLM"} and positive(r["rows"])
        mdlm = r["rows"]["MDLM"]  # estimated from a few calls, with (B)'s NFE
        assert mdlm["calls_timed"] < mdlm["nfe"] == r["rows"]["B"]["nfe"]
        assert r["ratios"].keys() == {"MDLM / B", "B / AR"}


def test_throughput_mode(tmp_path):
    res = run(tmp_path, "--throughput", "--lengths=16", "--uncached_calls=3", "--threshold=0.01")
    (r,) = res["throughput"]
    rows = r["rows"]
    assert rows.keys() == {"AR", "B", "MDLM", "A a0=0.25", "adaptive", "adaptive tau=0.01",
                           "BD3 b=4", "BD3 b=8", "BD3 b=16"} and positive(rows)
    assert rows["AR"]["nfe"] == rows["BD3 b=4"]["nfe"] == 16 and rows["MDLM"]["calls_timed"] == 3
    # a random model scores every mask about 1/32 > tau: one call decodes them all
    assert rows["adaptive tau=0.01"]["nfe"] < rows["adaptive"]["nfe"] == rows["B"]["nfe"]


BAD = ["--repeats=0", "--n_head=5", "--sample_batch=0", "--block_size=0", "--uncached_calls=-1",
       "--lengths=1", "--peak_flops=0", "--vocab_size=0", "--train_batch=1", "--threshold=2",
       pytest.param("--device=cuda", marks=pytest.mark.skipif(torch.cuda.is_available(),
                                                              reason="a GPU is here"))]


@pytest.mark.parametrize("bad", BAD)
def test_bad_setting_is_one_line(tmp_path, bad):
    out = tmp_path / "bench.json"
    with pytest.raises(SystemExit) as e:
        bench.main(["--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=16", bad,
                    f"--json={out}"])
    message = str(e.value.code)
    assert "\n" not in message and f"{bad.split('=')[0]}" in message and ": --" in message
    assert not out.exists()


def test_a_json_it_could_not_write_is_one_line_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "timings", lambda *a, **kw: pytest.fail("the benchmark ran"))
    with pytest.raises(SystemExit, match=r"--json=.*/missing/b.json: is not in a folder"):
        bench.main([*TINY, f"--json={tmp_path / 'missing' / 'b.json'}"])


def test_bd3_cost_model_makes_L_calls():
    torch.manual_seed(0)
    model = EsoLM(EsoLMConfig(vocab_size=8, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()
    calls = []

    def net(*args):  # counts the network calls
        calls.append(args[0].shape)
        return model(*args)
    with torch.no_grad():
        assert bench.bd3_calls(model, 2, 4, net)() == 16
    assert len(calls) == 16 and set(calls) == {(2, 4)}


def test_timer_leaves_out_the_warmup():
    first = []

    def slow_once():  # a first run (compiling, allocating) far slower than the others
        time.sleep(0.3 if not first else 0.0)
        first.append(1)
        return len(first)
    secs, outs = bench.timings({"x": slow_once}, SimpleNamespace(repeats=2, device="cpu"))
    assert secs["x"] < 0.1 and outs["x"] == 3


def test_each_timed_call_sits_between_two_device_syncs(monkeypatch):
    """A GPU call returns before its work ends: the bench's and timed_generate's clocks start after
    a sync and stop after another; sync waits on any CUDA device."""
    events = []
    clock = SimpleNamespace(perf_counter=lambda: events.append("clock") or 0.0)
    for module in (bench, metrics):
        monkeypatch.setattr(module, "sync", lambda device: events.append("sync"))
        monkeypatch.setattr(module, "time", clock)
    bench.timings({"x": lambda: events.append("call")}, SimpleNamespace(repeats=2, device="cuda"))
    assert events == ["call"] + ["sync", "clock", "call", "sync", "clock"] * 2
    model, events[:] = EsoLM(EsoLMConfig(n_layer=1, n_head=2, n_embd=32, block_size=8, vocab_size=8)), []
    monkeypatch.setattr(model, "generate", lambda *a, **kw: events.append("call") or SimpleNamespace(
        x=torch.zeros(a[0], 8), nfe=torch.ones(a[0])))
    metrics.timed_generate(model, 3, 2, 0, contextlib.nullcontext())
    assert events == ["sync", "clock", "call", "sync", "clock"] * 2
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: events.append("cuda"))
    for device in ("cuda", "cuda:1", torch.device("cuda", 0), "cpu", torch.device("cpu")):
        common.sync(device)
    assert events.count("cuda") == 3


def test_mdlm_estimate_is_its_calls_times_its_nfe(tmp_path, monkeypatch):
    timings = bench.timings  # every case takes 1 s: MDLM's row is then NFE / calls timed
    monkeypatch.setattr(bench, "timings", lambda cases, cfg, stat=None: (
        dict.fromkeys(cases, 1.0), timings(cases, cfg)[1]))
    for mode in ("--throughput", "--lengths"):
        (r,) = run(tmp_path, mode, "--lengths=16", "--uncached_calls=3")[mode[2:]]
        mdlm = r["rows"]["MDLM"]
        assert mdlm["nfe"] > mdlm["calls_timed"] and mdlm["seconds"] == pytest.approx(
            mdlm["nfe"] / mdlm["calls_timed"])
