"""Several runs' evaluations side by side, then the flags that differ between the runs:

    python tools/compare.py RUN [RUN ...]

Each cell is before -> after (change) for a training run, the one evaluation of an --eval-only run, or
"before X" / "after X" for a training run with only that evaluation (stopped early, or --no-eval-before).
Below the table, a line marks each run whose numbers are not like for like with the first run's: another
evaluated question set or evaluation settings (the fingerprint in its evaluation records), other code (core.py's
sha256 in provenance.json), or another major version of torch or transformers.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import core  # noqa: E402


def compare(folders):
    """The table of comparison_rows, then the config flags whose values differ among the runs they matter
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
    rows = comparison_rows(folders) + [("sampled tokens m1 + m2", tokens)]
    if len(folders) > 1:
        rows += [("flags that differ:", ["" if differing else "none"] * len(folders))]
        rows += [(f"  {core.flag_name(k)}", [str(s.get(k)) for s in shown]) for k in differing]
    print_rows(rows)
    for line in provenance_marks(folders):
        print(line)


def comparison_rows(folders):
    """(label, one cell per run) rows of the runs' evaluations: before -> after (change), or an --eval-only
    run's single value, for each of core.HEADLINE's numbers."""
    runs = [run_evaluations(f) for f in folders]
    firsts = [next(iter(evals.values()), None) for evals in runs]
    facts = [provenance_facts(f) for f in folders]
    rows = [("", [Path(f).name for f in folders]),
            ("k, questions", [f"{e['k']}, {e['questions']}" if e else "-" for e in firsts]),
            ("question set", [question_set_cell(fact) for fact in facts]),
            ("code (core.py sha256)", [fact["code"] or "-" for fact in facts])]
    return rows + [(label, [compared_cell(evals, key) for evals in runs]) for label, key in core.HEADLINE]


def provenance_facts(folder):
    """What a run's numbers depend on besides its flags, None where not recorded (an older run): its last
    evaluation's question set (the fingerprint's first 12 characters) and settings; the world size, core.py's
    sha256 and the torch and transformers major versions of its last invocation (provenance.json). "mixed":
    the question sets of its evaluations, or the code of its invocations, that differ (a run resumed on other
    data or code)."""
    evals = list(run_evaluations(folder).values())
    last_eval = evals[-1] if evals else {}
    invocations = invocations_of(folder)
    last = invocations[-1] if invocations else {}
    versions = last.get("versions", {})
    facts = {"question set": last_eval.get("question_set", "")[:12] or None}
    facts |= {f"eval {key}": value for key, value in last_eval.get("eval_settings", {}).items()}
    facts |= {"world size": last.get("world_size"), "code": last["code"]["core_sha256"][:12] if last else None,
              "torch major": versions.get("torch", "").split(".")[0] or None,
              "transformers major": versions.get("transformers", "").split(".")[0] or None}
    mixed = []
    if len({e["question_set"] for e in evals if "question_set" in e}) > 1:
        mixed.append("its evaluations before and after training differ in question set")
    if len({i["code"]["core_sha256"] for i in invocations}) > 1:
        mixed.append("its invocations (provenance.json) ran different code")
    return facts | {"mixed": mixed}


def invocations_of(folder):
    """The entries of a run's provenance.json ([] if it has none, or one that does not read)."""
    path = Path(folder) / "provenance.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else []
    except ValueError:
        return []


def question_set_cell(fact):
    cell = fact["question set"] or "-"
    return f"{cell} (mixed)" if fact["mixed"] else cell


def provenance_marks(folders):
    """A line for each run whose provenance_facts differ from those of the first run that recorded them (a
    run from before provenance records none), or that is mixed, saying what differs. The question-set
    fingerprint includes the evaluation settings: where those differ, it tells nothing more."""
    facts = [provenance_facts(f) for f in folders]
    recorded = [i for i, fact in enumerate(facts) if fact["question set"] or fact["code"]]
    base = recorded[0] if recorded else 0
    lines = []
    for i, (folder, fact) in enumerate(zip(folders, facts)):
        first = facts[base]
        differs = [f"{what} {first[what]} vs {value}" for what, value in fact.items() if what != "mixed"
                   and i != base and value is not None and first.get(what) not in (None, value)]
        if any(what.startswith("eval ") for what in differs):
            differs = [what for what in differs if not what.startswith("question set")]
        if differs or fact["mixed"]:
            lines.append(f"! {Path(folder).name} is not like for like with {Path(folders[base]).name}: "
                         + "; ".join(differs + fact["mixed"]))
    return lines


def run_evaluations(folder):
    """A run's evaluations by name: eval_before and eval_after (training), or eval (--eval-only)."""
    files = {name: Path(folder) / f"{name}.json" for name in ("eval_before", "eval_after", "eval")}
    evals = {name: json.loads(path.read_text()) for name, path in files.items() if path.is_file()}
    return {name: e for name, e in evals.items() if e}  # {}: no test question fitted


def compared_cell(evals, key):
    """'before -> after (change)' of one metric of a run, an --eval-only run's value, 'before X' or 'after X'
    for a run with only that evaluation (stopped early, or --no-eval-before), or '-'."""
    k = next(iter(evals.values()))["k"] if evals else 0
    key = key.format(k=k, h=k // 2)
    values = {name: e[key] for name, e in evals.items() if key in e}
    if {"eval_before", "eval_after"} <= values.keys():
        before, after = values["eval_before"], values["eval_after"]
        return f"{before:.3f} -> {after:.3f} ({after - before:+.3f})"
    if not values:
        return "-"
    name, value = next(iter(values.items()))
    return f"{value:.3f}" if name == "eval" else f"{name.removeprefix('eval_')} {value:.3f}"


def print_rows(rows):
    """(label, cells) rows as a table: each column as wide as its widest cell (long paths included)."""
    label_width = max(22, *(len(label) + 2 for label, _ in rows))
    widths = [max(26, *(len(cells[c]) + 2 for _, cells in rows)) for c in range(len(rows[0][1]))]
    for label, cells in rows:
        print((f"{label:<{label_width}}" + "".join(f"{c:<{w}}" for c, w in zip(cells, widths))).rstrip())


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
