"""The comparisons a reviewer asks for, in one command: CORE against its alternatives, over several seeds, in
one table ordered by training compute (the tokens the models sampled).

Each (variant, seed) is one `python core.py BASE VARIANT-FLAGS --seed S --out OUT/VARIANT-S` run (two at a
time); its evaluations before and after training and its last metrics row are read back. Every variant names
its advantage options, so that any base (the demo's, or the paper's defaults on a GPU) compares the same
things. Default variants:
  core          CORE with each model's own advantages in reward units (the demo's choice)
  core-paper    CORE with the paper's joint, std-normalised advantages
  core-cold     core, hinted traces trained for the cold prompt (--round-b-context cold)
  single-k      each model alone with K = 2 samples per question (a smaller budget), core's advantage scale
  single        each model alone with K + K' = 3 samples per question (CORE's budget), core's advantage scale
  alone         model 1 alone (--model2 none), K + K' samples, core's advantage scale
Printed per variant: mean over seeds of the sampled tokens (m1 + m2), and of Pass@1 and Pass@2 per model, Team
Pass@2, p_12 and the team vote after training, with the mean change from before, their spread over seeds, and
how many seeds improved Pass@1 of every trained model; then every run's numbers, with its time. On the demo's tiny models the variants may well not differ beyond noise: the table says so.

The runs stay under --out (default runs/study). Run the same command again after a stop, a crash or a new
variant: finished runs are read back, stopped ones resumed (core.py --resume), missing ones started; OUT/
study.json records the base and refuses another one.

Run: python bench/study.py                                   # the demo's scale, seeds 1 2 42 (CPU)
     python bench/study.py --base "--data gsm8k --steps 500 --eval-n 500" --seeds 1 --out runs/study-gsm8k
     python bench/study.py --variants big="--model1 Qwen/Qwen2.5-7B-Instruct --model2 none" core=...
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.header import print_header, print_wall_time  # noqa: E402

CORE_PY = Path(__file__).resolve().parent.parent / "core.py"
OURS = "--adv-group model --adv-scale none"  # core's advantages; the baselines use its scale
VARIANTS = [f"core={OURS}", "core-paper=--adv-group joint --adv-scale std",
            f"core-cold={OURS} --round-b-context cold", "single-k=--single --single-samples 2 --adv-scale none",
            "single=--single --adv-scale none", "alone=--model2 none --adv-scale none"]
METRICS = [("Pass@1 m1", "pass@1_m1"), ("Pass@1 m2", "pass@1_m2"), ("Pass@2 m1", "pass@2_m1"),
           ("Pass@2 m2", "pass@2_m2"), ("Team Pass@2", "team_pass@2"), ("p_12", "p_12@2"), ("vote@2", "team_vote@2")]


def run(core_py, base, flags, seed, out):
    """One run, or what is left of it: read back when finished, resumed when stopped, else started afresh.
    Returns (evaluation before, after, last metrics row)."""
    if not (out / "eval_after.json").exists():
        if out.exists() and not (out / "config.json").exists():  # stopped before anything was trained
            shutil.rmtree(out)
        args = ["--resume", str(out)] if out.exists() else base.split() + flags.split() + [
            "--seed", str(seed), "--out", str(out)]
        command = [sys.executable, str(core_py)] + args
        done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed (exit {done.returncode}); run the study again to resume "
                             f"it:\n{done.stderr[-2000:]}")
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    last = rows[-1] | {"seconds_total": sum(r.get("seconds", 0) for r in rows)}  # every step's, across resumes
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


def run_rows(variants, seeds, results):
    """Every run's numbers after training, a 'before' row per seed first (the untrained models: the same for every
    variant at a seed), with the run's sampled tokens (m1 + m2) and its time (steps and evaluations)."""
    lines = [f"{'run':<12}{'seed':>5}{'tokens':>10}{'minutes':>9}" + "".join(f"{label:>12}" for label, _ in METRICS)]
    for seed in seeds:
        before = next(b for v in variants for b, _, _ in [results[v, seed]] if b)
        lines.append(f"{'before':<12}{seed:>5}{'':>19}" + "".join(cell(before.get(key)) for _, key in METRICS))
        for v in variants:
            before, after, last = results[v, seed]
            tokens = last["sampled_tokens_total_m1"] + last["sampled_tokens_total_m2"]
            minutes = (last["seconds_total"] + before.get("seconds", 0) + after.get("seconds", 0)) / 60
            lines.append(f"{v:<12}{seed:>5}{tokens:>10,}{minutes:>9.1f}" + "".join(cell(after.get(key)) for _, key in METRICS))
    return lines


def cell(value):
    return f"{'-' if value is None else format(value, '.3f'):>12}"


def spread_row(name, results):
    """Each metric's spread over seeds after training: max - min."""
    cells = []
    for _, key in METRICS:
        values = [a[key] for _, a, _ in results if a.get(key) is not None]
        cells.append(f"{f'±{(max(values) - min(values)) / 2:.3f}' if values else '-':>17}")
    return f"{'  spread':<12}{'':>12}" + "".join(cells)


def check_study(out, base):
    """OUT/study.json: the base its runs share. A rerun with another base is refused."""
    record = out / "study.json"
    if record.exists() and json.loads(record.read_text())["base"] != base:
        raise SystemExit(f"{out} holds a study with --base \"{json.loads(record.read_text())['base']}\"; "
                         f"pass another --out for this one")
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"base": base}))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="--demo", help="core.py flags shared by every variant")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 42])
    parser.add_argument("--variants", nargs="+", default=VARIANTS, help="NAME=FLAGS pairs")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="runs/study", help="the study's folder (its runs; a rerun resumes)")
    parser.add_argument("--core", default=str(CORE_PY), help=argparse.SUPPRESS)  # tests run a stub
    args = parser.parse_args(argv)
    variants = dict(v.split("=", 1) for v in args.variants)
    out = Path(args.out)
    check_study(out, args.base)
    started = time.time()
    print_header("A study: each variant's flags on top of the same base, at several seeds")
    with ThreadPoolExecutor(args.workers) as pool:
        jobs = {(v, s): pool.submit(run, args.core, args.base, flags, s, out / f"{v}-{s}")
                for v, flags in variants.items() for s in args.seeds}
        results = {key: job.result() for key, job in jobs.items()}
    print(f"python core.py {args.base} + each variant's flags, seeds {' '.join(map(str, args.seeds))}; "
          f"means over seeds, after training (change from before); runs in {out}")
    print(f"{'variant':<12}{'tokens':>12}" + "".join(f"{label:>17}" for label, _ in METRICS) + "  Pass@1 up")
    lines = [(*row(v, [results[v, s] for s in args.seeds]), spread_row(v, [results[v, s] for s in args.seeds]))
             for v in variants]
    for _, line, spread in sorted(lines):
        print(line)
        print(spread)
    print("\n(spread: half the range over seeds, max - min over 2)\nper run:")
    for line in run_rows(variants, args.seeds, results):
        print(line)
    for v, flags in variants.items():
        print(f"  {v}: {flags or '(no extra flags)'}")
    print_wall_time(started)


if __name__ == "__main__":
    main()
