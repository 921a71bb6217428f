"""Evaluation report: Markdown and self-contained HTML, plus PNG plots.

The `result` dict `write_report` renders (JSON-safe, built by the eval driver):

    {
      "task": str,                      # task name
      "kind": str,                      # classification | tool_call | json_extraction | free_text
      "dataset_version": str,
      "n_test": int,
      "columns": {                      # one table column per system, in this order;
        "base": {metric: float, ...},   # each is a `task_metrics` dict ("score" first)
        "specialist": {...},
        "teacher": {...},
      },
      "n_validation": int,              # validation examples the threshold was certified on
      "calibration": {                  # `run.held_out_calibration`: chosen on validation,
        "split": "test",                # measured on test
        "threshold": float | None,      # None: the specialist never answers
        "coverage": float, "quality": float | None, "kept": int, "n": int,
        "target": float,                # test figures at the threshold, and the test target
        "delta": float,
        "validation": {"n": int, "coverage": float, "quality": float | None,
                       "lower_bound": float | None, "target": float | None,
                       "min_kept": int | None},
        "map": {"method": str, ...} | None,
        "ece": {"raw": float, "calibrated": float | None},          # on test
        "reliability": {"raw": [[mean prob, mean score, count], ...],
                        "calibrated": [...] | None},               # on test
        "curve": [[threshold, coverage, quality, lower_bound], ...],  # validation
        "test_curve": [[threshold, coverage, quality], ...],
      },
      "confusion": {"labels": [...], "matrix": [[int, ...], ...]} | None,
                                        # from `metrics.confusion_matrix`: rows are
                                        # reference labels, columns labels + "<invalid>"
      "worst": [                        # lowest-scoring test examples
        {"id": str, "prompt": str | list, "reference": dict | str,
         "prediction": dict | str, "score": float, "confidence": float | None},
      ],
    }

Non-string prompt/reference/prediction values are shown as indented JSON, and
each is cut to MAX_CHARS so a long prompt cannot bloat the report. Every
string from the result is escaped (HTML entities, and Markdown punctuation in
Markdown text), so log content cannot inject markup or script.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from factory.metrics import INVALID
from factory.io import write_atomic

CURVE_PNG = "coverage_quality.png"
RELIABILITY_PNG = "reliability.png"
CONFUSION_PNG = "confusion.png"
LEARNING_CURVE_PNG = "learning-curve.png"
MAX_CHARS = 4000
_MD_SPECIAL = re.compile(r"([\\`*_\[\]|])")
ROUTING_NOTE = ("The specialist answers when its raw confidence >= the threshold. The threshold and the map are "
                "fitted on the validation split; the test figures are measured on the held-out test split, "
                "which chose nothing.")


def write_report(out_dir: Path, result: dict[str, Any]) -> dict[str, Path]:
    """Write report.md, report.html and the PNG plots into out_dir (created if needed).

    Plots are drawn with matplotlib's object API (no pyplot, so no global
    backend switch and no figure leaks; PNG output uses Agg). The
    coverage-quality curves (validation, where the threshold was certified, with
    the lower confidence bound; test, where it is measured) and the reliability
    diagram (test, raw and calibrated confidence) are always drawn; the confusion
    matrix only when result["confusion"] is set (classification). Markdown links
    the PNG files; HTML embeds the same bytes as base64 so it is one portable
    file. Each file is written to a temporary sibling and moved into place with
    os.replace, so a reader never sees a half-written file.

    Returns {"markdown", "html", "curve", "reliability", ["confusion"]} -> written paths.
    Raises KeyError when a required key of `result` is missing.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = {CURVE_PNG: _curve_png(result["calibration"]),
              RELIABILITY_PNG: _reliability_png(result["calibration"])}
    if result.get("confusion"):
        images[CONFUSION_PNG] = _confusion_png(result["confusion"])
    paths = {"markdown": out_dir / "report.md", "html": out_dir / "report.html", "curve": out_dir / CURVE_PNG,
             "reliability": out_dir / RELIABILITY_PNG}
    if CONFUSION_PNG in images:
        paths["confusion"] = out_dir / CONFUSION_PNG
    for name, data in images.items():
        write_atomic(out_dir / name, data)
    write_atomic(paths["markdown"], _markdown(result, list(images)).encode())
    write_atomic(paths["html"], _html(result, images).encode())
    return paths


def _markdown(result: dict[str, Any], images: list[str]) -> str:
    lines = [f"# Evaluation report: {_md(result['task'])}", ""]
    lines += [f"- {_md(k)}: {_md(_fmt(v))}" for k, v in _facts(result)]
    names, rows = _table(result["columns"])
    lines += ["", "## Metrics", "", "| metric | " + " | ".join(_md(n) for n in names) + " |"]
    lines.append("|---" * (len(names) + 1) + "|")
    lines += ["| " + " | ".join(_md(cell) for cell in row) + " |" for row in rows]
    lines += ["", "## Routing calibration", "", _md(ROUTING_NOTE), ""]
    lines += [f"- {_md(k)}: {_md(v)}" for k, v in _calibration_facts(result["calibration"])]
    lines += ["", f"![coverage-quality curves]({CURVE_PNG})", "", f"![reliability diagram]({RELIABILITY_PNG})"]
    if CONFUSION_PNG in images:
        lines += ["", "## Confusion matrix", "", f"![confusion matrix]({CONFUSION_PNG})"]
    lines += ["", "## Worst examples"]
    for i, ex in enumerate(result.get("worst") or [], 1):
        lines += ["", f"### {i}. {_md(_fmt(ex.get('id')))}", "", _md(_score_line(ex))]
        for field in ("prompt", "reference", "prediction"):
            lines += ["", f"**{field}**", "", _fence(_as_text(ex.get(field)))]
    return "\n".join(lines) + "\n"


def _html(result: dict[str, Any], images: dict[str, bytes]) -> str:
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Evaluation report: {esc(str(result['task']))}</title>",
        "<style>body{font-family:sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3rem .6rem;text-align:right}"
        "td:first-child,th:first-child{text-align:left}pre{background:#f6f6f6;padding:.5rem;"
        "white-space:pre-wrap;word-break:break-word}img{max-width:100%}</style></head><body>",
        f"<h1>Evaluation report: {esc(str(result['task']))}</h1>",
        "<ul>" + "".join(f"<li>{esc(k)}: {esc(_fmt(v))}</li>" for k, v in _facts(result)) + "</ul>",
    ]
    names, rows = _table(result["columns"])
    parts.append("<h2>Metrics</h2><table><tr><th>metric</th>" + "".join(f"<th>{esc(n)}</th>" for n in names) + "</tr>")
    parts += ["<tr>" + "".join(f"<td>{esc(cell)}</td>" for cell in row) + "</tr>" for row in rows]
    parts.append("</table><h2>Routing calibration</h2>")
    parts.append(f"<p>{esc(ROUTING_NOTE)}</p>")
    facts = _calibration_facts(result["calibration"])
    parts.append("<ul>" + "".join(f"<li>{esc(k)}: {esc(v)}</li>" for k, v in facts) + "</ul>")
    parts.append(_img(images[CURVE_PNG], "coverage-quality curves"))
    parts.append(_img(images[RELIABILITY_PNG], "reliability diagram"))
    if CONFUSION_PNG in images:
        parts += ["<h2>Confusion matrix</h2>", _img(images[CONFUSION_PNG], "confusion matrix")]
    parts.append("<h2>Worst examples</h2>")
    for i, ex in enumerate(result.get("worst") or [], 1):
        parts.append(f"<h3>{i}. {esc(_fmt(ex.get('id')))}</h3>")
        parts.append(f"<p>{esc(_score_line(ex))}</p>")
        for field in ("prompt", "reference", "prediction"):
            parts.append(f"<p><strong>{field}</strong></p><pre>{esc(_as_text(ex.get(field)))}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _facts(result: dict[str, Any]) -> list[tuple[str, Any]]:
    return [
        ("kind", result["kind"]),
        ("dataset version", result["dataset_version"]),
        ("test examples", result["n_test"]),
        ("validation examples", result["n_validation"]),
    ]


def _score_line(example: dict[str, Any]) -> str:
    return f"score {_fmt(example.get('score'))}, confidence {_fmt(example.get('confidence'))}"


def _calibration_facts(cal: dict[str, Any]) -> list[tuple[str, str]]:
    val, ece = cal["validation"], cal["ece"]
    if cal["threshold"] is None:
        threshold = (f"none certified on {val['n']} validation examples (every request goes to the teacher)")
    else:
        threshold = f"{_fmt(cal['threshold'])} (certified on {val['n']} validation examples)"
    method = (cal["map"] or {}).get("method", "none (no validation examples)")
    return [
        ("threshold", threshold),
        ("guarantee", f"kept quality on new traffic >= the validation target with probability "
                      f">= {1 - cal['delta']:.2f} (delta {cal['delta']:g})"),
        ("validation target", _fmt(val["target"])),
        ("validation coverage", _fmt(val["coverage"])),
        ("validation quality of kept answers", _fmt(val["quality"])),
        (f"validation lower bound ({1 - cal['delta']:.0%})", _fmt(val["lower_bound"])),
        ("test target", _fmt(cal["target"])),
        ("test coverage (held out)", f"{_fmt(cal['coverage'])} ({cal['kept']} of {cal['n']})"),
        ("test quality of kept answers (held out)", _fmt(cal["quality"])),
        *_action_facts(cal),
        *_to_certify_facts(cal),
        ("calibration map (fitted on validation)", method),
        ("test ECE, raw confidence", _fmt(ece["raw"])),
        ("test ECE, calibrated", _fmt(ece["calibrated"])),
    ]


def _action_facts(cal: dict[str, Any]) -> list[tuple[str, str]]:
    """Per-action escalation, one line a group: its threshold and what it serves of the test split."""
    actions = cal.get("actions")
    if not actions:
        return []
    single = cal["single_threshold"]
    facts = [("served per action (held out)", f"thresholds per predicted action, each certified at delta "
                                               f"{actions['delta_each']:.3g}; one threshold alone would serve "
                                               f"{_fmt(single['coverage'])} at quality {_fmt(single['quality'])}")]
    for group, g in actions.get("by_group", {}).items():
        test = g["test"]
        facts.append((f"  {group}", f"threshold {_fmt(g['threshold'])}; validation {g['validation']['n']}; "
                                    f"test served {test['kept']} of {test['n']} ({_fmt(test['coverage'])}), "
                                    f"quality {_fmt(test['quality'])}"))
    return facts


def _to_certify_facts(cal: dict[str, Any]) -> list[tuple[str, str]]:
    need = cal.get("to_certify")
    if not need:
        return []
    if need["validation_answers"] is None:
        return [("to certify", "no operating point reaches the target: more logs of this quality cannot certify it; "
                               "a better specialist (recipe, base) is needed")]
    cap = (f"; and max_eval_samples >= {need['max_eval_samples']} in the recipe, which caps the validation answers"
           if need.get("max_eval_samples") else "")
    return [("to certify", f"~{need['more_calls']} more logged calls at the current error rate "
                           f"({need['validation_answers']} validation answers){cap}")]


def _table(columns: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Column names and rows [metric, value per column]; "score" first, then extras in first-seen order."""
    metrics = ["score"]
    for values in columns.values():
        metrics += [m for m in values if m not in metrics]
    rows = [[m] + [_fmt(values.get(m)) for values in columns.values()] for m in metrics]
    return list(columns), rows


def _curve_png(cal: dict[str, Any]) -> bytes:
    """Kept quality against coverage on validation (with its lower bound) and on test, the targets and the threshold."""
    fig = Figure(figsize=(7.2, 4.6), dpi=100)
    ax = fig.add_subplot()
    val, test = cal.get("curve") or [], cal.get("test_curve") or []
    if val:
        ax.plot([p[1] for p in val], [p[2] for p in val], marker=".", color="tab:blue",
                label=f"validation ({cal['validation']['n']})")
        ax.plot([p[1] for p in val], [p[3] for p in val], linestyle="--", color="tab:blue", alpha=0.6,
                label=f"validation lower bound ({1 - cal['delta']:.0%})")
    if test:
        ax.plot([p[1] for p in test], [p[2] for p in test], marker=".", color="tab:orange", label=f"test ({cal['n']})")
    if cal["validation"]["target"] is not None:
        ax.axhline(cal["validation"]["target"], color="tab:red", linestyle=":",
                   label=f"validation target {cal['validation']['target']:.3f}")
    ax.axhline(cal["target"], color="tab:red", linestyle="--", label=f"test target {cal['target']:.3f}")
    if cal["threshold"] is not None:
        ax.plot([cal["validation"]["coverage"]], [cal["validation"]["quality"]], "s", color="tab:blue", markersize=7,
                label=f"threshold {cal['threshold']:.3f} on validation: coverage {cal['validation']['coverage']:.2f}")
        single = cal.get("single_threshold") or cal
        if single["quality"] is not None:
            ax.plot([single["coverage"]], [single["quality"]], "o", color="tab:green", markersize=9,
                    label=f"threshold {cal['threshold']:.3f} on test: coverage {single['coverage']:.2f}")
    ax.set(xlabel="coverage (share answered by the specialist)", ylabel="quality of kept answers",
           xlim=(0, 1.02), title="Coverage vs quality: certified on validation, measured on test")
    ax.legend(loc="lower left", fontsize=8)
    return _png(fig)


def _reliability_png(cal: dict[str, Any]) -> bytes:
    """Mean score against mean confidence per bin on test, before and after the map; marker area ~ bin size."""
    fig = Figure(figsize=(5.2, 5.0), dpi=100)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="gray", linewidth=0.8, label="perfectly calibrated")
    series = [("raw confidence", cal["reliability"]["raw"], cal["ece"]["raw"], "tab:orange")]
    if cal["reliability"]["calibrated"] is not None:
        series.append(("calibrated", cal["reliability"]["calibrated"], cal["ece"]["calibrated"], "tab:green"))
    for label, bins, ece, color in series:
        ax.plot([b[0] for b in bins], [b[1] for b in bins], color=color, marker="o", label=f"{label} (ECE {ece:.3f})")
        ax.scatter([b[0] for b in bins], [b[1] for b in bins], s=[10 + 400 * b[2] / cal["n"] for b in bins],
                   color=color, alpha=0.3)
    ax.set(xlabel="mean confidence in bin", ylabel="mean score in bin", xlim=(0, 1), ylim=(0, 1.02),
           title=f"Reliability on the test split ({cal['n']} examples)")
    ax.legend(loc="upper left", fontsize=8)
    return _png(fig)


def write_learning_curve(out_dir: Path, points: list[dict[str, Any]]) -> dict[str, Path]:
    """`learning-curve.json` and its plot: the specialist's test score (base and teacher beside it)
    at each training-set size of `pipeline.learning_curve`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot()
    sizes = [p["examples"] for p in points]
    ax.plot(sizes, [p["specialist"] for p in points], marker="o", label="specialist")
    ax.plot(sizes, [p["served"] for p in points], marker=".", linestyle=":", label="served share (certified)")
    ax.axhline(points[-1]["teacher"], color="tab:green", linestyle="--", label="teacher")
    ax.axhline(points[-1]["base"], color="tab:gray", linestyle="--", label="base (zero-shot)")
    ax.set(xlabel="training examples", ylabel="test score", ylim=(0, 1.02), xscale="log",
           title="Learning curve: still rising = more logs help; flat = a bigger base")
    ax.legend(fontsize=8)
    paths = {"json": out_dir / "learning-curve.json", "png": out_dir / LEARNING_CURVE_PNG}
    write_atomic(paths["json"], json.dumps(points, indent=2))
    write_atomic(paths["png"], _png(fig))
    return paths


def _confusion_png(confusion: dict[str, Any]) -> bytes:
    rows = [str(label) for label in confusion["labels"]]
    cols = rows + [INVALID]
    matrix = confusion["matrix"]
    size = min(4 + 0.5 * len(cols), 16)
    fig = Figure(figsize=(size, size * 0.85), dpi=100)
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax)
    # parse_math=False: a label with "$" signs must not be read as TeX (or fail to parse).
    ax.set_xticks(range(len(cols)), labels=cols, rotation=45, ha="right", parse_math=False)
    ax.set_yticks(range(len(rows)), labels=rows, parse_math=False)
    ax.set(xlabel="predicted", ylabel="reference", title="Confusion matrix")
    if len(cols) <= 20:
        peak = max((max(r) for r in matrix), default=0)
        for i, row in enumerate(matrix):
            for j, count in enumerate(row):
                ax.text(j, i, str(count), ha="center", va="center", color="white" if count > peak / 2 else "black")
    return _png(fig)


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{alt}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _as_text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, indent=2, ensure_ascii=False)
    if len(text) > MAX_CHARS:
        text = f"{text[:MAX_CHARS]}\n... ({len(text) - MAX_CHARS} more characters)"
    return text


def _md(text: str) -> str:
    """Markdown-safe inline text: HTML escaped, Markdown punctuation backslashed, one line."""
    return _MD_SPECIAL.sub(r"\\\1", html.escape(str(text), quote=False)).replace("\r", " ").replace("\n", " ")


def _fence(text: str) -> str:
    """A fenced code block longer than any backtick run inside, so the text cannot close it."""
    ticks = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", text)), default=0))
    return f"{ticks}text\n{text}\n{ticks}"
