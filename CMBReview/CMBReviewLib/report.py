"""The study report: `review.json` (everything), `table4.csv`, `cases.csv`, `kappa.csv`, and a
self-contained `review.html` (inline CSS, no external file or script) with the paper's Table 4
per reader and their average, the kappas with their 95% intervals, and a per-case view."""

from __future__ import annotations

import csv
import html
import json
from pathlib import Path

from CMBDetectLib.io import atomic_path

CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:70em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.6em 0}th,td{border:1px solid #bbb;padding:.25em .6em;text-align:right}
th{background:#f0f0f0}td.l,th.l{text-align:left}.note{color:#555;font-size:.9em}
.warn{background:#fff4d6;border:1px solid #e0b84c;padding:.5em 1em}
"""

TABLE4_ROWS = (("correct", "Correct label"), ("incorrect", "Incorrect label"), ("missed", "Missed label"))


def _fmt(x, digits: int = 2) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _count(x) -> str:
    return f"{x:g}" if isinstance(x, (int, float)) else _fmt(x)


def _kappa_cell(k: dict) -> str:
    if k.get("kappa") is None:
        return f"n/a <span class='note'>({html.escape(k.get('note', 'undefined'))})</span>"
    ci = k.get("ci95")
    ci_text = f" ({ci[0]:.2f} to {ci[1]:.2f})" if ci and None not in ci else ""
    note = f" <span class='note'>({html.escape(k['note'])})</span>" if k.get("note") else ""
    return f"{k['kappa']:.2f}{ci_text}{note}"


def table4_text(stats: dict) -> list[list[str]]:
    """Table 4 as the paper prints it: 'count (percent%)' per reader and the average."""
    columns = [*stats["readers"], *(["average"] if "average" in stats["table4"] else [])]
    out = [["", *columns]]
    for key, title in TABLE4_ROWS:
        row = [title]
        for c in columns:
            t = stats["table4"][c]
            pct = t[f"{key}_percent"]
            row.append(f"{_count(t[key])} ({pct:.1f}%)" if pct is not None else _count(t[key]))
        out.append(row)
    return out


def html_page(stats: dict) -> str:
    e = html.escape
    s = stats["study"]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>CMBReview report: {e(str(s['study']))}</title><style>{CSS}</style></head><body>",
        f"<h1>Expert review of CMBDetect detections: {e(str(s['study']))}</h1>",
        f"<p class='note'>{s['cases']} cases, readers {e(', '.join(stats['readers']) or 'none')}; "
        f"candidates matched across readers within {stats['settings']['match_radius_mm']:g} mm. "
        "Definitions and units: docs/review.md. Research software, not for clinical use.</p>",
        "<h2>Table 4: clinical evaluation (labels of the detector, per reader)</h2><table>",
    ]
    t4 = table4_text(stats)
    parts.append("<tr>" + "".join(f"<th class='l'>{e(c)}</th>" if n == 0 else f"<th>{e(c)}</th>" for n, c in enumerate(t4[0])) + "</tr>")
    for row in t4[1:]:
        parts.append("<tr><td class='l'>" + e(row[0]) + "</td>" + "".join(f"<td>{e(c)}</td>" for c in row[1:]) + "</tr>")
    parts.append("<tr><td class='l'>Cases</td>" + "".join(f"<td>{_fmt(stats['table4'][c].get('cases'))}</td>" for c in t4[0][1:]) + "</tr>")
    pending = {r: stats["table4"][r]["pending"] for r in stats["readers"] if stats["table4"][r]["pending"]}
    parts.append("</table><p class='note'>Percentages are of each reader's correct + incorrect + missed labels; the average "
                 "column gives mean counts and their share of the mean total, as in the paper. Cases: those in which the reader "
                 "has a label counted here (average: any reader).</p>")  # fmt: skip
    if pending:
        parts.append("<p class='warn'>Not yet judged (left out of Table 4): " + e(", ".join(f"{r}: {n:g}" for r, n in pending.items())) + "</p>")

    reasons = stats.get("incorrect_reasons", {})
    parts.append("<h2>Incorrect labels by mimic</h2><table><tr><th class='l'>Mimic</th>" + "".join(f"<th>{e(r)}</th>" for r in stats["readers"]) + "</tr>")
    for reason in sorted({m for counts in reasons.values() for m in counts}, key=lambda m: (-sum(c.get(m, 0) for c in reasons.values()), m)):
        parts.append(f"<tr><td class='l'>{e(reason)}</td>" + "".join(f"<td>{reasons.get(r, {}).get(reason, 0)}</td>" for r in stats["readers"]) + "</tr>")
    parts.append("</table><p class='note'>What each reader judged the detector's incorrect labels to be (MARS/BOMBS mimics).</p>")

    la = stats["lesion_agreement"]
    parts.append(f"<h2>Agreement over {la['candidates']} candidates</h2><table><tr><th class='l'>Comparison</th><th>Candidates</th>"
                 "<th>Cases</th><th>Observed agreement</th><th>Kappa (95% CI)</th></tr>")  # fmt: skip
    rows = [(f"Cohen: {name} vs detector", k) for name, k in la["reader_vs_detector"].items()]
    rows += [(f"Cohen: {name}", k) for name, k in la["pairwise_readers"].items()] + [("Fleiss: all readers", la["fleiss_readers"])]
    for title, k in rows:
        parts.append(f"<tr><td class='l'>{e(title)}</td><td>{k['n']}</td><td>{_fmt(k.get('cases'))}</td>"
                     f"<td>{_fmt(k.get('observed_agreement'))}</td><td>{_kappa_cell(k)}</td></tr>")  # fmt: skip
    parts.append("</table>")
    agreed = "; ".join(f"{name}: {k.get('agreed_no', 'n/a')} of {k['n']} candidates" for name, k in la["reader_vs_detector"].items())
    parts.append(
        f"<p class='note'>Mean Cohen's kappa of the readers against the detector: {_fmt(la['mean_reader_vs_detector_kappa'])}. "
        "The paper reports 0.79 (computed \"for each validation case\", its unit not further stated), and this figure is not "
        "comparable with it: here the unit is the "
        "candidate, and the detector says \"no microbleed\" only of lesions some reader added, so a candidate that a reader "
        "and the detector both call \"no\" exists only where another reader added a lesion this one did not "
        f"({e(agreed)}). Without such agreed negatives, a reader who rejects false detections and adds missed lesions gets a "
        "kappa near or below 0 however right they are. The case-level kappas below (one item per case) are the nearer "
        "comparison. Cohen's CI: statsmodels' asymptotic standard error, clipped to [-1, 1]; Fleiss' CI: "
        f"{e(la['fleiss_readers'].get('ci_method', 'none'))}.</p>"
    )

    parts.append("<h2>Case-level agreement</h2><table><tr><th class='l'>Comparison</th><th>Cases</th><th>Presence: kappa (95% CI)</th>"
                 "<th>Count category (0, 1, 2-4, 5-10, &gt;10): kappa (95% CI)</th></tr>")  # fmt: skip
    ca = stats["case_agreement"]
    for name in stats["readers"]:
        presence = ca["presence"]["reader_vs_detector"][name]
        parts.append(f"<tr><td class='l'>{e(name)} vs detector</td><td>{_fmt(presence.get('cases', presence['n']))}</td><td>{_kappa_cell(presence)}</td>"
                     f"<td>{_kappa_cell(ca['count_category']['reader_vs_detector'][name])}</td></tr>")  # fmt: skip
    fleiss = ca["presence"]["fleiss_readers"]
    parts.append(f"<tr><td class='l'>Fleiss: all readers</td><td>{_fmt(fleiss.get('cases', fleiss['n']))}</td><td>{_kappa_cell(fleiss)}</td>"
                 f"<td>{_kappa_cell(ca['count_category']['fleiss_readers'])}</td></tr></table>")  # fmt: skip
    parts.append("<p class='note'>Cases: those the reader reviewed (Fleiss: those every reader reviewed).</p>")

    rt = stats["reading_time"]
    parts.append("<h2>Reading time per case</h2><table><tr><th class='l'>Who</th><th>Cases</th><th>Mean (s)</th><th>Median (s)</th></tr>")
    parts.append(f"<tr><td class='l'>Detector</td><td>{rt['detector']['cases']}</td><td>{_fmt(rt['detector']['mean_s'], 1)}</td><td>{_fmt(rt['detector']['median_s'], 1)}</td></tr>")
    for name, r in rt["readers"].items():
        parts.append(f"<tr><td class='l'>{e(name)}</td><td>{r['cases']}</td><td>{_fmt(r['mean_s'], 1)}</td><td>{_fmt(r['median_s'], 1)}</td></tr>")
    parts.append("</table>")
    if rt.get("reader_to_detector_ratio"):
        parts.append(f"<p class='note'>The readers' mean time per case is {rt['reader_to_detector_ratio']:.1f} times the detector's "
                     "(the paper: 146 s by hand against 2.8 s, 52 times). The detector's time is its whole run on the machine that "
                     "ran it; a reader's is the sum of their sittings on the case.</p>")  # fmt: skip

    parts.append("<h2>Per case</h2><table><tr><th class='l'>Case</th><th>Detector lesions</th><th>Detector (s)</th>")
    for name in stats["readers"]:
        parts.append(f"<th>{e(name)}: correct / incorrect / missed</th><th>{e(name)}: microbleeds</th><th>{e(name)} (s)</th>")
    parts.append("</tr>")
    for c in stats["cases"]:
        cells = [f"<td class='l'>{e(c['case'])}</td><td>{c['detector_lesions']}</td><td>{_fmt(c['detector_seconds'], 1)}</td>"]
        for name in stats["readers"]:
            r = c["readers"][name]
            pending = f" ({r['pending']} pending)" if r["pending"] else ""
            cells.append(f"<td>{r['correct']} / {r['incorrect']} / {r['missed']}{pending}</td><td>{_fmt(r['microbleeds'])} ({_fmt(r['category'])})</td><td>{_fmt(r['seconds'], 1)}</td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</table><p class='note'>Generated by CMBReview (CMBDetect). The default detection model is trained on synthetic data only.</p></body></html>")
    return "\n".join(parts)


def write_report(stats: dict, out: str | Path, html_page_too: bool = True) -> dict[str, Path]:
    """Write review.json, table4.csv, kappa.csv, cases.csv (and review.html); each file atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "review.json", "table4": out / "table4.csv", "kappa": out / "kappa.csv", "cases": out / "cases.csv"}
    with atomic_path(paths["json"]) as tmp:
        tmp.write_text(json.dumps(stats, indent=1) + "\n", encoding="utf-8")
    columns = [*stats["readers"], *(["average"] if "average" in stats["table4"] else [])]
    with atomic_path(paths["table4"]) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["label", *(f"{c}_{unit}" for c in columns for unit in ("count", "percent"))])
        for key, _ in TABLE4_ROWS:
            w.writerow([key, *(v for c in columns for v in (stats["table4"][c][key], stats["table4"][c][f"{key}_percent"]))])
        w.writerow(["cases", *(v for c in columns for v in (stats["table4"][c].get("cases"), ""))])
    with atomic_path(paths["kappa"]) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["unit", "scale", "comparison", "n", "cases", "kappa", "se", "ci95_low", "ci95_high", "note"])
        la = stats["lesion_agreement"]
        rows = [("candidate", "microbleed yes/no", f"{n} vs detector", k) for n, k in la["reader_vs_detector"].items()]
        rows += [("candidate", "microbleed yes/no", n, k) for n, k in la["pairwise_readers"].items()]
        rows.append(("candidate", "microbleed yes/no", "Fleiss: all readers", la["fleiss_readers"]))
        for scale, label in (("presence", "any microbleed"), ("count_category", "count category")):
            block = stats["case_agreement"][scale]
            rows += [("case", label, f"{n} vs detector", k) for n, k in block["reader_vs_detector"].items()]
            rows.append(("case", label, "Fleiss: all readers", block["fleiss_readers"]))
        for unit, scale, comparison, k in rows:
            ci = k.get("ci95") or [None, None]
            w.writerow([unit, scale, comparison, k.get("n"), k.get("cases"), k.get("kappa"), k.get("se"), ci[0], ci[1], k.get("note", "")])
    with atomic_path(paths["cases"]) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["case", "detector_lesions", "detector_seconds", "reader", "reviewed", "correct", "incorrect", "missed", "pending", "microbleeds", "category", "seconds"])
        for c in stats["cases"]:
            for name, r in c["readers"].items():
                w.writerow([c["case"], c["detector_lesions"], c["detector_seconds"], name, int(r["reviewed"]), r["correct"], r["incorrect"],
                            r["missed"], r["pending"], r["microbleeds"], r["category"], r["seconds"]])  # fmt: skip
    if html_page_too:
        paths["html"] = out / "review.html"
        with atomic_path(paths["html"]) as tmp:
            tmp.write_text(html_page(stats), encoding="utf-8")
    return paths


def summary_text(stats: dict) -> str:
    lines = ["Table 4 (clinical evaluation):"]
    for row in table4_text(stats):
        lines.append("  " + " | ".join(f"{c:>18}" for c in row))
    k = stats["lesion_agreement"]["mean_reader_vs_detector_kappa"]
    f = stats["lesion_agreement"]["fleiss_readers"]["kappa"]
    lines.append(f"mean Cohen's kappa readers vs detector: {_fmt(k)} (over candidates: not the paper's 0.79, see review.html); "
                 f"Fleiss' kappa across readers: {_fmt(f)}")
    return "\n".join(lines)
