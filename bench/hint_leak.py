"""How much of the answer a CORE hint still gives away, on real reference solutions (issue: hints and rewards).

Each reference solution is rewritten to look like a model's output (GSM8K: calculator notes <<...>> removed and the
'#### X' line replaced by '\\boxed{X}'; MATH-500 solutions already end in a \\boxed answer), then stripped with
core.strip_answer exactly as a teacher trace is. Printed per dataset:
  hints       solutions whose stripped text is a usable hint (not empty, not just the answer)
  extractor   fraction of hints from which core.extract_answer (GSM8K: its last-number fallback included) reads the
              gold: the `hint_leak` that every training step logs
  last line   fraction of hints whose last line contains the gold as a number (GSM8K) or as a string after
              normalisation (MATH): a looser reading, closer to what a model can copy

Run: python bench/hint_leak.py [--data-dir ../shared/data]
"""

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import core  # noqa: E402


def gsm8k_traces(path):
    for line in open(path):
        row = json.loads(line)
        gold = core.gsm8k_gold(row["answer"])
        body = re.sub(r"<<[^>]*>>", "", row["answer"]).split("####")[0].rstrip()
        yield f"{body}\n\\boxed{{{gold}}}", gold, "number"


def math500_traces(path):
    for line in open(path):
        row = json.loads(line)
        yield row["solution"], row["answer"], "math"


def in_last_line(hint, gold, kind):
    last = hint.strip().splitlines()[-1] if hint.strip() else ""
    if kind == "number":
        return any(core.parse_number(n) == core.parse_number(gold) for n in core.NUMBER_RE.findall(last))
    return core.normalize_math(gold) in core.normalize_math(last)


def measure(traces):
    total = hints = extracted = last_line = 0
    for trace, gold, kind in traces:
        total += 1
        hint = core.strip_answer(trace)
        if not hint or core.is_bare_answer(hint, gold, kind):
            continue
        hints += 1
        extracted += core.is_correct(hint, gold, kind)
        last_line += in_last_line(hint, gold, kind)
    return total, hints, extracted / hints, last_line / hints


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parent.parent.parent / "shared" / "data"))
    data = Path(parser.parse_args().data_dir)
    print(f"{'dataset':<22} {'solutions':>9} {'hints':>6} {'extractor':>10} {'last line':>10}")
    for name, traces in [("gsm8k train", gsm8k_traces(data / "gsm8k" / "train.jsonl")),
                         ("gsm8k test", gsm8k_traces(data / "gsm8k" / "test.jsonl")),
                         ("math500 test", math500_traces(data / "math500" / "test.jsonl"))]:
        total, hints, extracted, last_line = measure(traces)
        print(f"{name:<22} {total:>9} {hints:>6} {extracted:>10.3f} {last_line:>10.3f}")


if __name__ == "__main__":
    main()
