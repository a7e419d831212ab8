"""The inclusion flowchart (the paper's Figure 1) for a discovered cohort: JSON and PNG.

``flowchart.json``::

    {"files": {"found", "dicom", "not_dicom", "unreadable", "without_series"},
     "steps": [{"step", "label", "patients", "studies", "series",
                "excluded": {"<level>": {"<rule>": count}}}, ...]}

Each step's ``excluded`` counts what the rules removed between the previous step and this one,
at the level they work on (series, studies or patients); counts only, never identifiers.
"""

from __future__ import annotations

import json
from pathlib import Path

from sscflow.discover.select import NOT_CHOSEN, PATIENT_RULES, STUDY_RULES
from sscflow.discover.series import RULES

LABELS = {**RULES, **STUDY_RULES, **PATIENT_RULES, **NOT_CHOSEN}


def write_flowchart(doc: dict, folder: Path) -> tuple[Path, Path]:
    """Write ``flowchart.json`` and ``flowchart.png`` into ``folder``."""
    js, png = folder / "flowchart.json", folder / "flowchart.png"
    js.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    _draw(doc, png)
    return js, png


def _box_text(step: dict) -> str:
    parts = [f"{step['patients']} patients"]
    if step.get("studies") is not None:
        parts.append(f"{step['studies']} CT studies")
    if step.get("series") is not None:
        parts.append(f"{step['series']} series")
    return step["label"] + "\n" + ", ".join(parts)


def _excluded_text(step: dict) -> str:
    lines = []
    for level, rules in step.get("excluded", {}).items():
        n = sum(rules.values())
        if not n:
            continue
        noun = level if n != 1 else {"studies": "study"}.get(level, level.rstrip("s"))
        lines.append(f"Excluded: {n} {noun}")
        ordered = sorted(rules.items(), key=lambda x: (-x[1], x[0]))
        lines += [f"  {LABELS.get(r, r)}: {k}" for r, k in ordered]
    return "\n".join(lines)


def _draw(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = doc["steps"]
    line, box = 0.17, 0.6  # inches: one line of the exclusion text, one step box
    texts = [_excluded_text(s) for s in steps]
    gaps = [0.0] + [max(0.5, line * (t.count("\n") + 1) + 0.3) if t else 0.5 for t in texts[1:]]
    height = 0.6 + len(steps) * box + sum(gaps) + 0.2
    width = 10.0
    fig = plt.figure(figsize=(width, height))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.axis("off")
    f = doc["files"]
    ax.text(
        0.2,
        height - 0.2,
        f"{f['found']} files: {f['dicom']} DICOM read, {f['not_dicom']} "
        f"not DICOM, {f['unreadable']} unreadable, {f['without_series']} without a series "
        "(the last three skipped)",
        fontsize=8,
        va="top",
    )
    y, x = height - 0.6, 2.4
    for i, step in enumerate(steps):
        y -= gaps[i]
        if i:
            ax.annotate("", xy=(x, y), xytext=(x, y + gaps[i]), arrowprops={"arrowstyle": "->"})
            if texts[i]:
                mid = y + gaps[i] / 2
                ax.annotate(
                    "",
                    xy=(4.7, mid),
                    xytext=(x, mid),
                    arrowprops={"arrowstyle": "->", "color": "#833"},
                )
                ax.text(
                    4.8,
                    mid,
                    texts[i],
                    ha="left",
                    va="center",
                    fontsize=7.5,
                    bbox={"boxstyle": "square,pad=0.4", "fc": "#fbf0ee", "ec": "#833"},
                )
        ax.text(
            x,
            y - box / 2,
            _box_text(step),
            ha="center",
            va="center",
            fontsize=9,
            bbox={"boxstyle": "round,pad=0.5", "fc": "#eef3fb", "ec": "#335"},
        )
        y -= box
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
