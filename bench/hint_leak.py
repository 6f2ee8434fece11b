"""How much of the answer a CORE hint still gives away, on real reference solutions.

Each reference solution is rewritten to look like a model's output, then stripped with core.strip_answer exactly
as a teacher's trace is: GSM8K's calculator notes <<...>> are removed and its '#### X' line becomes '\\boxed{X}';
MATH-500 solutions already end in a \\boxed answer; a GPQA Diamond explanation gets 'The answer is \\boxed{L}'
with L the correct option's letter after core's seeded shuffle. Printed per dataset:
  hints         solutions whose stripped text is a usable hint (not empty, not just the answer)
  gold visible  fraction of hints from which a reader who knows what to look for reads the gold
                (core.gold_visible: the value as a number, the normalised MATH answer, the option's letter or
                text): the `hint_leak` that every training step logs
  checker       fraction of hints from which core.is_correct (last-number fallback included) reads the gold: what
                a model copying the hint's final number would score. It misses what the checker does not parse
                (for MATH it reads boxes only, which stripping removes, so it is 0 there by construction)

Run: python bench/hint_leak.py [--data-dir ../shared/data]
"""

import argparse
import csv
import io
import json
import re
import sys
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import core  # noqa: E402
from bench.header import print_header, print_wall_time  # noqa: E402


def gsm8k_traces(path):
    for line in open(path):
        row = json.loads(line)
        gold = core.gsm8k_gold(row["answer"])
        body = re.sub(r"<<[^>]*>>", "", row["answer"]).split("####")[0].rstrip()
        yield f"{body}\n\\boxed{{{gold}}}", core.Problem("", row["question"], gold, "number")


def math500_traces(path):
    for line in open(path):
        row = json.loads(line)
        yield row["solution"], core.Problem("", row["problem"], row["answer"], "math")


def gpqa_traces(zip_path):
    explanations = {}
    with zipfile.ZipFile(zip_path) as z:
        text = z.read("dataset/gpqa_diamond.csv", pwd=core.GPQA_PASSWORD).decode("utf-8")
    for row in csv.DictReader(io.StringIO(text)):
        explanations[row["Record ID"]] = row["Explanation"].strip()
    for problem in core.gpqa_problems(zip_path, seed=42):
        yield f"{explanations[problem.id]}\nThe answer is \\boxed{{{problem.gold}}}.", problem


def measure(traces):
    total = hints = visible = checker = 0
    for trace, problem in traces:
        total += 1
        hint = core.strip_answer(trace)
        if not hint or core.is_bare_answer(hint, problem.gold, problem.kind):
            continue
        hints += 1
        visible += core.gold_visible(hint, problem)
        checker += core.is_correct(hint, problem.gold, problem.kind)
    return total, hints, visible / max(hints, 1), checker / max(hints, 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parent.parent.parent / "shared" / "data"))
    data = Path(parser.parse_args().data_dir)
    started = time.time()
    print_header("How much of the answer a CORE hint still gives away, on the reference solutions (text processing "
                 "only: no model runs)")
    print("# gold visible = the hint_leak every training step logs; checker = core.is_correct (last-number fallback "
          "included) reads the gold from the hint\n")
    print(f"{'dataset':<22} {'solutions':>9} {'hints':>6} {'gold visible':>13} {'checker':>8}")
    for name, traces in [("gsm8k train", gsm8k_traces(data / "gsm8k" / "train.jsonl")),
                         ("gsm8k test", gsm8k_traces(data / "gsm8k" / "test.jsonl")),
                         ("math500 test", math500_traces(data / "math500" / "test.jsonl")),
                         ("gpqa diamond", gpqa_traces(data / "gpqa" / "dataset.zip"))]:
        total, hints, visible, checker = measure(traces)
        print(f"{name:<22} {total:>9} {hints:>6} {visible:>13.3f} {checker:>8.3f}")
    print_wall_time(started)


if __name__ == "__main__":
    main()
