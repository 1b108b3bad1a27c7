"""
Check a GPU setup and measure it: one command, results in one folder, the most telling steps first.

    python .ci/gpu_check.py --out=gpu_check                   # everything (about 10 minutes on an H100)
    python .ci/gpu_check.py --out=gpu_check --skip tests train sample bench official compiled
    python .ci/gpu_check.py --out=gpu_check --smoke           # a dry run at tiny sizes, any machine

Steps, each logged to <out>/log.txt, all results in <out>/gpu_check.json (--skip leaves steps out):
1. calls: .ci/time_calls.py at 12 x 768, GPT-2 vocabulary, L = 1024, batch 8, bf16: a cached call against the
   uncached one, eager and through lab.compiled (CUDA graphs), and the whole loop;
2. sudoku: python -m lab.sudoku solve on the two Sudoku models of the CPU preset (trained on the CPU and carried in
   out_sudoku_b1 and out_sudoku_mdlm, see --sudoku): 1,000 puzzles a call, the random order against thresholds, at
   temperature 0, in float32 and in bfloat16, where a call's launches may cost more than its tokens;
3. throughput: python -m lab.bench --throughput at L = 1024 and 2048, the paper's batch sizes (AR, MDLM, Eso-LM (B)
   and (A), (B) adaptive with and without a threshold, BD3-LM's cost model); compiled at L = 2048, batch 8; L = 8192;
4. tests: the suite's CUDA and bf16 tests (pytest -k "cuda or bf16");
5. train: train.py with the GPU defaults for --iters iterations (ms/iter, tokens/s, MFU, the loss falling), then
   torchrun --standalone --nproc_per_node=1 (NCCL); needs data/shakespeare (a copied data/ folder);
6. sample: sample.py from that checkpoint: the cached sampler and --kv_cache=False print the same samples;
7. bench: python -m lab.bench's default mode at the CUDA preset (whole runs, the training step's MFU);
8. official: a random checkpoint in the authors' format at the published size, through python -m lab.convert, then
   python -m lab.bench --init_from --throughput at L = 1024;
9. compiled: train.py --compile=True.
A step that fails is recorded with the end of its output, and the check goes on with the next.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ["calls", "sudoku", "throughput", "tests", "train", "sample", "bench", "official", "compiled"]
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--out", default="gpu_check", help="folder for gpu_check.json, log.txt and the runs")
parser.add_argument("--iters", type=int, default=300, help="training iterations of each train.py run")
parser.add_argument("--step_timeout", type=int, default=600, help="seconds after which a step is stopped and failed")
parser.add_argument("--skip", nargs="*", default=[], choices=STEPS)
parser.add_argument("--sudoku", nargs=2, default=["out_sudoku_b1", "out_sudoku_mdlm"],
                    help="the (B) model at alpha0 = 1 and the MDLM baseline: python -m lab.sudoku train")
parser.add_argument("--smoke", action="store_true", help="a dry run of this script: tiny sizes, the CPU if no GPU")
args = parser.parse_args()
if args.smoke:
    args.iters = 4
os.makedirs(args.out, exist_ok=True)
for run_dir in ("train_eager", "train_ddp", "train_compiled"):  # a rerun's: train.py never overwrites a run
    shutil.rmtree(os.path.join(args.out, run_dir), ignore_errors=True)
out = os.path.abspath(args.out)
log = open(os.path.join(out, "log.txt"), "a")  # noqa: SIM115  (open for the whole check)
results = {"started": time.strftime("%Y-%m-%d %H:%M:%S")}


def save():
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(results, f, indent=1)


def run(name, cmd, timeout=None, env=None, json_out=None):
    """Run a command from the repository root, log it, and record its status, wall time, the end of its output
    if it failed, and the JSON file it wrote."""
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    log.write(f"\n== {name}: {' '.join(cmd)}\n")
    t0, timeout = time.time(), timeout or args.step_timeout
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, **env} if env else None)
        output, ok = p.stdout + p.stderr, p.returncode == 0
    except subprocess.TimeoutExpired as e:
        output, ok = f"{e.stdout or ''}{e.stderr or ''}\ntimed out after {timeout} s", False
    log.write(output)
    log.flush()
    results[name] = {"ok": ok, "seconds": round(time.time() - t0, 1)}
    if not ok:
        results[name]["tail"] = output[-3000:]
    if json_out and os.path.exists(json_out):
        with open(json_out) as f:
            results[name]["results"] = json.load(f)
    print(f"   {'ok' if ok else 'FAILED'} in {results[name]['seconds']} s", flush=True)
    save()
    return output if ok else None


def training_log(out_dir):
    """The speed at each log line (the first ones hold the warm-up), the last one's tokens/s and MFU, and the first
    and last losses of a train.py run."""
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    steps, evals = [r for r in records if "loss" in r], [r for r in records if "val" in r]
    return {"ms_per_iter": [round(r["ms_per_iter"], 1) for r in steps], "tokens_per_s": steps[-1]["tokens_per_s"],
            "mfu": steps[-1]["mfu"], "val_first": evals[0]["val"], "val_last": evals[-1]["val"],
            "loss_fell": evals[-1]["val"] < evals[0]["val"]}


import torch  # noqa: E402  (after the argument parsing: --help works without a GPU)

results["machine"] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                      "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
print(json.dumps(results["machine"]), flush=True)
if not torch.cuda.is_available() and not args.smoke:
    sys.exit("gpu_check.py: no CUDA device: this check is for a GPU machine (the CPU is covered by the tests)")
py = sys.executable
device = "cuda" if torch.cuda.is_available() else "cpu"
tiny = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--vocab_size=256"] if args.smoke else []
tiny_train = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=32", "--batch_size=4"] if args.smoke else []
common = [f"--max_iters={args.iters}", f"--eval_interval={args.iters}", "--eval_iters=10",  # of train.py
          f"--log_interval={min(25, args.iters // 2)}", *tiny_train]


def path(name):
    return os.path.join(out, name)


if "calls" not in args.skip:
    run("calls", [py, ".ci/time_calls.py", f"--out={path('calls.json')}", *(["--smoke"] if args.smoke else [])],
        json_out=path("calls.json"))

if "sudoku" not in args.skip:
    json_out = os.path.join(ROOT, args.sudoku[0], "sudoku.json")  # where solve writes
    for dtype in ("float32", "bfloat16"):
        if os.path.exists(json_out):
            os.remove(json_out)
        run(f"sudoku_{dtype}", [py, "-m", "lab.sudoku", "solve", f"--out_dir={args.sudoku[0]}",
                                f"--baselines={args.sudoku[1]}", f"--device={device}", f"--dtype={dtype}",
                                "--thresholds=0.5,0.7,0.9,0.99", "--temperature=0",
                                *(["--puzzles=50"] if args.smoke else [])], json_out=json_out)

bench = [py, "-m", "lab.bench", f"--device={device}", *tiny]
if "throughput" not in args.skip:
    small = ["--sample_batch=2", "--uncached_calls=4", "--repeats=1"] if args.smoke else ["--repeats=2"]
    for name, extra in (("throughput", ["--lengths=" + ("64" if args.smoke else "1024,2048"), *small]),
                        ("throughput_compiled", ["--compile", "--lengths=" + ("64" if args.smoke else "2048"),
                                                 f"--sample_batch={2 if args.smoke else 8}", *small[1:]]),
                        ("throughput_8192", ["--lengths=" + ("128" if args.smoke else "8192"), "--repeats=1",
                                             "--uncached_calls=" + ("4" if args.smoke else "8"), *small[:1]])):
        run(name, [*bench, "--throughput", *extra, f"--json={path(name + '.json')}"], json_out=path(name + ".json"))

if "tests" not in args.skip:
    output = run("tests", [py, "-m", "pytest", "-q", "-k", "cuda or bf16", "test_esolm.py", "lab/"])
    if output:
        results["tests"]["summary"] = output.strip().splitlines()[-1]

if "train" not in args.skip:
    if run("train_eager", [py, "train.py", "--alpha0=0.25", f"--out_dir={path('train_eager')}", *common]) is not None:
        results["train_eager"].update(training_log(path("train_eager")))
    run("torchrun_nccl", [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train.py",
                          "--alpha0=0.25", f"--out_dir={path('train_ddp')}", "--max_iters=20", "--eval_interval=20",
                          "--eval_iters=2", "--log_interval=10", *tiny_train])

if "sample" not in args.skip and os.path.exists(path("train_eager/ckpt.pt")):
    samples = {}
    for name, extra in (("sample_cached", []), ("sample_uncached", ["--kv_cache=False"])):
        output = run(name, [py, "sample.py", f"--out_dir={path('train_eager')}", "--num_samples=4", *extra])
        if output:
            samples[name] = re.findall(r"---------- sample \d+\n(.*?)(?=\n---------- )", output, re.S)
            seconds, nfe = re.search(r"samples: ([\d.]+) s, NFE ([\d.]+)", output).groups()
            results[name].update(nfe=float(nfe), sample_seconds=float(seconds))
    if len(samples) == 2:
        results["cached_equals_uncached"] = samples["sample_cached"] == samples["sample_uncached"]

if "bench" not in args.skip:
    run("bench_default", [*bench, "--repeats=1", *(["--block_size=32", "--train_batch=2"] if args.smoke else []),
                          f"--json={path('bench_default.json')}"], json_out=path("bench_default.json"))

if "official" not in args.skip:
    sys.path.insert(0, ROOT)
    from lab.convert import official_shapes  # a random checkpoint in the authors' format:
    from lab.test_convert import write_safetensors
    V, (n_layer, C) = (256, (1, 32)) if args.smoke else (50257, (12, 768))
    n_head = C // 64 if not args.smoke else 2
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(shape, generator=g) * 0.02 for k, shape in official_shapes(V, C, n_layer, n_head).items()}
    sd["sigma_map.mlp.0.weight"][:, 128:] = 0  # the sin(sigma freq) half, untrained: a model without time input
    sd["rotary_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, C // n_head, 2).float() / (C // n_head)))
    folder = path("official-alpha-1")
    os.makedirs(folder, exist_ok=True)
    write_safetensors(os.path.join(folder, "model.safetensors"), sd)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"mask_index": V, "vocab_size": V + 1, "model_length": 64 if args.smoke else 1024}, f)
    shutil.rmtree(path("official_converted"), ignore_errors=True)
    if run("convert_official", [py, "-m", "lab.convert", f"--source={folder}",
                                f"--out_dir={path('official_converted')}"]) is not None:
        run("bench_official", [py, "-m", "lab.bench", f"--device={device}", "--throughput", "--repeats=1",
                               f"--init_from={path('official_converted')}",
                               "--uncached_calls=" + ("4" if args.smoke else "16"), *(["--sample_batch=2"] *
                               args.smoke), f"--json={path('bench_official.json')}"],
            json_out=path("bench_official.json"))

if "compiled" not in args.skip:  # last: compiling takes minutes on a GPU box (about 30 s a graph)
    if run("train_compiled", [py, "train.py", "--alpha0=0.25", f"--out_dir={path('train_compiled')}", *common,
                              "--compile=True"]) is not None:
        results["train_compiled"].update(training_log(path("train_compiled")))

results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
save()
print(f"wrote {out}/gpu_check.json and log.txt")
