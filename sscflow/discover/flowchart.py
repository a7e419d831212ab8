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

from sscflow.discover.select import PATIENT_RULES, STUDY_RULES
from sscflow.discover.series import RULES

LABELS = {**RULES, **STUDY_RULES, **PATIENT_RULES}


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
        lines.append(f"Excluded: {n} {level}")
        lines += [
            f"  {LABELS.get(r, r)}: {k}" for r, k in sorted(rules.items(), key=lambda x: -x[1])
        ]
    return "\n".join(lines)


def _draw(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = doc["steps"]
    heights = [1.0 + 0.32 * max(2, _excluded_text(s).count("\n") + 1) for s in steps]
    total = sum(heights) + 0.6
    fig, ax = plt.subplots(figsize=(10, total * 0.9))
    ax.set_xlim(0, 10)
    ax.set_ylim(0, total)
    ax.axis("off")
    f = doc["files"]
    ax.text(
        0.2,
        total - 0.25,
        f"{f['found']} files: {f['dicom']} DICOM read, {f['not_dicom']} not "
        f"DICOM, {f['unreadable']} unreadable, {f['without_series']} without a series "
        "(skipped)",
        fontsize=8,
        va="top",
    )
    y = total - 0.6
    centres = []
    for step, h in zip(steps, heights, strict=True):
        cy = y - 0.45
        ax.text(
            2.6,
            cy,
            _box_text(step),
            ha="center",
            va="center",
            fontsize=9,
            bbox={"boxstyle": "round,pad=0.5", "fc": "#eef3fb", "ec": "#335"},
        )
        exc = _excluded_text(step)
        if exc and centres:
            ax.text(
                5.6,
                (centres[-1] + cy) / 2,
                exc,
                ha="left",
                va="center",
                fontsize=7.5,
                bbox={"boxstyle": "square,pad=0.4", "fc": "#fbf0ee", "ec": "#833"},
            )
            ax.annotate(
                "",
                xy=(5.5, (centres[-1] + cy) / 2),
                xytext=(2.6, (centres[-1] + cy) / 2),
                arrowprops={"arrowstyle": "->", "color": "#833"},
            )
        if centres:
            ax.annotate(
                "",
                xy=(2.6, cy + 0.45),
                xytext=(2.6, centres[-1] - 0.45),
                arrowprops={"arrowstyle": "->"},
            )
        centres.append(cy)
        y -= h
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
