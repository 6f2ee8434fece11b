"""Several runs' evaluations side by side, then the flags that differ between the runs:

    python tools/compare.py RUN [RUN ...]

Each cell is before -> after (change) for a training run, the one evaluation of an --eval-only run, or
"before X" / "after X" for a training run with only that evaluation (stopped early, or --no-eval-before).
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import core  # noqa: E402


def compare(folders):
    """The table of core.comparison_rows, then the config flags whose values differ among the runs they matter
    to (execution flags aside; training flags only between training runs)."""
    for folder in map(Path, folders):
        if not (folder / "config.json").is_file():
            raise core.UsageError(f"'{folder}' is not a run folder (no config.json)")
    configs = [json.loads((Path(f) / "config.json").read_text()) for f in folders]
    shown = [{k: "-" if config.get("eval_only") and k in core.TRAINING_ONLY else shown_value(v, Path(f))
              for k, v in config.items()} for f, config in zip(folders, configs)]
    ignored = {"out", "resume"} | core.RESUME_OVERRIDES
    differing = sorted(k for k in set().union(*shown) - ignored
                       if len({json.dumps(s.get(k)) for s in shown if s.get(k) != "-"}) > 1)
    tokens = [training_tokens(f, config.get("model2") == "none") for f, config in zip(folders, configs)]
    rows = core.comparison_rows(folders) + [("sampled tokens m1 + m2", tokens)]
    if len(folders) > 1:
        rows += [("flags that differ:", ["" if differing else "none"] * len(folders))]
        rows += [(f"  {core.flag_name(k)}", [str(s.get(k)) for s in shown]) for k in differing]
    core.print_rows(rows)


def training_tokens(folder, alone):
    """The tokens each model sampled in training (its compute, to compare runs by), from the last metrics row
    ('-' for model 2 of a run that trained model 1 alone)."""
    rows = core.read_jsonl(Path(folder) / "metrics.jsonl", lenient=True)
    last = rows[-1] if rows else {}
    if "sampled_tokens_total_m1" not in last:
        return "-"
    return f"{last['sampled_tokens_total_m1']:,} + " + ("-" if alone else f"{last['sampled_tokens_total_m2']:,}")


def shown_value(value, folder):
    """A config value; a path inside the run's own folder (the demo's models) reads RUN/..."""
    if isinstance(value, str) and value and Path(value).exists() and Path(value).resolve().is_relative_to(
            folder.resolve()):
        return "RUN/" + Path(value).resolve().relative_to(folder.resolve()).as_posix()
    return value


def main(argv=None):
    folders = sys.argv[1:] if argv is None else argv
    if not folders or folders[0] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr if not folders else sys.stdout)
        return 2 if not folders else 0
    try:
        compare(folders)
    except core.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
