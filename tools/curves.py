"""A run's learning curves and evaluations as one picture: RUN/curves.svg, a plain SVG any browser opens.

    python tools/curves.py RUN [RUN ...]

It reads RUN/metrics.jsonl, RUN/evals.jsonl and RUN/config.json, so it can be run at any time, during a run too.
Model 1 is blue and model 2 red in every panel (round B dashed); other curves have their own colours. A step
with nothing to count (a rescue rate when no model was eligible) is a gap, not a 0.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import core  # noqa: E402

PANELS = [  # title, metrics keys (evals.jsonl keys for the last panel; {k}: the evaluation's k)
    ("reward and its terms (c, div, cm unweighted)", ["reward", "correct", "div", "cm", "rescue", "format"]),
    ("training accuracy, round A (cold) and B", ["acc_A_m1", "acc_A_m2", "acc_B_m1", "acc_B_m2"]),
    ("rescue rate and hint leak", ["rescue_rate", "hint_leak"]),
    ("KL to the base model", ["kl_m1", "kl_m2"]),
    ("entropy per token", ["entropy_m1", "entropy_m2"]),
    ("traces with a negative advantage", ["neg_adv_m1", "neg_adv_m2"]),
    ("truncated samples", ["truncated"]),
    ("gradient norm before clipping", ["grad_norm_m1", "grad_norm_m2"]),
    ("rollout-update mismatch, mean |log p difference|", ["mismatch_m1", "mismatch_m2"]),
    ("rollout-update mismatch, KL (k3)", ["mismatch_kl_m1", "mismatch_kl_m2"]),
    ("evaluation (before, during, after)", ["team_pass@{k}", "pass@1_m1", "pass@1_m2", "p_12@{k}", "team_vote@{k}"]),
]
MODEL_COLORS = {"m1": "#1f77b4", "m2": "#d62728"}
OTHER_COLORS = ["#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf", "#7f7f7f"]


CHAR_WIDTH = 6.5  # px per character of the 11 px sans-serif text, a generous average (labels are cut to fit)


def write_curves(out):
    """RUN/curves.svg from metrics.jsonl and evals.jsonl: one small line chart per panel of PANELS, every curve
    named in its legend (one line each) with the models' names. A plain SVG file: no dependency, opens in any
    browser."""
    out = Path(out)
    metrics, evals = (core.read_jsonl(out / name, lenient=True) for name in ("metrics.jsonl", "evals.jsonl"))
    k = next((e["k"] for e in evals if "k" in e), 0)  # an evaluation with no question fitting has none
    config = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else {}
    names = {m: Path(str(config.get(f"model{m[1]}", m))).name for m in MODEL_COLORS}
    width, plot, cols, top = 400, 140, 3, 62
    height = plot + 66 + 14 * max(len(keys) for _, keys in PANELS)  # the plot, its axes, a legend line per curve
    heading = [f"{out.name} (step {metrics[-1]['step'] if metrics else 0})", f"m1 = {config.get('model1')}",
               f"m2 = {config.get('model2')}"]
    parts = [f'<text x="10" y="{18 + 16 * i}" font-size="{13 if i == 0 else 11}">{escape(cut(line, cols * width - 20))}'
             f'</text>' for i, line in enumerate(heading)]
    for i, (title, keys) in enumerate(PANELS):
        rows = evals if i == len(PANELS) - 1 else metrics
        x0, y0 = (i % cols) * width + 60, (i // cols) * height + 30 + top  # room for tick labels like 5.84e-05
        parts.append(svg_panel(title, [key.format(k=k) for key in keys], rows, names, x0, y0, width - 80, plot))
    return (out / "curves.svg").write_text(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{cols * width}" '
        f'height="{-(-len(PANELS) // cols) * height + top}" font-family="sans-serif" font-size="11">'
        f'<rect width="100%" height="100%" fill="white"/>{"".join(parts)}</svg>\n')


def cut(text, pixels):
    """The text, cut (with ...) to fit `pixels` at CHAR_WIDTH a character."""
    return core.shortened(text, int(pixels / CHAR_WIDTH))


def label_and_style(key, names, j):
    """The legend label (the model's name instead of m1/m2), the colour and the dash of one curve."""
    model = next((m for m in MODEL_COLORS if key.endswith(f"_{m}")), None)
    if model is None:
        return key, OTHER_COLORS[j % len(OTHER_COLORS)], ""
    label = key[:-3].replace("acc_A", "acc round A").replace("acc_B", "acc round B")
    return f"{label} {names[model]}", MODEL_COLORS[model], ' stroke-dasharray="5,3"' if "_B_" in key else ""


def svg_panel(title, keys, rows, names, x0, y0, w, h, ticks=4):
    """One chart: axes with tick values, a line per key over the rows' steps (broken where a row has no value),
    and a legend."""
    values = [(r["step"], r.get(key)) for key in keys for r in rows]
    xs = [x for x, y in values if isinstance(y, (int, float))] or [0, 1]
    ys = [y for _, y in values if isinstance(y, (int, float))] or [0, 1]
    xlo, xhi, ylo, yhi = min(xs), max(max(xs), min(xs) + 1), min(0.0, min(ys)), max(ys) if max(ys) > 0 else 1.0
    def sx(x): return x0 + (x - xlo) / (xhi - xlo) * w
    def sy(y): return y0 + h - (y - ylo) / (yhi - ylo) * h
    svg = [f'<text x="{x0}" y="{y0 - 10}" font-weight="bold">{escape(title)}</text>',
           f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#999"/>',
           f'<text x="{x0 + w}" y="{y0 + h + 26}" text-anchor="end">step</text>']
    for t in range(ticks + 1):
        y = ylo + (yhi - ylo) * t / ticks
        svg += [f'<line x1="{x0}" y1="{sy(y):.1f}" x2="{x0 + w}" y2="{sy(y):.1f}" stroke="#eee"/>',
                f'<text x="{x0 - 4}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.3g}</text>']
    for x in sorted({round(xlo + (xhi - xlo) * t / ticks) for t in range(ticks + 1)}):  # steps: whole, once each
        svg.append(f'<text x="{sx(x):.1f}" y="{y0 + h + 14}" text-anchor="middle">{x:.4g}</text>')
    for j, key in enumerate(keys):
        label, color, dash = label_and_style(key, names, j)
        segments, current = [], []
        for r in rows:  # a row without a value ends a segment: a gap, not a 0
            if isinstance(r.get(key), (int, float)):
                current.append((r["step"], r[key]))
            elif current:
                segments, current = segments + [current], []
        for pts in segments + [current] if current else segments:
            line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
            svg.append(f'<polyline points="{line}" fill="none" stroke="{color}" stroke-width="1.5"{dash}/>')
            svg += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{color}"/>'
                    for x, y in pts if len(rows) < 12 or len(pts) == 1]
        ly = y0 + h + 42 + j * 14  # one legend line per curve, cut to the panel's width
        svg.append(f'<line x1="{x0}" y1="{ly - 7}" x2="{x0 + 12}" y2="{ly - 7}" stroke="{color}" stroke-width="2"'
                   f'{dash}/><text x="{x0 + 16}" y="{ly - 3}">{escape(cut(label, w + 4))}</text>')
    return "".join(svg)


def escape(text):
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


if __name__ == "__main__":
    missing = [run for run in sys.argv[1:] if not (Path(run) / "config.json").is_file()]
    if len(sys.argv) < 2 or missing:
        sys.exit("usage: python tools/curves.py RUN [RUN ...] (run folders, each with a config.json)"
                 + (f"; not a run folder: {', '.join(missing)}" if missing else ""))
    for run in sys.argv[1:]:
        write_curves(Path(run))
        print(f"{Path(run) / 'curves.svg'}: open it in a browser")
