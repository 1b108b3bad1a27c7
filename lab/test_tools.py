"""The lab's tools that the scripts' tests do not cover: the structured orders, the compiled call,
evaluate's likelihoods and grid, and the sample metrics."""
import contextlib
from types import SimpleNamespace
import json
import math
import re

import numpy as np
import pytest
import torch

from lab import compiled as compiled_module
from lab import metrics
from data import save_checkpoint
from lab.common import autocast, held_out, load_model, mean_se, perplexity
from esolm import EsoLM, EsoLMConfig
from lab.compiled import bucket, compiled
from lab.conftest import TINY, run
from lab.metrics import corpus_word_rate, generative_nll, likelihoods, timed_generate, unigram_entropy, words
from lab.orders import subcontext_plan
from test_esolm import V, assert_same_run, gen, sharp_model

PROMPTS = {"none": None, "prefix": torch.tensor([3, 1, 4, 1, 5]),
           "infill": torch.tensor([V, 2, V, V, 7, V, V, 1])}


def structured_calls(given, S, alpha0, offsets):
    """Each position's call, as the construction says: call j decodes offset offsets[j] of every
    chunk of S (a call left empty by the prompt is no call), for the first floor(S alpha0) calls;
    then the positions left, left to right, one a call. 0: given."""
    calls, c = [0] * len(given), 0
    for offset in offsets[:math.floor(S * alpha0)]:
        chunk = [q for q in range(len(given)) if q % S == offset and not given[q]]
        c += bool(chunk)
        for q in chunk:
            calls[q] = c
    for q in range(len(given)):
        if not given[q] and not calls[q]:
            c += 1
            calls[q] = c
    return calls


@pytest.mark.parametrize("L_,S", [(12, 4), (12, 3), (8, 1), (16, 8)])
@pytest.mark.parametrize("alpha0", [1.0, 0.6, 0.0])
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_the_structured_order_is_the_construction(L_, S, alpha0, shuffle, prompt):
    """generate(plan=subcontext_plan(...)) decodes each position at the call the construction says,
    cached as uncached; with shuffle each row reads its own offsets' order off its calls."""
    model, p = sharp_model("B", block_size=L_), PROMPTS[prompt]
    plan = subcontext_plan(model, 4, alpha0, S, shuffle, seed=1, prompt=p)
    kw = dict(num_samples=4, alpha0=alpha0, prompt=p, seed=1)
    (out, logits), uncached = gen(model, plan=plan, **kw), gen(model, plan=plan, kv_cache=False, **kw)
    assert_same_run((out, logits), uncached, 1e-10)
    given = [False] * L_ if p is None else [i < len(p) and p[i] != V for i in range(L_)]
    orders = set()
    for row in out.decoded_by.tolist():
        offsets = list(range(S))
        if shuffle:  # each diffusion call's offset, off the row; offsets a prompt emptied last
            firsts = [next((q % S for q in range(L_) if row[q] == c and not given[q]), None)
                      for c in range(1, S + 1)]
            offsets = [o for o in firsts if o is not None][:math.floor(S * alpha0)]
            offsets += [o for o in range(S) if o not in offsets]
            orders.add(tuple(offsets))
        assert row == structured_calls(given, S, alpha0, offsets)
    if p is None and alpha0 == 1:
        assert out.nfe.tolist() == [S] * 4
    if shuffle and p is None and alpha0 == 1 and S >= 4:
        assert len(orders) > 1  # each row its own order of the offsets


def test_a_structured_order_needs_an_s_that_divides_l():
    with pytest.raises(ValueError, match="S=5 must divide L = 12"):
        subcontext_plan(sharp_model(), 2, 1.0, 5)


@pytest.fixture
def eager_compile(monkeypatch):
    """torch.compile as the identity: the compiled call's padded layout, run eagerly."""
    monkeypatch.setattr(compiled_module.torch, "compile", lambda model, **kw: model)


@pytest.mark.parametrize("variant", ["A", "B"])
@pytest.mark.parametrize("mode", [{}, {"adaptive": "margin", "threshold": 0.4}])
@pytest.mark.parametrize("prompt", ["none", "infill"])
def test_the_compiled_calls_padding_is_exact(variant, mode, prompt, eager_compile):
    """Fed tokens padded to a power of two, the padding masks sent to the sink slot: the eager
    call's tokens and logits, in float64."""
    model = sharp_model(variant)
    kw = dict(num_samples=3, alpha0=0.5, steps=5, prompt=PROMPTS[prompt], seed=3, **mode)
    assert_same_run(gen(model, net=compiled(model), **kw), gen(model, **kw), 1e-10)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # from torch.compile's own imports
def test_the_compiled_call_makes_one_graph_a_bucket(monkeypatch):
    """A whole run at L = 256 compiled with fullgraph=True and static shapes: one graph for each
    bucket of fed tokens (a power of two), none compiled again (dynamo's graphs; the "eager"
    backend skips inductor's code generation)."""
    from torch._dynamo.utils import counters
    compile, widths = torch.compile, []

    def compile_eagerly(model, **kw):
        graph = compile(model, backend="eager", fullgraph=kw["fullgraph"], dynamic=kw["dynamic"])
        return lambda idx, *args, **kw: widths.append(idx.size(1)) or graph(idx, *args, **kw)

    monkeypatch.setattr(compiled_module.torch, "compile", compile_eagerly)
    model = sharp_model("B", torch.float32, block_size=256)
    torch._dynamo.reset()
    counters.clear()
    out = model.generate(2, 1.0, 16, net=compiled(model), seed=0)  # about 16 tokens a call
    assert len(widths) == int(out.nfe.max()) > 2 * len(set(widths))
    assert all(w == bucket(w) for w in widths)
    assert counters["stats"]["unique_graphs"] == len(set(widths))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_the_compiled_call_compiled_by_inductor_equals_uncached():
    model = sharp_model("B", torch.float32)
    kw = dict(num_samples=2, alpha0=0.5, steps=4, prompt=PROMPTS["infill"], seed=0)
    assert_same_run(gen(model, net=compiled(model), **kw), gen(model, kv_cache=False, **kw), 1e-4)


def test_corpus_word_rate_on_a_hand_made_example():
    vocabulary = set(words("To be, or not to be: that is the question. O'er the hills"))
    assert vocabulary == {"to", "be", "or", "not", "that", "is", "the", "question", "o'er", "hills"}
    # 7 words: to, be, or, hills found; nat, quistion, xyzzy not ("a" and "I" are too short)
    assert corpus_word_rate(["to be OR nat a", "quistion I hills xyzzy"], vocabulary) == 4 / 7
    assert math.isnan(corpus_word_rate(["", "a 1 2"], vocabulary))


def test_generative_nll_scores_the_first_end_of_text_and_not_the_others():
    """The official rule: every token but the end-of-text ones, and each sample's first; the text
    after it is scored too. With a scorer whose p(token) is fixed, the mean is known exactly."""
    p = torch.tensor([0.5, 0.3, 0.2])  # token 0 is end-of-text

    class Fixed(torch.nn.Module):  # p(token) the same at every position
        def sequential_forward(self, x, order, n_clean):
            return torch.zeros(*x.shape, 1), None, None

        def lm_head(self, h):
            return p.log().expand(*h.shape[:2], 3)

    x = torch.tensor([[1, 2, 0, 2, 0, 0], [2, 2, 2, 2, 2, 2]])  # row 0: 1, 2, its first 0, then 2
    mean, se = generative_nll(Fixed(), x, eot_id=0)
    cost = -p.log()
    assert mean == pytest.approx(((cost[1] + 2 * cost[2] + cost[0] + 6 * cost[2]) / 10).item())
    assert se > 0


def test_evaluate_reports_likelihoods_with_standard_errors(tiny_data, trained):
    _, out, _ = run("lab.evaluate", f"--out_dir={trained}", "--windows=6", "--orders=1,2",
                    cwd=tiny_data)
    for name in ("NELBO", "exact K1", "exact K2", "minus the NELBO"):
        assert re.search(re.escape(name) + r" +[\d.-]+ \+- [\d.]+ nats/token", out), out
    result = json.loads((trained / "eval.json").read_text())
    assert result["windows"] == 6 and result["nelbo"]["se"] > 0 and result["exact_k1"]["mean"] > 0
    # K = 2 averages probabilities over more orders: on average the tighter estimate
    assert result["exact_k2"]["mean"] <= result["exact_k1"]["mean"] + 3 * result["exact_k1"]["se"]
    plotted = (trained / "curves.png").exists() and (trained / "decoding.png").exists()
    assert plotted or "matplotlib is not installed" in out


def test_evaluate_grid(tiny_data, trained, mdlm, ar, monkeypatch):
    """--grid: every cell of alpha0 x T x order (x tau) and a baseline at its own alpha0; a cell
    that cannot run is reported and the grid goes on; each cell holds its NFE, time, generative
    perplexity under the scorer, entropy and word rate, and its settings reached generate."""
    seen, sample_cell = [], metrics.sample_cell
    monkeypatch.setattr(metrics, "sample_cell", lambda *a, **kw: seen.append(kw) or sample_cell(*a, **kw))
    _, out, _ = run("lab.evaluate", f"--out_dir={trained}", "--grid", f"--scorer={ar}",
                    "--alpha0s=1,0.25", "--steps=4,5", "--grid_orders=random,subcontext,margin",
                    "--thresholds=0.5", f"--baselines={mdlm}", "--num_samples=4", "--batch_size=2",
                    "--seed=3", cwd=tiny_data)
    cells = json.loads((trained / "grid.json").read_text())["cells"]
    ran, skipped = [c for c in cells if "skipped" not in c], [c for c in cells if "skipped" in c]
    # the model: 2 alpha0 x 2 T x (random, subcontext, margin, margin at tau 0.5); MDLM: 4 x 2 T
    assert len(cells) == 2 * 2 * 4 + 4 * 2 and {c["model"] for c in cells} == {str(trained), str(mdlm)}
    assert {(c["order"], c["steps"]) for c in skipped} == {("subcontext", 5)}  # 5 does not divide 32
    assert all("S=5 must divide L = 32" in c["skipped"] for c in skipped)
    assert out.count("skipped: subcontext_plan: S=5") == len(skipped) == 3
    assert all(c["seconds_per_batch"] > 0 and c["gen_nll"] > 0 and c["entropy"] > 0
               and 0 <= c["word_rate"] <= 1 and c["nfe"] >= 1 for c in ran)
    assert [c["nfe"] for c in ran if c["order"] == "subcontext" and c["alpha0"] == 1] == [4.0, 4.0]
    tau = [c for c in ran if c["threshold"] == 0.5]
    assert tau and all(c["order"] == "margin" for c in tau)
    assert [(kw["alpha0"], kw["steps"], kw.get("adaptive"), kw.get("threshold")) for kw in seen] == [
        (c["alpha0"], c["steps"], c["order"] if c["order"] == "margin" else None, c["threshold"]) for c in ran]
    assert (trained / "grid.png").exists() or "matplotlib is not installed" in out


def test_evaluate_refuses_what_would_lose_or_fake_a_result(tiny_data, trained, tmp_path):
    """A grid of skipped cells keeps the last grid.json; a scorer or baseline of another vocabulary
    is refused; a log line a crash cut short is left out of curves.png."""
    (trained / "grid.json").write_text("the last grid")
    status, _, err = run("lab.evaluate", f"--out_dir={trained}", "--grid", "--steps=0", "--num_samples=2",
                         cwd=tiny_data, ok=False)
    assert status and err.strip() == "evaluate.py: --grid=True: skipped each cell: no grid.json"
    assert (trained / "grid.json").read_text() == "the last grid"
    ckpt = torch.load(trained / "ckpt.pt", weights_only=True)
    other = EsoLM(EsoLMConfig(**ckpt["model_config"] | {"vocab_size": 9}))
    save_checkpoint(str(tmp_path / "ckpt.pt"), **ckpt | {"model": other.state_dict(), "ema": None,
                                                        "model_config": ckpt["model_config"] | {"vocab_size": 9}})
    for key in ("scorer", "baselines"):
        status, _, err = run("lab.evaluate", f"--out_dir={trained}", "--grid", f"--{key}={tmp_path}", cwd=tiny_data,
                             ok=False)
        assert status and err.strip().endswith(f"--{key}={tmp_path}: has another vocabulary"), err
    log = tmp_path / "cut"
    log.mkdir()
    (log / "ckpt.pt").write_bytes((trained / "ckpt.pt").read_bytes())
    (log / "log.jsonl").write_text((trained / "log.jsonl").read_text() + '{"iter": 7, "lo')
    _, out, _ = run("lab.evaluate", f"--out_dir={log}", "--windows=2", "--orders=1", cwd=tiny_data)
    assert (log / "curves.png").exists() or "matplotlib is not installed" in out


def test_curves_draw_a_resumed_runs_iterations_once(tiny_data, trained, tmp_path):
    """A kill between the log and the checkpoint: the resumed run logs those iterations again."""
    from lab import evaluate
    lines = (trained / "log.jsonl").read_text().splitlines(True)
    (tmp_path / "log.jsonl").write_text("".join(lines + lines[1:]))  # every record but the first, twice
    drawn = []
    def ignore(*args, **kw):
        pass
    ax = SimpleNamespace(plot=lambda x, y, label: drawn.append((label, x, y)), set=ignore, legend=ignore,
                         scatter=ignore, set_ylabel=ignore)
    plt = SimpleNamespace(subplots=lambda *a, **kw: (SimpleNamespace(savefig=ignore), [ax] * 3 if a else ax),
                          close=ignore)
    evaluate.plot_training(SimpleNamespace(out_dir=tmp_path, seed=0), load_model(trained)[0],
                           contextlib.nullcontext(), plt)
    for label, x, y in drawn:
        assert x == sorted(set(x)) and len(x) == len(y) > 0, label


def test_the_sweep_refuses_settings_it_owns_and_a_failed_run_is_one_line(tiny_data):
    args = [f"--out={tiny_data / 'sweep_bad'}", "--alpha0s=1", "--mdlm=False", "--device=cpu"]
    status, _, err = run("lab.sweep", *args, "--train_args=--max_iters=2 --alpha0=0.5", cwd=tiny_data, ok=False)
    assert status and "--train_args=--max_iters=2 --alpha0=0.5: must leave each run's own" in err
    assert not (tiny_data / "sweep_bad").exists()
    status, _, err = run("lab.sweep", *args, "--train_args=--batch_size=0", cwd=tiny_data, ok=False)
    assert status and err.strip().endswith("sweep.py: train.py failed for alpha0_0 (above)"), err


def test_the_nelbos_standard_error_holds_against_repeated_draws(tiny_data, trained):
    """Each window draws its own t and masks, so the windows' values are independent draws and
    their standard error (which adds the windows' own spread) is not too small: the spread of the
    mean over 30 seeds stays within it."""
    model, _ = load_model(trained)
    x = held_out(tiny_data / "data", "tiny", 32, 16)
    runs = [mean_se(likelihoods(model, x, orders=(), seed=s)["nelbo"]) for s in range(30)]
    means, ses = zip(*runs)
    assert 0 < np.std(means, ddof=1) <= np.mean(ses)


def test_a_tiny_sweep_trains_scores_and_resumes(tiny_data):
    """python -m lab.sweep: the runs trained alike, each scored (likelihoods; samples for
    --gen_alpha0s, the AR run and MDLM), the table printed; a rerun trains a new alpha0, resumes a
    run with a checkpoint but no row, and trains nothing else again."""
    train_args = " ".join(["--dataset=tiny", f"--data_dir={tiny_data / 'data'}", "--max_iters=2",
                           "--eval_interval=2", *TINY])
    args = [f"--out={tiny_data / 'sweep'}", "--gen_alpha0s=0.5", "--gen_steps=4,64",
            "--eval_windows=4", "--num_samples=2", "--device=cpu", f"--train_args={train_args}"]
    _, out, _ = run("lab.sweep", "--alpha0s=1", *args, cwd=tiny_data)
    rows = json.loads((tiny_data / "sweep" / "results.json").read_text())
    assert sorted((r["variant"], r["alpha0"]) for r in rows) == [("B", 0), ("B", 1), ("MDLM", 1)]
    for r in rows:
        assert r["nelbo"] > 0 and r.get("gen_nll_T4", 1) > 0 and "gen_nll_T64" not in r  # T <= L = 32
        assert ("gen_nll_T4" in r) == (r["variant"] == "MDLM" or r["alpha0"] == 0)  # B at 1: not asked
        assert ("exact_k16" in r) == (r["variant"] == "B")
    assert re.search(r"MDLM +[\d.]+ \+- [\d.]+", out) and (tiny_data / "sweep/results.csv").exists()
    path = tiny_data / "sweep" / "results.json"  # MDLM's row lost, its checkpoint kept: resumed
    path.write_text(json.dumps([r for r in rows if r["variant"] == "B"]))
    _, out, _ = run("lab.sweep", "--alpha0s=1,0.5", *args, cwd=tiny_data)
    rows = json.loads(path.read_text())
    trained = [line for line in out.splitlines() if "train.py --alpha0" in line]
    assert len(trained) == 2 and len(rows) == 4  # alpha0 = 0.5 new, MDLM resumed
    assert ["init_from=resume" in line for line in trained] == [False, True]
    assert [r["gen_nll_T4"] > 0 for r in rows if r["alpha0"] == 0.5] == [True]


def test_timed_generate_is_one_generate_call_split_in_batches(monkeypatch):
    """Row b draws from seed + b, so batches of 2 give the samples of one call, per-row prompts
    split with them; sample_cell hands every setting through."""
    model, M = sharp_model("B"), V
    prompts = torch.tensor([[2, 7, M, 1], [M, M, 3, M], [5, M, M, M], [M, 4, M, 8], [9, M, 0, M]])
    kw = dict(alpha0=0.5, steps=4, temperature=0.7, top_p=0.8, adaptive="margin", threshold=0.4)
    x, nfe, seconds = timed_generate(model, 5, 2, 3, contextlib.nullcontext(), prompt=prompts, **kw)
    want = model.generate(5, prompt=prompts, seed=3, **kw)
    assert torch.equal(x, want.x) and torch.equal(nfe, want.nfe) and len(seconds) == 3
    seen = []
    monkeypatch.setattr(metrics, "timed_generate", lambda *a, **k: seen.append((a, k)) or (
        want.x, want.nfe, [1.0]))
    cell = metrics.sample_cell(model, 5, 2, 3, "amp", **kw)
    assert seen == [((model, 5, 2, 3, "amp"), kw)] and cell["nfe"] == want.nfe.float().mean()


def test_the_lab_statistics_by_hand():
    """mean_se: the mean and its standard error with n - 1; perplexity: exp and the delta method
    (se times exp); the unigram entropy in nats; autocast's name is the precision it runs."""
    assert mean_se([1.0, 2.0, 3.0]) == (pytest.approx(2.0), pytest.approx(1 / math.sqrt(3)))
    assert perplexity(math.log(2), 0.1) == (pytest.approx(2.0), pytest.approx(0.2))
    assert unigram_entropy(np.array([0, 1, 2, 3])) == pytest.approx(math.log(4)) == unigram_entropy(np.arange(4))
    assert unigram_entropy(np.array([5, 5, 5])) == 0
    context, name = autocast("cpu", "bfloat16")
    assert name == "bfloat16" and context.fast_dtype == torch.bfloat16


def test_load_model_takes_the_ema_weights_when_saved(tmp_path, trained):
    ckpt = torch.load(trained / "ckpt.pt", weights_only=True)
    ema = {k: v + 1 for k, v in ckpt["model"].items()}
    save_checkpoint(str(tmp_path / "ckpt.pt"), **{**ckpt, "ema": ema})
    for flag, want in ((True, ema), (False, ckpt["model"])):
        state = load_model(tmp_path, ema=flag)[0].state_dict()
        assert all(torch.equal(state[k], v) for k, v in want.items())
