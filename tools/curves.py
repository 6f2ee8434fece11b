"""A run's learning curves and evaluations as one picture: RUN/curves.svg, a plain SVG any browser opens.

    python tools/curves.py RUN [RUN ...]

It reads RUN/metrics.jsonl, RUN/evals.jsonl and RUN/config.json, so it can be run at any time, during a run too.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import core  # noqa: E402

PANELS = [  # title, metrics keys (evals.jsonl keys for the last panel; {k}: the evaluation's k)
    ("reward and its terms (unweighted)", ["reward", "correct", "div", "cm", "rescue", "format"]),
    ("training accuracy, round A (cold) and B", ["acc_A_m1", "acc_A_m2", "acc_B_m1", "acc_B_m2"]),
    ("rescue rate and hint leak", ["rescue_rate", "hint_leak"]),
    ("KL to the base model", ["kl_m1", "kl_m2"]),
    ("entropy per token", ["entropy_m1", "entropy_m2"]),
    ("traces with a negative advantage", ["neg_adv_m1", "neg_adv_m2"]),
    ("truncated samples", ["truncated"]),
    ("gradient norm before clipping", ["grad_norm_m1", "grad_norm_m2"]),
    ("evaluation (before, during, after)", ["team_pass@{k}", "pass@1_m1", "pass@1_m2", "p_12@{k}", "team_vote@{k}"]),
]
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]


def write_curves(out):
    """RUN/curves.svg from metrics.jsonl and evals.jsonl: one small line chart per panel of PANELS, every curve
    named in its legend. A plain SVG file: no dependency, opens in any browser."""
    out = Path(out)
    metrics, evals = (core.read_jsonl(out / name, lenient=True) for name in ("metrics.jsonl", "evals.jsonl"))
    k = evals[0]["k"] if evals else 0
    config = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else {}
    width, height, cols, top = 380, 230, 3, 30
    parts = [f'<text x="10" y="18" font-size="13">{html_escape(out.name)}: m1 = {html_escape(config.get("model1"))}, '
             f'm2 = {html_escape(config.get("model2"))} (step {metrics[-1]["step"] if metrics else 0})</text>']
    for i, (title, keys) in enumerate(PANELS):
        rows = evals if i == len(PANELS) - 1 else metrics
        keys = [key.format(k=k) for key in keys]
        x0, y0 = (i % cols) * width + 50, (i // cols) * height + 30 + top
        parts.append(svg_panel(title, keys, rows, x0, y0, width - 70, height - 90))
    return (out / "curves.svg").write_text(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{cols * width}" height="{-(-len(PANELS) // cols) * height + top}" '
        f'font-family="sans-serif" font-size="11"><rect width="100%" height="100%" fill="white"/>{"".join(parts)}</svg>\n')


def svg_panel(title, keys, rows, x0, y0, w, h):
    """One chart: axes, a polyline per key over the rows' steps, the step and value range, a legend."""
    points = {key: [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))] for key in keys}
    xs = [x for pts in points.values() for x, _ in pts] or [0, 1]
    ys = [y for pts in points.values() for _, y in pts] or [0, 1]
    xlo, xhi, ylo, yhi = min(xs), max(max(xs), min(xs) + 1), min(0.0, min(ys)), max(ys) if max(ys) > 0 else 1.0
    def sx(x): return x0 + (x - xlo) / (xhi - xlo) * w
    def sy(y): return y0 + h - (y - ylo) / (yhi - ylo) * h
    svg = [f'<text x="{x0}" y="{y0 - 10}" font-weight="bold">{html_escape(title)}</text>',
           f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#999"/>',
           f'<text x="{x0 - 4}" y="{y0 + 4}" text-anchor="end">{yhi:.3g}</text>',
           f'<text x="{x0 - 4}" y="{y0 + h}" text-anchor="end">{ylo:.3g}</text>',
           f'<text x="{x0}" y="{y0 + h + 14}">{xlo}</text>',
           f'<text x="{x0 + w}" y="{y0 + h + 14}" text-anchor="end">step {xhi}</text>']
    for j, (key, pts) in enumerate(points.items()):
        color = COLORS[j % len(COLORS)]
        if pts:
            line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
            svg.append(f'<polyline points="{line}" fill="none" stroke="{color}" stroke-width="1.5"/>')
            svg += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{color}"/>' for x, y in pts if len(pts) < 12]
        lx, ly = x0 + (j % 3) * (w // 3), y0 + h + 30 + (j // 3) * 14
        svg.append(f'<rect x="{lx}" y="{ly - 8}" width="10" height="3" fill="{color}"/>'
                   f'<text x="{lx + 14}" y="{ly - 4}">{html_escape(key)}</text>')
    return "".join(svg)


def html_escape(text):
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


if __name__ == "__main__":
    if len(sys.argv) < 2 or any(not (Path(run) / "config.json").is_file() for run in sys.argv[1:]):
        sys.exit("usage: python tools/curves.py RUN [RUN ...] (run folders, each with a config.json)")
    for run in sys.argv[1:]:
        write_curves(Path(run))
        print(f"{Path(run) / 'curves.svg'}: open it in a browser")
