"""The bench's report: the table (one row per run, a second row for llama.cpp's sequential
mode), printed with rich or as Markdown (BENCHMARKS.md), and the notes under it (bandwidth,
formats and bounds, how each engine ran concurrency, other processes' CPU share, the issue-3
targets against llama.cpp, the workload, the command).

The report is the JSON dict a session writes with ``--json``; ``--render`` prints a saved one.
"""

from __future__ import annotations

import os
from typing import Any


def fmt(x: Any, spec: str = ".0f") -> str:
    """``x`` formatted, or a dash where there is no figure."""
    return "—" if x is None else format(x, spec)


def build_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The table's header and rows (a second row for a run's sequential concurrency)."""
    levels = report["concurrency"]
    bw = report.get("bandwidth", {}).get("read_gbs_best")
    header = ["engine · weights", "load s", "prefill tok/s", "decode b=1 tok/s",
              "MB/token", "GB/s (% bound)"]
    copy = any(r.get("copy_tok_s") for r in report["runs"])
    if copy:  # the extraction workload: b=1 decode while the answer copies the prompt
        header += ["copy b=1 tok/s (accepted · tok/step)"]
    header += [f"x{n}: agg tok/s · TTFT p50/p95 s" for n in levels]
    header += ["RSS load / peak MB"]
    rows = []
    for r in report["runs"]:
        conc_sets = [("", r.get("concurrent") or {})]
        if r.get("concurrent_sequential"):
            conc_sets.append((" · sequential", r["concurrent_sequential"]))
        for suffix, conc in conc_sets:
            label = r["label"] + suffix
            if r.get("error"):
                rows.append([label, "error: " + r["error"][:120]] + [""] * (len(header) - 2))
                continue
            bpt = r.get("bytes_per_token")
            gbs = bpt * r["decode_tok_s"] / 1e9 if bpt and r.get("decode_tok_s") else None
            pct = f" ({100 * gbs / bw:.0f}%)" if gbs and bw else ""
            first = not suffix
            row = [label,
                   fmt(r.get("load_s"), ".1f") if first else "",
                   fmt(r.get("prefill_tok_s")) if first else "",
                   fmt(r.get("decode_tok_s"), ".1f") if first else "",
                   fmt(bpt / 1e6 if bpt else None) if first else "",
                   (fmt(gbs, ".1f") + pct) if first else ""]
            if copy:
                acc = r.get("copy_acceptance")
                row.append((fmt(r.get("copy_tok_s"), ".1f")
                            + (f" ({100 * acc:.0f}% · {r['copy_tokens_per_step']:.2f})"
                               if acc is not None else "")) if first else "")
            for n in levels:
                c = conc.get(str(n))
                row.append("—" if not c else f"{c['aggregate_tok_s']:.0f} · "
                           f"{c['ttft_p50_s']:.2f}/{c['ttft_p95_s']:.2f}")
            rss = (r.get("rss_load") or 0) / 1e6, (r.get("peak_rss") or 0) / 1e6
            row.append(f"{rss[0]:.0f} / {rss[1]:.0f}" if first else "")
            rows.append(row)
    return header, rows


def print_report(report: dict[str, Any], markdown: bool = False) -> None:
    """The table and its notes on stdout: a rich table, or Markdown (``markdown``, or where
    rich is missing)."""
    header, rows = build_rows(report)
    title = (f"souverain bench · {report['model']} · {report['threads']} threads · "
             f"{'QUICK · ' if report['quick'] else ''}{report['host']}")
    try:
        if markdown:
            raise ImportError
        from rich.console import Console
        from rich.table import Table

        console = Console(width=max(200, Console().width), highlight=False)
        table = Table(title=title, title_justify="left", show_lines=False)
        for i, h in enumerate(header):
            table.add_column(h, justify="left" if i == 0 else "right", overflow="fold")
        for row in rows:
            table.add_row(*row)
        console.print(table)
        for line in report_notes(report):
            console.print(line, markup=False, soft_wrap=True)
    except ImportError:
        print(f"**{title}**\n")
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row in rows:
            print("| " + " | ".join(row) + " |")
        print()
        for line in report_notes(report):
            print(line)


def report_notes(report: dict[str, Any]) -> list[str]:
    """The lines printed under the table."""
    lines = []
    bw = report.get("bandwidth") or {}
    if bw and "gemv_gbs_best" not in bw:  # a report saved before the GEMV figure existed
        lines.append(f"read bandwidth (torch.sum over {bw['tensor_mb']:.0f} MB, "
                     f"{bw['threads']} threads): best {bw['read_gbs_best']:.1f} GB/s")
    elif bw:
        lines.append(f"read bandwidth over {bw['tensor_mb']:.0f} MB of float32, {bw['threads']} "
                     f"threads (best / median): torch.sum {bw.get('sum_gbs_best', 0):.1f} / "
                     f"{bw.get('sum_gbs_median', 0):.1f} GB/s, fp32 GEMV "
                     f"{bw.get('gemv_gbs_best', 0):.1f} / {bw.get('gemv_gbs_median', 0):.1f} GB/s; "
                     f"bound = {bw['read_gbs_best']:.1f} GB/s")
    best = bw.get("read_gbs_best")
    for name, f in report.get("formats", {}).items():
        bound = f" -> bound {best * 1e9 / f['bytes_per_token']:.1f} tok/s" if best else ""
        lines.append(f"format {name} ({f['format']}): {f['bytes_per_token'] / 1e6:.0f} MB read "
                     f"per token at batch 1 (file {f['file_bytes'] / 1e6:.0f} MB){bound}")
    for r in report["runs"]:
        if r.get("bytes_per_token") and best and r["engine"] != "llama.cpp":
            lines.append(f"{r['label']}: in-memory weights {r.get('format', '?')}, "
                         f"{r['bytes_per_token'] / 1e6:.0f} MB/token -> bound "
                         f"{best * 1e9 / r['bytes_per_token']:.1f} tok/s")
    modes: dict[str, None] = {}  # an ordered set
    for r in report["runs"]:
        for conc in (r.get("concurrent") or {}, r.get("concurrent_sequential") or {}):
            for c in conc.values():
                modes.setdefault(f"{r['engine']}: {c['mode']}", None)
        if r.get("mode"):
            modes.setdefault(f"{r['label']}: {r['mode']}", None)
        for note in r.get("notes", []):
            modes.setdefault(f"{r['label']}: {note}", None)
    lines += [f"· {m}" for m in modes]
    shares = [(r["label"], r["others_cpu_share"]) for r in report["runs"]
              if r.get("others_cpu_share") is not None]
    if shares:
        lines.append(f"CPU used by OTHER processes while each engine ran (share of all "
                     f"{os.cpu_count()} CPUs): "
                     + "; ".join(f"{label} {100 * v:.0f}%" for label, v in shares))
        noisy = [label for label, v in shares if v > 0.10]
        if noisy:
            lines.append("WARNING: other work shared the cores during " + ", ".join(noisy)
                         + ": those figures are not reliable (llama.cpp's spinning thread "
                         "barriers suffer most); rerun on a quiet machine (--wait-quiet 600)")
    lines.extend(target_lines(report))
    w = report["workload"]
    lines.append(f"workload: prefill {w['prefill_len']} tokens; decode {w['new_tokens']} new "
                 f"tokens after {w['decode_prompt_len']}; concurrency {report['concurrency']} with "
                 f"prompts of {w['prompt_lengths'][0]}..{w['prompt_lengths'][1]} tokens, "
                 f"{w['new_tokens']} new "
                 "each; greedy, EOS ignored; aggregate = new tokens / wall time (prefill included)"
                 + (f"; copy: {w['new_tokens']} new tokens after a {w['copy_prompt_len']}-token "
                    "chat prompt asking to copy a record (extraction)"
                    if w.get("copy_prompt_len") else ""))
    lines.append(f"command: {report['command']}")
    return lines


def target_lines(report: dict[str, Any]) -> list[str]:
    """Issue-3 target ratios against llama.cpp in this run (same file where possible)."""
    runs = [r for r in report["runs"] if not r.get("error")]
    out = []
    for s in (r for r in runs if r["engine"] == "souverain"):
        ref = next((r for r in runs if r["engine"] == "llama.cpp"
                    and r.get("source") == s.get("source")), None)
        if ref is None or not ref.get("decode_tok_s"):
            continue
        parts = [f"decode b1 {s['decode_tok_s'] / ref['decode_tok_s']:.2f}x (target >= 0.75x)",
                 f"prefill {s['prefill_tok_s'] / ref['prefill_tok_s']:.2f}x (target >= 3x)"]
        c16 = (s.get("concurrent") or {}).get("16")
        if c16:
            ratio = c16["aggregate_tok_s"] / ref["decode_tok_s"]
            parts.append(f"agg x16 / llama.cpp b1 {ratio:.2f}x (target >= 4x)")
        if s.get("copy_tok_s") and ref.get("copy_tok_s"):
            parts.append(f"copy b1 {s['copy_tok_s'] / ref['copy_tok_s']:.2f}x"
                         + (" (target >= 2x with ngram)" if s.get("copy_acceptance") is not None
                            else ""))
        out.append(f"targets, {s['label']} vs {ref['label']}: " + "; ".join(parts))
    out.extend(speculative_lines(runs))
    return out


def speculative_lines(runs: list[dict[str, Any]]) -> list[str]:
    """Each souverain run with speculation against the same run without: the copy and free
    decode ratios, and whether the greedy copy answer is token for token the same."""
    out = []
    plain = {(r.get("source"), r.get("quantization")): r for r in runs
             if r["engine"] == "souverain" and not r.get("speculative")}
    llama = {r.get("source"): r for r in runs if r["engine"] == "llama.cpp"}
    for s in (r for r in runs if r["engine"] == "souverain" and r.get("speculative")):
        base = plain.get((s.get("source"), s.get("quantization")))
        if base is None:
            continue
        parts = []
        if s.get("copy_tok_s") and base.get("copy_tok_s"):
            parts.append(f"copy b1 {s['copy_tok_s'] / base['copy_tok_s']:.2f}x "
                         "(target >= 2x)")
            same = s.get("copy_ids") == base.get("copy_ids")
            parts.append("same greedy answer" if same else "DIFFERENT greedy answer")
        if s.get("decode_tok_s") and base.get("decode_tok_s"):
            parts.append(f"free decode b1 {s['decode_tok_s'] / base['decode_tok_s']:.2f}x "
                         "(target >= 1x)")
        ref = llama.get(s.get("source"))
        if ref is not None and ref.get("copy_ids") and s.get("copy_ids"):
            n = min(len(ref["copy_ids"]), len(s["copy_ids"]))
            agree = next((i for i in range(n) if ref["copy_ids"][i] != s["copy_ids"][i]), n)
            parts.append(f"first {agree} of {n} copy tokens equal to llama.cpp's")
        out.append(f"speculation, {s['label']} vs {base['label']}: " + "; ".join(parts))
    return out
