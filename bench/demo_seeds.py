"""The demo over several seeds, CORE against single-model training: the project's small-scale check of the paper's
claim that training the pair together beats training each model alone.

Each (variant, seed) is one `python core.py --demo --seed S --out DIR` run (two per core at a time), and its
before/after evaluations are read back. Printed per seed and on average: Pass@1 of each model, Team Pass@2 and
p_12 (both models right), before -> after, and how many seeds improve all three of Pass@1 m1, Pass@1 m2 and
Team Pass@2.

Default variants: the demo as shipped (CORE with each model's own advantages in reward units), CORE with the
paper's joint std-normalised advantages, and each model trained alone (--single) with either advantage scale.
Six seeds of four variants take about 13 minutes on 2 cores; the output is kept in bench/results/demo_seeds.txt.

Run: python bench/demo_seeds.py
     python bench/demo_seeds.py --variants core= paper="--adv-group joint --adv-scale std" --seeds 1 2 3
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
METRICS = [("Pass@1 m1", "pass@1_m1"), ("Pass@1 m2", "pass@1_m2"), ("Team Pass@2", "team_pass@2"), ("p_12", "p_12@2")]


def run_demo(variant, flags, seed, root):
    out = Path(root) / f"{variant}-{seed}"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(CORE_PY), "--demo", "--seed", str(seed), "--out", str(out)] + flags.split(),
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{variant} seed {seed} failed:\n{done.stderr[-2000:]}")
    return [json.loads((out / f"eval_{when}.json").read_text()) for when in ("before", "after")]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5, 42])
    parser.add_argument("--variants", nargs="+", default=["core=", "core-paper=--adv-group joint --adv-scale std",
                                                          "single=--single", "single-grpo=--single --adv-scale std"],
                        help="NAME=FLAGS pairs: extra core.py flags per variant")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    variants = dict(v.split("=", 1) for v in args.variants)
    with tempfile.TemporaryDirectory() as root, ThreadPoolExecutor(args.workers) as pool:
        jobs = {(v, s): pool.submit(run_demo, v, flags, s, root) for v, flags in variants.items() for s in args.seeds}
        results = {key: job.result() for key, job in jobs.items()}
    for variant, flags in variants.items():
        print(f"\n{variant} ({'python core.py --demo ' + flags if flags else 'python core.py --demo'}), before -> after")
        print(f"  {'seed':>4}" + "".join(f"{label:>18}" for label, _ in METRICS) + "   all three up")
        wins = 0
        for seed in args.seeds:
            before, after = results[variant, seed]
            up = all(after[k] > before[k] for k in ("pass@1_m1", "pass@1_m2", "team_pass@2"))
            wins += up
            print(f"  {seed:>4}" + "".join(f"{before[k]:>9.3f} -> {after[k]:.3f}" for _, k in METRICS) + f"   {'yes' if up else 'no'}")
        mean = {k: [sum(results[variant, s][i][k] for s in args.seeds) / len(args.seeds) for i in (0, 1)] for _, k in METRICS}
        print(f"  {'mean':>4}" + "".join(f"{mean[k][0]:>9.3f} -> {mean[k][1]:.3f}" for _, k in METRICS)
              + f"   {wins}/{len(args.seeds)}")
        print(f"  {'gain':>4}" + "".join(f"{mean[k][1] - mean[k][0]:>+18.3f}" for _, k in METRICS))


if __name__ == "__main__":
    main()
