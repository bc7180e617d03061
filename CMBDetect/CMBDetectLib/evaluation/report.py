"""Evaluation reports: JSON (everything), per-case CSV, and one self-contained HTML page.

The HTML page carries its plots as base64 PNG and its styles inline, so it can be mailed
or archived as a single file. All numbers come from `evaluation.summarize`; nothing is
computed here except formatting, so the three outputs can never disagree.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from pathlib import Path
from typing import Any

from ..io import atomic_path

JSON_NAME = "evaluation.json"
CSV_NAME = "cases.csv"
HTML_NAME = "report.html"

RULE_ORDER = ("overlap", "touch", "distance")
RULE_COLOURS = {"overlap": "#b2182b", "touch": "#2166ac", "distance": "#1b7837"}
# Rules often agree on part of the curve: distinct dashes keep every curve visible.
RULE_STYLES = {"overlap": dict(ls="-", lw=2.4), "touch": dict(ls="--", lw=2.0), "distance": dict(ls=":", lw=2.4)}

HEADLINE = [
    ("pixel_dice", "Pixel Dice (pooled)"),
    ("pixel_precision", "Pixel precision (pooled)"),
    ("pixel_recall", "Pixel recall (pooled)"),
    ("mean_case_dice", "Pixel Dice, mean over cases"),
    ("overlap_precision", "Lesion precision (paper rule)"),
    ("overlap_recall", "Lesion recall (paper rule)"),
    ("overlap_f1", "Lesion F1 (paper rule)"),
    ("sensitivity_small", "Sensitivity, small lesions"),
    ("sensitivity_large", "Sensitivity, large lesions"),
    ("specificity_small", "Specificity (PPV), small lesions"),
    ("specificity_large", "Specificity (PPV), large lesions"),
    ("touch_f1", "F1, touch rule"),
    ("distance_f1", "F1, 5 mm centre rule"),
    ("overlap_fp_per_scan", "False positives per scan (paper rule)"),
    ("touch_fp_per_scan", "False positives per scan (touch)"),
    ("distance_fp_per_scan", "False positives per scan (5 mm)"),
    ("count_icc", "Per-case count ICC(2,1) with the truth"),
    ("lesion_auc", "Lesion ROC AUC"),
    ("patient_fpr", "Patient FPR"),
    ("patient_fnr", "Patient FNR"),
    ("patient_tpr", "Patient TPR"),
]


def _clean(value: Any) -> Any:
    """NaN and infinities have no place in JSON: they become null (undefined)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return _clean(value.item())  # numpy scalars
    return value


def write_json(summary: dict, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_clean(summary), indent=1, allow_nan=False) + "\n")
    return path


def write_cases_csv(summary: dict, path: str | Path) -> Path:
    """One row per case, evaluated or failed (status error with the problem)."""
    path = Path(path)
    rows = list(summary.get("per_case") or [])
    rows += [{"case": e["case"], "status": "error", "problem": e["problem"]} for e in summary["cases"]["errors"]]
    rows.sort(key=lambda r: str(r["case"]))
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    if not columns:
        columns = ["case", "status", "problem"]
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return path


# --------------------------------------------------------------------------- text


def fmt(value: Any, digits: int = 3, percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if percent:
        return f"{100 * float(value):.{max(digits - 2, 1)}f}%"
    return f"{float(value):.{digits}f}"


TABLE3_COLUMNS = [("dice", "DSC"), ("precision", "Precision"), ("recall", "Recall"), ("sensitivity", "Sensitivity"), ("specificity", "Specificity")]
TABLE3_ROWS = [("small", "Small lesions (2-5 mm)"), ("large", "Large lesions (5-10 mm)"), ("average", "In average")]


def table3_rows(summary: dict) -> list[list[str]]:
    """Table 3 of the paper as strings: DSC, precision and recall at pixel level restricted
    to the class; sensitivity and specificity (a lesion-level PPV) in percent."""
    t3 = summary.get("table3") or {}
    by_size = (summary.get("lesion") or {}).get("by_size", {})
    rules = (summary.get("lesion") or {}).get("rules", {})
    rows = []
    for key, label in TABLE3_ROWS:
        r = t3.get(key)
        if r is None:
            continue
        if key == "average":
            n_truth, n_pred = rules["overlap"]["n_truth"], rules["overlap"]["n_pred"]
        else:
            n_truth, n_pred = by_size[key]["n_truth"], by_size[key]["n_pred"]
        rows.append(
            [label]
            + [fmt(r[c]) for c, _ in TABLE3_COLUMNS[:3]]
            + [fmt(r[c], 4, percent=True) for c, _ in TABLE3_COLUMNS[3:]]
            + [str(n_truth), str(n_pred)]
        )
    return rows


def table3_text(summary: dict) -> str:
    header = ["", *[h for _, h in TABLE3_COLUMNS], "True", "Pred"]
    rows = [header] + table3_rows(summary)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join(lines)


def summary_text(summary: dict) -> str:
    """A few lines for the terminal: the Table 3 block and the figures other tools report."""
    c = summary["cases"]
    lines = [f"{c['evaluated']} cases evaluated ({c['controls']} controls), {c['failed']} failed"]
    if summary.get("table3"):
        lines += ["", table3_text(summary), ""]
        les = summary["lesion"]
        for rule in RULE_ORDER:
            r = les["rules"][rule]
            lines.append(
                f"{r['label']}: precision {fmt(r['precision'])}, recall {fmt(r['recall'])}, F1 {fmt(r['f1'])}, "
                f"{fmt(r['fp_per_scan'], 2)} FP per scan"
            )
        p = summary["patient"]
        lines.append(
            f"patients: TP {p['tp']}, FN {p['fn']}, FP {p['fp']}, TN {p['tn']}; FPR {fmt(p['fpr'])}, FNR {fmt(p['fnr'])}; "
            f"controls with a false positive: {p['controls_with_false_positive']} of {p['controls']}"
        )
        pix_auc = (summary["pixel"]["roc"] or {}).get("auc")
        les_auc = (les["roc"] or {}).get("auc")
        lines.append(f"AUC: pixel {fmt(pix_auc)}, lesion {fmt(les_auc)}")
        icc = summary.get("confidence_intervals", {}).get("count_icc") or {}
        interval = f" [{fmt(icc.get('low'))}, {fmt(icc.get('high'))}]" if icc.get("low") is not None else ""
        lines.append(f"per-case count ICC(2,1): {fmt(summary.get('count_icc'))}{interval}")
        by_mimic = les.get("false_positives_by_mimic")
        if by_mimic:
            lines.append("false positives (paper's rule) by mimic: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in by_mimic.items()))
    regions = summary.get("regions") or {}
    if regions.get("compared"):
        lines.append(f"MARS locations: region agreement {fmt(regions['region_agreement'])}, side {fmt(regions['side_agreement'])} "
                     f"over {regions['compared']} detected true lesions")  # fmt: skip
    for e in c["errors"]:
        lines.append(f"error: {e['case']}: {e['problem']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots


def _figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def plot_roc(summary: dict) -> bytes | None:
    """Pixel and lesion ROC (linear axes), and the pixel ROC again on a log FPR axis,
    where the detector's useful range (a few false voxels in millions) can be seen."""
    pixel = (summary.get("pixel") or {}).get("roc")
    lesion = (summary.get("lesion") or {}).get("roc")
    if not pixel and not lesion:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    ax = axes[0]
    ax.plot([0, 1], [0, 1], color="0.75", lw=1, ls="--", label="chance")
    if pixel and pixel.get("auc") is not None:
        ax.plot(pixel["fpr"], pixel["tpr"], color="#2166ac", lw=2, label=f"pixel (AUC {fmt(pixel['auc'])})")
    if lesion and lesion.get("auc") is not None:
        # Straight segments, not steps: tied scores make a diagonal, as in the trapezoid AUC.
        ax.plot(lesion["fpr"], lesion["tpr"], color="#b2182b", lw=2, label=f"lesion (AUC {fmt(lesion['auc'])})")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="False positive rate", ylabel="True positive rate", title="ROC")
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)

    ax = axes[1]
    if pixel and pixel.get("auc") is not None:
        pts = [(x, y) for x, y in zip(pixel["fpr"], pixel["tpr"]) if x and x > 0]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, color="#2166ac", lw=2)
            ax.set_xscale("log")
            ax.set_xlim(max(min(xs), 1e-8), 1)
        n_neg = pixel.get("background_voxels") or 0
        ax.set_title(f"Pixel ROC, log scale ({pixel['cases']} cases, {n_neg:,} background voxels)", fontsize=10)
    else:
        ax.text(0.5, 0.5, "no probability maps:\npixel ROC unavailable", ha="center", va="center", transform=ax.transAxes)
    ax.set(ylim=(0, 1.02), xlabel="False positive rate (log)", ylabel="True positive rate")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    png = _figure_png(fig)
    plt.close(fig)
    return png


def plot_froc(summary: dict) -> bytes | None:
    """Sensitivity against false positives per scan under each matching rule; the last
    point of each curve (marked) is the detector's own operating point."""
    froc = (summary.get("lesion") or {}).get("froc")
    if not froc:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {k: v["label"] for k, v in summary["lesion"]["rules"].items()}
    fig, ax = plt.subplots(figsize=(7, 4.6))
    top = 0.0
    for rule in RULE_ORDER:
        curve = froc["rules"].get(rule)
        if not curve or not curve["fp_per_scan"] or curve["sensitivity"][-1] is None:
            continue
        x, y = curve["fp_per_scan"], curve["sensitivity"]
        ax.step(x, y, where="post", color=RULE_COLOURS[rule], label=labels.get(rule, rule), **RULE_STYLES[rule])
        ax.plot([x[-1]], [y[-1]], "o", color=RULE_COLOURS[rule], ms=7)
        top = max(top, x[-1])
    for x in (0.125, 0.25, 0.5, 1, 2, 4, 8):
        if x <= max(top, 1.0):
            ax.axvline(x, color="0.85", lw=0.8, zorder=0)
    ax.set(xlim=(0, max(top * 1.05, 1.0)), ylim=(0, 1.02), xlabel="False positives per scan", ylabel="Lesion sensitivity")
    ax.set_title(f"FROC ({froc['cases']} cases; dot = operating point)", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(loc="lower right", fontsize=9)
    fig.tight_layout()
    png = _figure_png(fig)
    plt.close(fig)
    return png


# --------------------------------------------------------------------------- HTML


def _table(header: list[str] | None, rows: list[list[Any]], cls: str = "") -> str:
    head = "" if header is None else "<thead><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr></thead>"
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}">{head}<tbody>{body}</tbody></table>'


def _img(png: bytes | None, alt: str) -> str:
    if png is None:
        return f"<p class='note'>{html.escape(alt)}: unavailable (no probability maps).</p>"
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.errors td{color:#a00;text-align:left}.note{color:#555;font-size:.9em}img{max-width:100%}
.cases{font-size:.8em}
"""


def render_html(summary: dict) -> str:
    s = summary
    c = s["cases"]
    inputs = s.get("inputs", {})
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>CMBDetect evaluation</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>CMBDetect evaluation</h1>",
        "<p class='note'>Research software, not for clinical use. Definitions of every figure: docs/metrics.md.</p>",
    ]
    info = [["Predictions", inputs.get("pred", "")], ["Truth", inputs.get("truth", "")], ["Created", inputs.get("created", "")],
            ["Cases evaluated", c["evaluated"]], ["Controls", c["controls"]], ["Cases with lesions", c["with_lesions"]],
            ["Cases with a probability map", c["with_probability"]], ["Cases failed", c["failed"]]]
    parts.append(_table(None, info))
    if c["errors"]:
        parts.append("<h2>Cases not evaluated</h2>")
        parts.append(_table(["Case", "Problem"], [[e["case"], e["problem"]] for e in c["errors"]], "errors"))
    if not s.get("table3"):
        parts.append("<p>No case could be evaluated.</p></body></html>")
        return "".join(parts)

    parts.append("<h2>Summary in the form of the paper's Table 3</h2>")
    parts.append(_table(["", *[h for _, h in TABLE3_COLUMNS], "True lesions", "Predicted lesions"], table3_rows(s)))
    parts.append(
        "<p class='note'>DSC, precision and recall: voxels, pooled over cases, split by the size class of the true lesion "
        "(predicted voxels outside every true lesion go to the class of their predicted lesion). Sensitivity: true lesions "
        "detected under the paper's rule (&gt;40% covered). Specificity: the paper's term; here the fraction of predicted "
        "lesions that are correct (a positive predictive value), since true negatives do not exist for lesions. "
        "In average: all lesions.</p>"
    )

    ci = s.get("confidence_intervals") or {}
    method = ci.get("_method", {})
    rows = []
    for key, label in HEADLINE:
        v = ci.get(key)
        if v is not None:
            rows.append([label, fmt(v["estimate"]), fmt(v["low"]), fmt(v["high"])])
    if rows:
        parts.append("<h2>Headline figures with 95% confidence intervals</h2>")
        parts.append(_table(["Figure", "Estimate", "Low", "High"], rows))
        parts.append(f"<p class='note'>{html.escape(method.get('kind', ''))}, {method.get('resamples', '')} resamples, seed {method.get('seed', '')}.</p>")

    les = s["lesion"]
    parts.append("<h2>Lesion detection under each matching rule</h2>")
    rows = []
    for rule in RULE_ORDER:
        r = les["rules"][rule]
        fr = ((les.get("froc") or {}).get("rules") or {}).get(rule) or {}
        at1 = (fr.get("sensitivity_at_fp_per_scan") or {}).get("1")
        rows.append([r["label"], r["n_truth"], r["n_pred"], r["tp_truth"], r["tp_pred"], r["fn"], r["fp"],
                     fmt(r["precision"]), fmt(r["recall"]), fmt(r["f1"]), fmt(r["fp_per_scan"], 2), fmt(at1)])
    parts.append(_table(["Rule", "True", "Predicted", "Detected true", "Correct predicted", "Missed", "False positives",
                         "Precision", "Recall", "F1", "FP/scan", "Sens. at 1 FP/scan"], rows))
    cd = les["count_difference"]
    parts.append(f"<p class='note'>Count difference per case (predicted - true lesions): mean {fmt(cd['mean'], 2)}, mean absolute {fmt(cd['mean_absolute'], 2)}. "
                 f"True lesions outside 2-10 mm: {les['truth_outside_2_10mm']}.</p>")
    by_mimic = les.get("false_positives_by_mimic")
    if by_mimic:
        parts.append("<h3>Where the false positives lie (paper's rule; from the synthetic engine's mimic maps)</h3>")
        parts.append(_table([k.replace("_", " ") for k in by_mimic], [list(by_mimic.values())]))

    p = s["patient"]
    parts.append("<h2>Patient level (at least one correct lesion)</h2>")
    parts.append(_table(["TP", "FN", "FP", "TN", "FPR", "FNR", "TPR", "Specificity", "Controls", "Controls with a false positive"],
                        [[p["tp"], p["fn"], p["fp"], p["tn"], fmt(p["fpr"]), fmt(p["fnr"]), fmt(p["tpr"]), fmt(p["specificity"]),
                          p["controls"], p["controls_with_false_positive"]]]))
    if p["controls_with_false_positive_cases"]:
        parts.append("<p class='note'>Controls with a false positive: " + html.escape(", ".join(p["controls_with_false_positive_cases"])) + "</p>")

    regions = s.get("regions") or {}
    if regions.get("compared"):
        parts.append("<h2>MARS locations (detected true lesions with a known region)</h2>")
        parts.append(_table(["Lesions compared", "Region agreement", "Side agreement"],
                            [[regions["compared"], fmt(regions["region_agreement"]), fmt(regions["side_agreement"])]]))  # fmt: skip
        parts.append("<p class='note'>" + html.escape(regions.get("note", "")) + "</p>")

    parts.append("<h2>ROC</h2>")
    pix, lroc = s["pixel"]["roc"], les["roc"]
    notes = []
    if pix:
        bound = pix["auc_binning_error_bound"]
        notes.append(f"Pixel AUC {fmt(pix['auc'], 4)} over {pix['cases']} cases ({pix['lesion_voxels']:,} lesion and "
                     f"{pix['background_voxels']:,} background voxels; probabilities binned at 2^-20, AUC within "
                     f"{'n/a' if bound is None else format(bound, '.1e')} of the unbinned value).")
    if lroc:
        notes.append(f"Lesion AUC {fmt(lroc['auc'], 4)} over {lroc['candidates']} candidates ({lroc['positive']} positive, {lroc['negative']} negative): "
                     "predicted lesions scored by mean probability, plus missed true lesions scored by their own mean probability.")
    parts.append("<p class='note'>" + html.escape(" ".join(notes) or "No probability maps: ROC unavailable.") + "</p>")
    parts.append(_img(plot_roc(s), "ROC curves"))
    parts.append("<h2>FROC</h2>")
    parts.append(_img(plot_froc(s), "FROC curves"))
    froc = les.get("froc")
    if froc:
        pts = froc["fp_points"]
        rows = [[les["rules"][r]["label"], *[fmt(froc["rules"][r]["sensitivity_at_fp_per_scan"][f"{x:g}"]) for x in pts],
                 fmt(froc["rules"][r]["mean_sensitivity"])] for r in RULE_ORDER]
        parts.append(_table(["Sensitivity at FP/scan", *[f"{x:g}" for x in pts], "Mean"], rows))
        parts.append("<p class='note'>n/a: the curve stops before that rate (the detector's threshold allows fewer false positives).</p>")

    parts.append("<h2>Cases</h2>")
    cols = ["case", "control", "n_truth", "n_pred", "dice", "overlap_tp_truth", "overlap_fp", "touch_f1", "distance_f1", "patient", "notes"]
    heads = ["Case", "Control", "True", "Pred", "Dice", "Detected (paper)", "FP (paper)", "F1 touch", "F1 5 mm", "Patient", "Notes"]
    rows = [[fmt(r.get(k)) if isinstance(r.get(k), float) else ("" if r.get(k) is None else r.get(k)) for k in cols] for r in s.get("per_case", [])]
    parts.append(_table(heads, rows, "cases"))
    st = s["settings"]
    parts.append("<h2>Settings</h2>")
    parts.append(_table(["Setting", "Value"], [[k, v] for k, v in st.items()]))
    parts.append("</body></html>")
    return "".join(parts)


def write_html(summary: dict, path: str | Path) -> Path:
    path = Path(path)
    text = render_html(summary)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def write_report(summary: dict, out_dir: str | Path, html_page: bool = True) -> dict[str, Path]:
    """Write evaluation.json, cases.csv and report.html into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": write_json(summary, out_dir / JSON_NAME),
        "csv": write_cases_csv(summary, out_dir / CSV_NAME),
    }
    if html_page:
        paths["html"] = write_html(summary, out_dir / HTML_NAME)
    return paths
