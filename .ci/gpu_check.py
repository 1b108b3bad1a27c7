"""
Check a GPU setup and measure it (10 minutes or more on one H100/H200): one command, results in one folder.

    python .ci/gpu_check.py --out=gpu_check          # from the repository root, with data/shakespeare prepared

It needs a prepared data/shakespeare (python prepare_data.py: copy the data/ folder to a machine without network)
and nothing else from outside. Steps, the most telling first, each logged to <out>/log.txt, all results in
<out>/gpu_check.json:
1. the test suite's CUDA and bf16 tests (pytest -k "cuda or bf16");
2. bench.py --device=cuda (12 x 768, GPT-2 vocabulary, bf16): cached vs uncached vs AR at L = 1024 and 2048
   (--lengths 1024 2048 4096 8192 for the paper's whole table); then the cached sampler's time per call with and
   without cuDNN attention (esolm.SAMPLER_ATTENTION keeps it off);
3. train.py with the GPU defaults for --iters iterations: ms/iter, tokens/s, MFU, and whether the loss fell; then
   again with TORCH_CUDNN_SDPA_PREFERRED=0 (does training pay for cuDNN's plan per shape too?); then torchrun
   --standalone --nproc_per_node=1 (NCCL) for a few iterations;
4. sample.py from that checkpoint in float32: the cached sampler and --no-kv_cache must print the same samples;
5. bench.py's training step at L = 1024 (MFU);
6. the paper's network through the published-checkpoint loader: a random checkpoint in the authors' format at the
   published size (12 x 768, GPT-2 vocabulary; the real weights need the hub), then bench.py --init_from at L = 1024;
7. the compiled paths (--skip compiled leaves them out): bench.py --compile at L = 1024 (the cached sampler's calls
   through torch.compile: fewer, fused kernels per call) and train.py --compile=True (four graphs).
A step that fails is recorded with the end of its output, and the check goes on with the next.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--out", default="gpu_check", help="folder for gpu_check.json, log.txt and the runs")
parser.add_argument("--iters", type=int, default=300, help="training iterations of each train.py run")
parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048],
                    help="L of the bench's speed table (the paper's table also has 4096 and 8192: minutes more)")
parser.add_argument("--step_timeout", type=int, default=900, help="seconds after which a step is stopped and failed")
parser.add_argument("--skip", nargs="*", default=[],
                    choices=["tests", "train", "sample", "bench", "official", "compiled"])
parser.add_argument("--smoke", action="store_true", help="a dry run of this script: tiny sizes, the CPU if no GPU")
args = parser.parse_args()
if args.smoke:
    args.iters = 4
os.makedirs(args.out, exist_ok=True)
out = os.path.abspath(args.out)
log = open(os.path.join(out, "log.txt"), "a")
results = {"started": time.strftime("%Y-%m-%d %H:%M:%S")}


def save():
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(results, f, indent=1)


def run(name, cmd, timeout=None, env=None):
    """Run a command from the repository root, log it, and record its status, wall time and output's end."""
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
tiny = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--vocab_size=256", "--sample_batch=2", "--train_batch=2",
        "--block_size=32"] if args.smoke else []

ATTENTION = """
import sys, time, torch, esolm
from torch.nn.attention import SDPBackend
L, smoke = (32, True) if sys.argv[1] == "smoke" else (1024, False)
size = dict(n_layer=1, n_head=2, n_embd=32, vocab_size=256) if smoke else dict(n_layer=12, n_head=12, n_embd=768,
                                                                                vocab_size=50257)
model = esolm.EsoLM(esolm.EsoLMConfig(block_size=L, **size)).to(sys.argv[2]).eval()
ctx, _ = esolm.autocast(sys.argv[2])
for name, backends in (("without cuDNN", esolm.SAMPLER_ATTENTION),
                       ("with cuDNN", [SDPBackend.CUDNN_ATTENTION, *esolm.SAMPLER_ATTENTION])):
    esolm.SAMPLER_ATTENTION = backends  # generate reads it at each call
    with ctx:
        model.generate(8, 1.0, 8)  # warm-up
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        t = time.time()
        model.generate(8, 1.0, L // 8)
        torch.cuda.synchronize() if torch.cuda.is_available() else None
    print(f"{name}: {(time.time() - t) / (L // 8) * 1000:.2f} ms per cached call (batch 8, L = {L}, 8 tokens a call)")
"""

common = [f"--max_iters={args.iters}", f"--eval_interval={args.iters}", "--eval_iters=10",  # of train.py
          f"--log_interval={min(25, args.iters // 2)}"]

if "tests" not in args.skip:
    output = run("tests", [py, "-m", "pytest", "-q", "-k", "cuda or bf16", "test_esolm.py", "test_pipeline.py"])
    if output:
        results["tests"]["summary"] = output.strip().splitlines()[-1]

if "bench" not in args.skip:
    bench_json = os.path.join(out, "bench.json")
    lengths = ["32", "64"] if args.smoke else [str(L) for L in args.lengths]
    run("bench", [py, "bench.py", f"--device={device}", "--lengths", *lengths, "--repeats=2", f"--json={bench_json}",
                  "--skip_training", *tiny], timeout=2 * args.step_timeout)
    output = run("sampler_attention", [py, "-c", ATTENTION, "smoke" if args.smoke else "full", device])
    if output:
        results["sampler_attention"]["ms_per_call"] = dict(re.findall(r"(with\w* cuDNN): ([\d.]+) ms", output))

if "train" not in args.skip:
    # the same run with cuDNN attention last in torch's order: the AR term's length changes at every step, and
    # cuDNN builds a plan for each new shape (see esolm.SAMPLER_ATTENTION)
    for name, env in (("train_eager", None), ("train_eager_cudnn_last", {"TORCH_CUDNN_SDPA_PREFERRED": "0"})):
        run_dir = os.path.join(out, name)
        if run(name, [py, "train.py", "--alpha0=0.25", f"--out_dir={run_dir}", *common], env=env) is not None:
            results[name].update(training_log(run_dir))
    run("torchrun_nccl", [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train.py",
                          "--alpha0=0.25", f"--out_dir={os.path.join(out, 'train_ddp')}", "--max_iters=20",
                          "--eval_interval=20", "--eval_iters=2", "--log_interval=10"])

if "sample" not in args.skip and os.path.exists(os.path.join(out, "train_eager", "ckpt.pt")):
    samples = {}
    for name, extra in (("sample_cached", []), ("sample_uncached", ["--no-kv_cache"])):
        output = run(name, [py, "sample.py", f"--out_dir={os.path.join(out, 'train_eager')}", "--num_samples=4",
                            "--dtype=float32", "--seed=0", *extra])
        if output:
            samples[name] = re.findall(r"---------- sample \d+\n(.*?)(?=\n---------- )", output, re.S)
            nfe, seconds = re.search(r"NFE (\d+), ([\d.]+) s", output).groups()
            results[name].update(nfe=int(nfe), sample_seconds=float(seconds))
    if len(samples) == 2:
        results["cached_equals_uncached"] = samples["sample_cached"] == samples["sample_uncached"]

if "bench" not in args.skip:
    run("bench_training", [py, "bench.py", f"--device={device}", "--skip_sampling", "--repeats=3",
                           *(tiny or ["--block_size=1024"]), f"--json={os.path.join(out, 'bench_training.json')}"])
    for name in ("bench", "bench_training"):
        path = os.path.join(out, f"{name}.json")
        if os.path.exists(path):
            with open(path) as f:
                results[name]["results"] = {k: v for k, v in json.load(f).items() if k in ("lengths", "training")}

if "official" not in args.skip:
    sys.path.insert(0, ROOT)
    from dit_reference import official_state_dict, save_official  # a checkpoint in the authors' format
    V, size = (256, dict(n_layer=1, n_head=2, C=32)) if args.smoke else (50257, dict(n_layer=12, n_head=12, C=768))
    folder = os.path.join(out, "official")
    save_official(folder, official_state_dict(V=V, cond=128, **size),
                  {"mask_index": V, "vocab_size": V + 1, "n_blocks": size["n_layer"], "n_heads": size["n_head"],
                   "model_length": 1024})
    bench_json = os.path.join(out, "bench_official.json")
    if run("bench_official", [py, "bench.py", f"--device={device}", f"--init_from={folder}", "--lengths",
                              "64" if args.smoke else "1024", "--repeats=1", "--skip_training",
                              f"--json={bench_json}"]) is not None:
        with open(bench_json) as f:
            results["bench_official"]["results"] = json.load(f)["lengths"]

if "compiled" not in args.skip:  # last: compiling takes minutes on a GPU box (about 30 s a graph on an H200's)
    bench_json = os.path.join(out, "bench_compiled.json")
    if run("bench_compiled", [py, "bench.py", f"--device={device}", "--lengths", "64" if args.smoke else "1024",
                              "--repeats=1", "--skip_training", "--compile", *tiny, f"--json={bench_json}"]):
        with open(bench_json) as f:
            results["bench_compiled"]["results"] = json.load(f)["lengths"]
    run_dir = os.path.join(out, "train_compiled")
    if run("train_compiled", [py, "train.py", "--alpha0=0.25", f"--out_dir={run_dir}", *common,
                              "--compile=True"]) is not None:
        results["train_compiled"].update(training_log(run_dir))

results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
save()
print(f"wrote {out}/gpu_check.json and log.txt")
