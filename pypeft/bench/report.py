"""report.md, report.json and the PNG plots of a `pypeft bench` run."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pypeft.bench.runs import BASELINE, Run

# (key, header, unit); every figure also as a ratio to full fine-tuning
COLUMNS = [
    ("accuracy", "test accuracy", ""),
    ("macro_f1", "macro-F1", ""),
    ("peak_rss_mib", "peak RSS", "MiB"),
    ("saved_mib", "saved activations / step", "MiB"),
    ("step_seconds", "step time", "s"),
    ("train_seconds", "training time", "s"),
    ("trainable_params", "trainable params", ""),
    ("disk_mib", "on disk", "MiB"),
]


def figures(run: Run) -> dict:
    """The figures of one run the report shows (None where the run failed or did not measure)."""
    s = run.summary
    if not run.ok:
        return {key: None for key, _, _ in COLUMNS}
    saved = s.get("saved_activation_bytes")
    return {
        "accuracy": s.get("accuracy_after"),
        "macro_f1": s.get("macro_f1_after"),
        "peak_rss_mib": s.get("peak_rss_mib"),
        "saved_mib": None if saved is None else round(saved / 2**20, 2),
        "step_seconds": round(s["train_seconds"] / s["steps"], 3) if s.get("steps") else None,
        "train_seconds": s.get("train_seconds"),
        "trainable_params": s.get("trainable_params"),
        "disk_mib": None if run.disk_bytes is None else round(run.disk_bytes / 2**20, 2),
    }


def _ratio(value, base):
    if value is None or not base:
        return None
    return round(value / base, 3)


def rows(runs: list[Run]) -> list[dict]:
    base = next((figures(r) for r in runs if r.label == BASELINE and r.ok), {})
    out = []
    for run in runs:
        f = figures(run)
        out.append({"label": run.label, "method": run.method, "quantize": run.quantize, "ok": run.ok,
                    "error": run.error, "wall_seconds": round(run.wall_seconds, 1), **f,
                    "ratio_to_full": {k: _ratio(f[k], base.get(k)) for k, _, _ in COLUMNS},
                    "majority_baseline": run.summary.get("majority_baseline"),
                    "confusion": run.summary.get("confusion_after"),
                    "classes": list(run.summary.get("recall_after", {}))})
    return out


def _cell(value, ratio) -> str:
    if value is None:
        return "-"
    text = f"{value:,}" if isinstance(value, int) else f"{value:g}"
    return text + (f" ({ratio:g}x)" if ratio is not None else "")


def write_markdown(path: Path, table: list[dict], context: dict) -> None:
    lines = [f"# pypeft bench: {context['data']} on {context['model']}", "",
             f"{context['when']}; {context['machine']}; command: `{context['command']}`", "",
             f"Each method is `pypeft finetune` in a fresh process ({context['settings']}). In brackets: the "
             "ratio to full fine-tuning. Saved activations: the bytes autograd kept for backward in the first "
             "training step. On disk: the adapter (peft's format; the whole model for full fine-tuning and "
             "TokenTune alone).", "",
             "| method | " + " | ".join(h + (f" ({u})" if u else "") for _, h, u in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 1) + "|"]
    for row in table:
        if row["ok"]:
            cells = [_cell(row[k], row["ratio_to_full"][k] if row["label"] != BASELINE else None)
                     for k, _, _ in COLUMNS]
        else:
            cells = [f"failed: {row['error']}"] + [""] * (len(COLUMNS) - 1)
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    baselines = {r["majority_baseline"] for r in table if r["ok"] and r["majority_baseline"] is not None}
    if baselines:
        text = ("Majority-class baseline (always the training split's most frequent class): "
                + ", ".join(f"{b:g}" for b in sorted(baselines)) + ".")
        below = [r["label"] for r in table if r["ok"] and r["accuracy"] is not None and r["accuracy"] <= max(baselines)]
        if below:
            text += f" Not above it: {', '.join(below)}."
        lines += ["", text]
    lines += ["", "Plots: " + ", ".join(f"[{p}]({p})" for p in context["plots"]), ""]
    _atomic_text(path, "\n".join(lines))


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, table: list[dict], context: dict) -> None:
    _atomic_text(path, json.dumps({"context": context, "runs": table}, indent=2) + "\n")


def pareto(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The points no other beats on both counts (lower x, higher accuracy), by x."""
    front, best = [], float("-inf")
    for x, y, label in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y, label))
            best = y
    return front


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    """Write the figure atomically (a half-written PNG never takes the name) and free it."""
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    _pyplot().close(fig)
    os.replace(tmp, path)


def _baseline(ax, table: list[dict], accuracies: list[float]) -> None:
    """The majority-class baseline as a line where it is near the points; where it lies far below them, the
    axis keeps to the points (else a 0.23 line squeezes 0.92-0.97 into a sliver) and the legend says where it is."""
    baselines = [r["majority_baseline"] for r in table if r["ok"] and r["majority_baseline"] is not None]
    if not baselines:
        return
    base, lo, hi = max(baselines), min(accuracies), max(accuracies)
    span = max(hi - lo, 0.02)
    if base >= lo - span:
        ax.axhline(base, color="red", linewidth=0.8, linestyle=":", label="majority-class baseline")
        return
    ax.set_ylim(lo - 0.15 * span, hi + 0.15 * span)
    ax.plot([], [], " ", label=f"majority-class baseline: {base:.3g}\n(below the axis)")


def plot_tradeoff(path: Path, table: list[dict], key: str, xlabel: str, title: str) -> bool:
    """Accuracy against `key`, one point per method, the Pareto front drawn; False when nothing to plot."""
    plt = _pyplot()
    points = [(r[key], r["accuracy"], r["label"]) for r in table
              if r["ok"] and r[key] is not None and r["accuracy"] is not None]
    if not points:
        return False
    fig, ax = plt.subplots(figsize=(9.5, 5), dpi=120)
    markers = "osD^v<>pP*Xh8"
    for n, (x, y, label) in enumerate(points):
        ax.scatter([x], [y], s=60, marker=markers[n % len(markers)], color=plt.cm.tab20((2 * n) % 20 + (n // 10) % 2),
                   label=label, zorder=3)  # tab20's dark shades, then its light ones: no colour repeats
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
    front = pareto(points)
    ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="grey", zorder=2, label="Pareto front")
    _baseline(ax, table, [p[1] for p in points])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: no point hidden
    _save(fig, path)
    return True


def plot_confusion(path: Path, row: dict) -> bool:
    plt = _pyplot()
    confusion, names = row.get("confusion"), row.get("classes")
    if not row["ok"] or not confusion or not names:
        return False
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2.5, 1.0 * len(names) + 2), dpi=120)
    image = ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"{row['label']}: test confusion matrix (accuracy {row['accuracy']:g})")
    top = max(max(r) for r in confusion) or 1
    for i, r in enumerate(confusion):
        for j, v in enumerate(r):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black")
    fig.colorbar(image, ax=ax, label="test examples")
    _save(fig, path)
    return True
