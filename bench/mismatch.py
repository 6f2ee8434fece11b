"""The rollout-update mismatch of the demo in bfloat16 on the CPU: core.py as it is (the adapters applied unmerged
while sampling, as in the update) against the LoRA merged into the weights for each rollout (what core.py did
before; in bf16 the merge rounds away every change under half a bf16 step of a weight):

    python bench/mismatch.py [--steps 10] [--seed 42] [--dtype bfloat16]

Each variant runs `python core.py --demo` for --steps of its 30 steps (no evaluation) in a temporary folder and
prints the per-step mismatch_m1/m2 and mismatch_kl_m1/m2 of its metrics.jsonl, then the range after step 1 (at
step 1 the adapters are still zero: merged or not, the weights are the same).
"""
import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import core  # noqa: E402
from bench.header import print_header  # noqa: E402
from bench.bench_core import merged  # noqa: E402


def run(variant, args, folder):
    generate = core.generate
    if variant == "merged":
        def merged_generate(policy, *rest, **options):
            with merged(policy.model):
                return generate(policy, *rest, **options)
        core.generate = merged_generate
    try:
        with contextlib.redirect_stdout(open(folder / f"{variant}.log", "w")):
            code = core.main(["--demo", "--dtype", args.dtype, "--seed", str(args.seed), "--stop-after",
                              str(args.steps), "--no-eval-before", "--out", str(folder / variant)])
    finally:
        core.generate = generate
    if code:
        sys.exit(f"{variant}: the demo exited with {code}; see {folder / variant}.log")
    return core.read_jsonl(folder / variant / "metrics.jsonl")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    args = parser.parse_args()
    print_header("The rollout-update mismatch of the demo with the adapters unmerged (core.py) and merged")
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("unmerged", "merged"):
            rows = run(variant, args, Path(tmp))
            label = "core.py, adapters unmerged" if variant == "unmerged" else "LoRA merged for each rollout"
            print(f"{label} (demo, {args.dtype}, seed {args.seed}): step, mismatch m1 / m2, KL m1 / m2")
            for r in rows:
                print(f"  {r['step']:>3}  {r['mismatch_m1']:.1e} / {r['mismatch_m2']:.1e}   "
                      f"{r['mismatch_kl_m1']:.1e} / {r['mismatch_kl_m2']:.1e}")
            later = [r[f"mismatch_m{m}"] for r in rows[1:] for m in (1, 2)]
            kls = [r[f"mismatch_kl_m{m}"] for r in rows[1:] for m in (1, 2)]
            print(f"  after step 1: mismatch {min(later):.1e} to {max(later):.1e}, KL {min(kls):.1e} to "
                  f"{max(kls):.1e}\n")


if __name__ == "__main__":
    main()
