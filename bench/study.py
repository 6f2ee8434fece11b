"""The comparisons a reviewer asks for, in one command: CORE against its alternatives, over several seeds, in
one table ordered by training compute (the tokens the models sampled).

Each (variant, seed) is one `python core.py BASE VARIANT-FLAGS --seed S --out DIR` run (two at a time); its
evaluations before and after training and its last metrics row are read back. Default variants, at the demo's
scale (BASE = --demo):
  core          the demo as shipped: CORE with each model's own advantages in reward units
  core-paper    CORE with the paper's joint, std-normalised advantages
  core-cold     CORE, hinted traces trained for the cold prompt (--round-b-context cold)
  single-k      each model alone with K = 2 samples per question (the old --single: a smaller budget)
  single        each model alone with K + K' = 3 samples per question (CORE's budget)
  alone         model 1 alone (--model2 none), K + K' samples
Printed per variant: mean over seeds of the sampled tokens (m1 + m2), and of Pass@1 m1, Pass@1 m2, Team Pass@2
and p_12 after training, with the mean change from before, and how many seeds improved Pass@1 of every
trained model. On the demo's tiny models the variants may well not differ beyond noise: the table says so.

Run: python bench/study.py                                   # the demo's scale, seeds 1 2 42 (CPU)
     python bench/study.py --base "--data gsm8k --steps 500 --eval-n 500" --seeds 1   # the real study, a GPU
     python bench/study.py --variants big="--model1 Qwen/Qwen2.5-7B-Instruct --model2 none" core=
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CORE_PY = Path(__file__).resolve().parent.parent / "core.py"
VARIANTS = ["core=", "core-paper=--adv-group joint --adv-scale std", "core-cold=--round-b-context cold",
            "single-k=--single --single-samples 2", "single=--single", "alone=--model2 none"]
METRICS = [("Pass@1 m1", "pass@1_m1"), ("Pass@1 m2", "pass@1_m2"), ("Team Pass@2", "team_pass@2"),
           ("p_12", "p_12@2")]


def run(base, flags, seed, out):
    """One run; returns (evaluation before, after, last metrics row)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, str(CORE_PY)] + base.split() + flags.split() + ["--seed", str(seed), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    last = [json.loads(line) for line in open(out / "metrics.jsonl")][-1]
    evals = [out / f"eval_{when}.json" for when in ("before", "after")]  # no before with --no-eval-before
    return [json.loads(p.read_text()) if p.exists() else {} for p in evals] + [last]


def mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def row(name, results):
    """One line of the table: tokens, then each metric after training (change from before), then seeds up."""
    tokens = mean([last["sampled_tokens_total_m1"] + last["sampled_tokens_total_m2"] for _, _, last in results])
    cells = []
    for _, key in METRICS:
        after, before = mean([a.get(key) for _, a, _ in results]), mean([b.get(key) for b, _, _ in results])
        change = "" if before is None else f" ({after - before:+.3f})"
        cells.append("-" if after is None else f"{after:.3f}{change}")
    trained = [key for _, key in METRICS[:2] if key in results[0][1]]
    up = sum(all(a[k] > b.get(k, a[k]) for k in trained) for b, a, _ in results)
    return tokens, f"{name:<12}{tokens:>12,.0f}" + "".join(f"{c:>17}" for c in cells) + f"{up:>6}/{len(results)}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="--demo", help="core.py flags shared by every variant")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 42])
    parser.add_argument("--variants", nargs="+", default=VARIANTS, help="NAME=FLAGS pairs")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    variants = dict(v.split("=", 1) for v in args.variants)
    with tempfile.TemporaryDirectory() as root, ThreadPoolExecutor(args.workers) as pool:
        jobs = {(v, s): pool.submit(run, args.base, flags, s, Path(root) / f"{v}-{s}")
                for v, flags in variants.items() for s in args.seeds}
        results = {key: job.result() for key, job in jobs.items()}
    print(f"python core.py {args.base} + each variant's flags, seeds {' '.join(map(str, args.seeds))}; "
          f"means over seeds, after training (change from before)")
    print(f"{'variant':<12}{'tokens':>12}" + "".join(f"{label:>17}" for label, _ in METRICS) + "  Pass@1 up")
    lines = [row(v, [results[v, s] for s in args.seeds]) for v in variants]
    for _, line in sorted(lines):
        print(line)
    for v, flags in variants.items():
        print(f"  {v}: {flags or '(no extra flags)'}")


if __name__ == "__main__":
    main()
