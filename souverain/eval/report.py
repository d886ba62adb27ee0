"""An evaluation run as documents: ``report.json`` (the `EvalRun`, strict JSON) and
``report.html``, one self-contained page for the people who must sign a release off.

What the page holds is what an auditor applying the EU AI Act's testing and documentation
duties asks for: what was evaluated (model ids, server, base, date, the machine and the
software versions, the options, the data sets and their provenance), the verdict of the
policy and its reasons, per suite its figures with 95% confidence intervals (plots and a
table), base and candidate side by side, the paired differences with their intervals, how the
suite was scored, and the worst examples (prompt, answer, expected, score).

Self-contained and safe to open: plots are PNGs drawn by matplotlib's Agg backend and embedded
as ``data:`` URIs, the CSS is inline, and a Content-Security-Policy meta tag forbids every
other source (no network, no script but the page's own one, allowed by its hash, which only
checks that the plots decoded). Every text is HTML-escaped: answers are untrusted model output.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from souverain.eval.runner import EvalRun
from souverain.eval.suite import Metric, SuiteResult

WORST_EXAMPLES = 8
TEXT_CHARS = 600  # longer prompts/answers are cut in the tables (report.json has them whole)

CANDIDATE_COLOUR = "#1f5fa8"
BASE_COLOUR = "#9a9a9a"

# Runs on load: marks <body data-images="decoded N/M"> once every plot has decoded, so a
# headless browser (tests/test_eval_report.py) can tell a broken image from a drawn one.
CHECK_SCRIPT = (
    "window.addEventListener('load',function(){var i=document.images,ok=0;"
    "for(var k=0;k<i.length;k++){if(i[k].complete&&i[k].naturalWidth>0){ok++;}}"
    "document.body.setAttribute('data-images',(ok===i.length?'decoded ':'broken ')"
    "+ok+'/'+i.length);});"
)

CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0 auto;max-width:1100px;
padding:1.5em;color:#1d1d1f;background:#fff}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;
margin-top:2em}h3{margin-top:1.4em}
table{border-collapse:collapse;margin:.6em 0;width:100%}
th,td{border:1px solid #ddd;padding:.3em .5em;text-align:left;vertical-align:top}
th{background:#f4f4f6}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.pass{background:#e5f5e8;border:1px solid #2e7d32;padding:.6em 1em}
.fail{background:#fdecea;border:1px solid #c62828;padding:.6em 1em}
.none{background:#f4f4f6;border:1px solid #aaa;padding:.6em 1em}
.better{color:#2e7d32}.worse{color:#c62828}
pre,.text{white-space:pre-wrap;word-break:break-word;font:12px/1.35 ui-monospace,monospace;
margin:0;max-height:14em;overflow:auto}
img{max-width:100%;height:auto;border:1px solid #eee}
.muted{color:#666}dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}
dt{font-weight:600}dd{margin:0}
"""


def _e(value: Any) -> str:
    """HTML-escaped text of anything (quotes too: safe inside attributes)."""
    return html.escape("" if value is None else str(value), quote=True)


def _num(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "no data"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}" if abs(value) < 10 else f"{value:.2f}"


def _ci(metric: Metric) -> str:
    if metric.low is None or metric.high is None:
        return ""
    return f"[{_num(metric.low)}, {_num(metric.high)}]"


def _clip(text: str) -> str:
    text = "" if text is None else str(text)
    if len(text) <= TEXT_CHARS:
        return _e(text)
    return _e(text[:TEXT_CHARS]) + f'<span class="muted"> … ({len(text) - TEXT_CHARS} more ' \
                                   f"characters in report.json)</span>"


def _when(ts: int) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


# -- plots ---------------------------------------------------------------------------------
def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=96, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    return Figure  # not pyplot: no global state, nothing to close, thread-safe per figure


def _finite(value: float | None) -> bool:
    return value is not None and not math.isnan(value) and not math.isinf(value)


def _is_rate(m: Metric) -> bool:
    return 0.0 <= m.value <= 1.0 and (m.high is None or m.high <= 1.0)


def metrics_plot(cand: SuiteResult, base: SuiteResult | None) -> str | None:
    """Horizontal bars: each metric's value with its 95% CI, the base's beside it. Rates
    (values in [0, 1]) share one axis; any other figure (perplexity) gets its own."""
    names = [n for n, m in cand.metrics.items() if _finite(m.value)]
    if not names:
        return None
    groups: list[list[str]] = []
    rates = [n for n in names if _is_rate(cand.metrics[n])]
    if rates:
        groups.append(rates)
    by_family: dict[str, list[str]] = {}  # perplexity.en, perplexity.fr ... share an axis
    for n in names:
        if n not in rates:
            by_family.setdefault(n.split(".", 1)[0], []).append(n)
    groups += list(by_family.values())
    Figure = _figure()
    heights = [0.32 * len(g) * (2 if base else 1) + 0.7 for g in groups]
    fig = Figure(figsize=(8.5, sum(heights) + 0.4), layout="constrained")
    axes = fig.subplots(len(groups), 1, squeeze=False,
                        gridspec_kw={"height_ratios": heights})[:, 0]
    for ax, group in zip(axes, groups):
        rows = list(reversed(group))
        step = 1.0
        bar_h = 0.38 if base else 0.6
        for role, result, colour, offset in (
                ("candidate", cand, CANDIDATE_COLOUR, bar_h / 2 if base else 0.0),
                ("base", base, BASE_COLOUR, -bar_h / 2)):
            if result is None:
                continue
            ys, vals, lo, hi = [], [], [], []
            for i, name in enumerate(rows):
                m = result.metrics.get(name)
                if m is None or not _finite(m.value):
                    continue
                ys.append(i * step + offset)
                vals.append(m.value)
                lo.append(m.value - m.low if m.low is not None and _finite(m.low) else 0.0)
                hi.append(m.high - m.value if m.high is not None and _finite(m.high) else 0.0)
            ax.barh(ys, vals, height=bar_h, color=colour, alpha=0.85,
                    label=f"{role}: {result.model}",
                    xerr=[[max(0.0, v) for v in lo], [max(0.0, v) for v in hi]],
                    error_kw={"ecolor": "#222", "capsize": 3, "elinewidth": 1})
        ax.set_yticks([i * step for i in range(len(rows))])
        ax.set_yticklabels([_label(n, cand.metrics[n]) for n in rows], fontsize=8)
        if group is rates:
            ax.set_xlim(0, 1.0)
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=8)
    axes[-1].set_xlabel("value (bars: 95% confidence interval)", fontsize=8)
    fig.suptitle(f"{cand.suite}: candidate{' vs base' if base else ''}", fontsize=10)
    return _png(fig)


def _label(name: str, metric: Metric) -> str:
    return f"{name} ({'↑' if metric.higher_is_better else '↓'} better)"


def deltas_plot(suite: str, deltas: dict[str, dict[str, Any]]) -> str | None:
    """A forest plot: candidate - base per metric with its paired 95% CI; green where the
    difference is an improvement (in the metric's good direction), red where it is worse."""
    rows = [(n, d) for n, d in deltas.items() if _finite(d.get("delta"))]
    if not rows:
        return None
    rows.reverse()
    Figure = _figure()
    fig = Figure(figsize=(8.5, 0.4 * len(rows) + 1.0))
    ax = fig.subplots()
    for i, (_name, d) in enumerate(rows):
        good = d["delta"] >= 0 if d.get("higher_is_better", True) else d["delta"] <= 0
        colour = "#2e7d32" if good else "#c62828"
        low = d["low"] if _finite(d.get("low")) else d["delta"]
        high = d["high"] if _finite(d.get("high")) else d["delta"]
        ax.errorbar([d["delta"]], [i], xerr=[[d["delta"] - low], [high - d["delta"]]],
                    fmt="o", color=colour, ecolor=colour, capsize=4)
    ax.axvline(0.0, color="#444", linewidth=1)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{n} (n={d.get('n', '?')})" for n, d in rows], fontsize=8)
    ax.set_xlabel("candidate − base (paired bootstrap, 95% CI)", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"{suite}: paired differences", fontsize=10)
    return _png(fig)


# -- HTML ----------------------------------------------------------------------------------
def _img(b64: str | None, alt: str) -> str:
    if b64 is None:
        return '<p class="muted">No figure to plot (no metric had data).</p>'
    return f'<img src="data:image/png;base64,{b64}" alt="{_e(alt)}">'


def _verdict_html(run: EvalRun) -> str:
    v = run.verdict
    if v is None:
        return ('<div class="none">No policy was applied to this run (give one with '
                '<code>--policy FILE.json</code>).</div>')
    cls, word = ("pass", "PASSED") if v.get("passed") else ("fail", "FAILED")
    parts = [f'<div class="{cls}"><strong>Policy {word}</strong>']
    if v.get("reasons"):
        parts.append("<ul>" + "".join(f"<li>{_e(r)}</li>" for r in v["reasons"]) + "</ul>")
    parts.append("</div>")
    checks = v.get("checks") or []
    if checks:
        parts.append("<table><tr><th>threshold</th><th>bound</th><th>limit</th><th>value</th>"
                     "<th>result</th></tr>")
        for c in checks:
            parts.append(f"<tr><td>{_e(c.get('suite'))}.{_e(c.get('metric'))}</td>"
                         f"<td>{_e(c.get('bound'))}</td><td class=num>{_num(c.get('limit'))}"
                         f"</td><td class=num>{_num(c.get('value'))}</td>"
                         f"<td>{'met' if c.get('passed') else 'MISSED'}: {_e(c.get('text'))}"
                         f"</td></tr>")
        parts.append("</table>")
    parts.append(f"<details><summary>The policy as applied</summary><pre>"
                 f"{_e(json.dumps(v.get('policy'), indent=1))}</pre></details>")
    return "".join(parts)


def _summary_html(run: EvalRun) -> str:
    has_base = run.base is not None
    head = "<tr><th>suite</th><th>metric</th><th>candidate [95% CI]</th><th>n</th>"
    if has_base:
        head += "<th>base [95% CI]</th><th>candidate − base [95% CI]</th>"
    rows = [f"<table>{head}</tr>"]
    for suite, entry in run.suites.items():
        cand: SuiteResult = entry["candidate"]
        base: SuiteResult | None = entry.get("base")
        for name, m in cand.metrics.items():
            cells = (f"<tr><td>{_e(suite)}</td><td>{_e(_label(name, m))}</td>"
                     f"<td class=num>{_num(m.value)} {_ci(m)}</td><td class=num>{m.n}</td>")
            if has_base:
                bm = base.metrics.get(name) if base else None
                cells += f"<td class=num>{_num(bm.value) + ' ' + _ci(bm) if bm else '—'}</td>"
                cells += f"<td class=num>{_delta_cell(entry.get('deltas', {}).get(name))}</td>"
            rows.append(cells + "</tr>")
    rows.append("</table>")
    return "".join(rows)


def _delta_cell(d: dict[str, Any] | None) -> str:
    if not d or not _finite(d.get("delta")):
        return '<span class="muted">—</span>'
    good = d["delta"] >= 0 if d.get("higher_is_better", True) else d["delta"] <= 0
    cls = "better" if good and d["delta"] != 0 else ("worse" if not good else "")
    return (f'<span class="{cls}">{d["delta"]:+.3f}</span> [{_num(d.get("low"))}, '
            f'{_num(d.get("high"))}] n={_e(d.get("n"))}')


def _examples_html(cand: SuiteResult, base: SuiteResult | None) -> str:
    worst = sorted(cand.examples, key=lambda e: (e.score, e.id))[:WORST_EXAMPLES]
    if not worst:
        return '<p class="muted">The suite reported no per-item examples.</p>'
    base_by_id = {e.id: e for e in base.examples} if base is not None else {}
    head = "<tr><th>id</th><th>prompt</th><th>candidate's answer</th><th>expected</th>" \
           "<th>score</th>"
    if base is not None:
        head += "<th>base's answer (score)</th>"
    rows = [f"<table>{head}</tr>"]
    for ex in worst:
        row = (f"<tr><td>{_e(ex.id)}</td><td><div class=text>{_clip(ex.prompt)}</div></td>"
               f"<td><div class=text>{_clip(ex.answer)}</div></td>"
               f"<td><div class=text>{_clip(ex.expected)}</div></td>"
               f"<td class=num>{_num(ex.score, 2)}</td>")
        if base is not None:
            b = base_by_id.get(ex.id)
            row += (f"<td><div class=text>{_clip(b.answer)}</div> ({_num(b.score, 2)})</td>"
                    if b else "<td class=muted>—</td>")
        rows.append(row + "</tr>")
    rows.append("</table>")
    return "".join(rows)


def _suite_html(name: str, entry: dict[str, Any]) -> str:
    cand: SuiteResult = entry["candidate"]
    base: SuiteResult | None = entry.get("base")
    parts = [f'<section id="suite-{_e(name)}"><h2>Suite: {_e(name)}</h2>']
    if entry.get("description"):
        parts.append(f"<p>{_e(entry['description'])}</p>")
    parts.append(f"<p class=muted>{len(cand.examples)} items scored on the candidate in "
                 f"{cand.duration_s:.1f} s" + (f", on the base in {base.duration_s:.1f} s"
                                                if base else "") + ".</p>")
    parts.append("<h3>Figures</h3>")
    parts.append(_img(metrics_plot(cand, base), f"{name} metrics with 95% confidence intervals"))
    parts.append("<table><tr><th>metric</th><th>what it measures</th><th>candidate</th>"
                 "<th>95% CI</th><th>n</th>" + ("<th>base</th><th>base 95% CI</th>"
                                               if base else "") + "</tr>")
    for mname, m in cand.metrics.items():
        bm = base.metrics.get(mname) if base else None
        parts.append(f"<tr><td>{_e(_label(mname, m))}</td><td>{_e(m.description)}</td>"
                     f"<td class=num>{_num(m.value)}</td><td class=num>{_ci(m)}</td>"
                     f"<td class=num>{m.n}</td>"
                     + (f"<td class=num>{_num(bm.value) if bm else '—'}</td>"
                        f"<td class=num>{_ci(bm) if bm else ''}</td>" if base else "")
                     + "</tr>")
    parts.append("</table>")
    if base is not None:
        parts.append("<h3>Candidate − base, paired by item</h3>")
        parts.append(_img(deltas_plot(name, entry.get("deltas") or {}),
                          f"{name} paired differences"))
    notes = list(cand.notes)
    if notes:
        parts.append("<h3>How it was scored</h3><ul>"
                     + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>")
    if cand.settings:
        parts.append("<details><summary>Suite settings and data provenance</summary><pre>"
                     f"{_e(json.dumps(cand.settings, indent=1, default=str))}</pre></details>")
    parts.append(f"<h3>Worst examples (lowest score first, {WORST_EXAMPLES} at most)</h3>")
    parts.append(_examples_html(cand, base))
    parts.append("</section>")
    return "".join(parts)


def _identity_html(run: EvalRun) -> str:
    m = run.machine or {}
    cpu = m.get("cpu") or {}
    versions = m.get("versions") or {}
    rows = [
        ("Run", run.id), ("Date", _when(run.created_at)),
        ("Candidate model", run.candidate.get("model")),
        ("Server", run.candidate.get("url")),
        ("Base model", f"{run.base['model']} at {run.base['url']}" if run.base else
         "none (no comparison)"),
        ("Suites", ", ".join(run.suites)),
        ("Duration", f"{run.duration_s:.1f} s"),
        ("Machine (ran the evaluation)", f"{cpu.get('model', 'unknown')} · "
                                         f"{cpu.get('logical_cpus', '?')} logical CPUs · "
                                         f"{m.get('memory_gib', '?')} GiB · {m.get('os', '')}"),
        ("CPU features", cpu.get("flags_summary", "unknown")),
        ("Versions", ", ".join(f"{k} {v or 'not installed'}" for k, v in versions.items())
         + f", Python {m.get('python', '?')}"),
    ]
    if run.meta.get("command"):
        rows.append(("Command", run.meta["command"]))
    return "<dl>" + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in rows) + "</dl>"


def _provenance_html(run: EvalRun) -> str:
    o = run.options or {}
    parts = ["<table><tr><th>option</th><th>value</th></tr>"]
    for key in ("limit", "seed", "concurrency", "library_id"):
        parts.append(f"<tr><td>{_e(key)}</td><td>{_e(o.get(key))}</td></tr>")
    parts.append("</table>")
    files = o.get("files") or []
    if files:
        parts.append("<p>The user's own data files (SHA-256 at the time of the run):</p><table>"
                     "<tr><th>file</th><th>bytes</th><th>SHA-256</th></tr>")
        for f in files:
            parts.append(f"<tr><td>{_e(f.get('path'))}</td><td class=num>{_e(f.get('bytes'))}"
                         f"</td><td><code>{_e(f.get('sha256') or f.get('error'))}</code></td>"
                         "</tr>")
        parts.append("</table>")
    parts.append("<p>Built-in suites use prompts written by the souverain project and shipped "
                 f"inside souverain {_e((run.machine.get('versions') or {}).get('souverain'))}"
                 " (nothing is downloaded at run time). The bundled data files of each suite "
                 "(used unless the user's own files replace them: see the suite's notes):</p>"
                 "<table><tr><th>suite</th><th>file</th><th>bytes</th><th>SHA-256</th></tr>")
    for suite, entry in run.suites.items():
        for f in entry.get("bundled_data") or []:
            parts.append(f"<tr><td>{_e(suite)}</td><td>{_e(f.get('path'))}</td>"
                         f"<td class=num>{_e(f.get('bytes'))}</td>"
                         f"<td><code>{_e(f.get('sha256'))}</code></td></tr>")
    parts.append("</table>")
    cards = [("candidate", run.machine.get("candidate_card")),
             ("base", run.machine.get("base_card"))]
    for role, card in cards:
        if card:
            parts.append(f"<details><summary>The server's model card of the {role}</summary>"
                         f"<pre>{_e(json.dumps(card, indent=1))}</pre></details>")
    return "".join(parts)


def render_html(run: EvalRun) -> str:
    """The whole report as one self-contained HTML page."""
    script_hash = base64.b64encode(hashlib.sha256(CHECK_SCRIPT.encode()).digest()).decode()
    csp = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
           f"script-src 'sha256-{script_hash}'; base-uri 'none'; form-action 'none'")
    title = f"Evaluation of {run.candidate.get('model')} — {run.id}"
    body = [
        f"<h1>{_e(title)}</h1>",
        f"<p class=muted>Written by <code>souverain eval run</code> on {_e(_when(run.created_at))}."
        " Every figure is a mean over the items scored, with its 95% confidence interval "
        "(Wilson's for rates, a seeded percentile bootstrap otherwise); differences between "
        "candidate and base are paired by item (bootstrap over the items both answered).</p>",
        "<h2>What was evaluated</h2>", _identity_html(run),
        "<h2>Verdict</h2>", _verdict_html(run),
        "<h2>Summary</h2>", _summary_html(run),
        *(_suite_html(name, entry) for name, entry in run.suites.items()),
        "<h2>Options and data provenance</h2>", _provenance_html(run),
        "<h2>Limits of this evaluation</h2><ul>"
        "<li>Small item counts (a <code>--limit</code>) give wide intervals: read the CI, not "
        "only the value.</li>"
        "<li>Rule-based scorers (refusal, language) can be wrong on individual items; the worst "
        "examples are there to be read.</li>"
        "<li>The figures describe these prompts on this server with these settings; they are "
        "evidence for a release decision, not a guarantee of behaviour on other inputs.</li>"
        "</ul>",
    ]
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        f'<meta http-equiv="Content-Security-Policy" content="{_e(csp)}">'
        '<meta name=viewport content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{CSS}</style>"
        f"<script>{CHECK_SCRIPT}</script></head><body>"
        + "\n".join(body) + "</body></html>\n"
    )


def write_report(run: EvalRun, out_dir: Path) -> tuple[Path, Path]:
    """``out_dir``/report.json and ``out_dir``/report.html (the folder is created)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out_dir / "report.json", out_dir / "report.html"
    json_path.write_text(json.dumps(run.to_json(), indent=1, ensure_ascii=False,
                                    allow_nan=False) + "\n", encoding="utf-8")
    html_path.write_text(render_html(run), encoding="utf-8")
    return json_path, html_path
