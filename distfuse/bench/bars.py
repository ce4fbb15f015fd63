"""The performance bars of the benchmarks, checked against a results file.

Each op's bars (see the README's "Benchmarks" section) are evaluated row by row
from the JSON written by ``distfuse-bench``, so the verdict can be recomputed
from any committed results file:

    python -m distfuse.bench.bars benchmarks/results/*.json
    python -m distfuse.bench.bars --append-md benchmarks/results/*.json   # also add to the .md

A CPU reference run has no bars (its times are not measurements).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

KB, MB = 1 << 10, 1 << 20

# all_reduce
SMALL_MIN_BYTES, SMALL_MAX_BYTES = 4 * KB, 4 * MB     # graph rows: distfuse <= 1.00 x best peer
LARGE_MIN_BYTES, LARGE_MAX_BYTES = 16 * MB, 256 * MB  # distfuse <= 1.05 x best peer
LARGE_FACTOR = 1.05
BUSBW_BYTES, BUSBW_MIN_GBS = 256 * MB, 330.0
PEERS = ("nccl", "symm_one_shot", "symm_two_shot")
# matmul_all_reduce
DECODE_MAX_M, DECODE_FACTOR, DECODE_SLACK_US = 128, 1.2, 3.0  # graph: fused <= 1.2 x matmul + 3 us
PREFILL_MIN_M, PREFILL_FACTOR = 2048, 1.10                    # fused <= 1.10 x ideal
HIDDEN_MIN_M, HIDDEN_MIN_SHARE = 512, 0.443                   # DistFuse's 44.3 %
# decoder_layer: faster than the reference layer at every M (the bar is set at W = 4)
DECODER_WORLD = 4


@dataclass
class Bar:
    row: str
    bar: str
    value: Optional[float]
    limit: float
    met: bool

    def markdown(self) -> str:
        value = "n/a" if self.value is None else f"{self.value:.4g}"
        return f"| {self.row} | {self.bar} | {value} | {self.limit:.4g} | {'met' if self.met else 'MISSED'} |"


def _at_most(row: str, bar: str, value: Optional[float], limit: float) -> Bar:
    return Bar(row, bar, value, limit, value is not None and value <= limit)


def _at_least(row: str, bar: str, value: Optional[float], limit: float) -> Bar:
    return Bar(row, bar, value, limit, value is not None and value >= limit)


def _size(nbytes: int) -> str:
    return f"{nbytes // MB} MB" if nbytes >= MB else f"{nbytes // KB} KB"


def all_reduce_bars(doc: Dict[str, Any]) -> List[Bar]:
    bars: List[Bar] = []
    for r in doc["rows"]:
        nbytes, t = r["shape"]["bytes"], r["times_us"]
        label = f"{_size(nbytes)} {'graph' if r['graph'] else 'eager'}"
        peers = [t[p] for p in PEERS if t.get(p) is not None]
        best = min(peers) if peers else None
        ratio = t["distfuse"] / best if best and t.get("distfuse") is not None else None
        if r["graph"] and SMALL_MIN_BYTES <= nbytes <= SMALL_MAX_BYTES:
            bars.append(_at_most(label, "distfuse / best peer", ratio, 1.0))
        if LARGE_MIN_BYTES <= nbytes <= LARGE_MAX_BYTES:
            bars.append(_at_most(label, "distfuse / best peer", ratio, LARGE_FACTOR))
        if nbytes == BUSBW_BYTES:
            bars.append(_at_least(label, "busbw distfuse (GB/s)", r["busbw_GBs"].get("distfuse"), BUSBW_MIN_GBS))
        bars.append(_at_most(label, "#wrong", float(r["wrong_total"]), 0.0))
    return bars


def matmul_all_reduce_bars(doc: Dict[str, Any]) -> List[Bar]:
    bars: List[Bar] = []
    backend = "nccl"
    for r in doc["rows"]:
        s, t = r["shape"], r["times_us"]
        m, fused = s["M"], t.get("distfuse")
        label = f"{s['name']} M={m} {'row' if s['b_layout'] == 'row_major' else 'w.t()'} ({r['path']})"
        if fused is None:
            bars.append(Bar(label, "distfuse ran", None, 1.0, False))
            continue
        if r["graph"] and m <= DECODE_MAX_M:
            bars.append(_at_most(label, "fused (us) <= 1.2 x matmul + 3", fused,
                                 DECODE_FACTOR * t["matmul"] + DECODE_SLACK_US))
        if m >= PREFILL_MIN_M:
            bars.append(_at_most(label, "fused / ideal", fused / t["ideal"], PREFILL_FACTOR))
        if m >= HIDDEN_MIN_M:
            bars.append(_at_least(label, "hidden share", r.get("hidden_share"), HIDDEN_MIN_SHARE))
        unfused = [t[k] for k in (f"matmul+{backend}", "matmul+distfuse_ar") if t.get(k) is not None]
        if unfused:
            bars.append(_at_most(label, "fused / best unfused", fused / min(unfused), 1.0))
    return bars


def decoder_layer_bars(doc: Dict[str, Any]) -> List[Bar]:
    bars: List[Bar] = []
    for r in doc["rows"]:
        t = r["times_us"]
        label = f"M={r['shape']['tokens']} ({r['path']})"
        if t.get("distfuse") is None or t.get("reference") is None:
            bars.append(Bar(label, "distfuse / reference", None, 1.0, False))
            continue
        ratio = t["distfuse"] / t["reference"]
        bars.append(Bar(label, "distfuse / reference", ratio, 1.0, ratio < 1.0))
    return bars


CHECKS: Dict[str, Callable[[Dict[str, Any]], List[Bar]]] = {
    "all_reduce": all_reduce_bars,
    "matmul_all_reduce": matmul_all_reduce_bars,
    "decoder_layer": decoder_layer_bars,
}


def output_problems(doc: Dict[str, Any]) -> List[str]:
    """What the file says is wrong with the outputs: a distfuse output off the reference
    beyond the file's tolerance, an all-reduce with wrong elements. Not bars: a row whose
    output is wrong has no time worth comparing."""
    problems: List[str] = []
    tol = doc.get("tolerance")
    for r in doc["rows"]:
        s = r["shape"]
        label = (f"{s['name']} M={s['M']} {s['b_layout']}" if "M" in s else
                 f"M={s['tokens']}" if "tokens" in s else _size(s["bytes"]))
        label += " graph" if r["graph"] else " eager"
        errs = r.get("rel_err")
        errs = errs if isinstance(errs, dict) else {"distfuse": errs}
        for method, e in errs.items():
            if tol is not None and e is not None and not e <= tol:
                problems.append(f"{label}: {method} rel_err {e:.3g} > {tol:g}")
        for key in ("wrong_total", "wrong_ar"):
            if r.get(key):
                problems.append(f"{label}: {r[key]} wrong elements ({key})")
    return problems


def _peer_notes(doc: Dict[str, Any]) -> List[str]:
    """all_reduce rows whose best peer is not the best of all three (a peer that did not run)."""
    if doc.get("op") != "all_reduce":
        return []
    rows = [r for r in doc["rows"] if any(r["times_us"].get(p) is None for p in PEERS)]
    if not rows:
        return []
    missing = sorted({p for r in rows for p in PEERS if r["times_us"].get(p) is None})
    return [f"- {len(rows)} row(s) compare against fewer peers: {', '.join(missing)} did not run there."]


def evaluate(doc: Dict[str, Any]) -> Optional[List[Bar]]:
    """The bars of a results document; None for a CPU reference run or an op without bars."""
    if doc.get("cpu_reference") or doc.get("op") not in CHECKS:
        return None
    return CHECKS[doc["op"]](doc)


def markdown(doc: Dict[str, Any]) -> str:
    bars = evaluate(doc)
    if bars is None:
        return ""
    missed = [b for b in bars if not b.met]
    lines = [f"### Bars: {len(bars) - len(missed)} of {len(bars)} met", "",
             "| row | bar | value | limit | verdict |", "|---|---|---:|---:|---|"]
    lines += [b.markdown() for b in bars]
    problems = output_problems(doc)
    lines += [""] + ([f"- Outputs: {len(problems)} problem(s): " + "; ".join(problems)] if problems else
                     ["- Outputs: every checked output within the file's tolerance or exact."])
    lines += _peer_notes(doc)
    if doc["op"] == "decoder_layer" and doc.get("world_size") != DECODER_WORLD:
        lines += ["", f"- The decoder-layer bar is set at W = {DECODER_WORLD}; this run is W = {doc.get('world_size')}."]
    return "\n".join(lines) + "\n"


def summary_line(doc: Dict[str, Any]) -> Optional[str]:
    bars = evaluate(doc)
    if bars is None:
        return None
    missed = [f"{b.row}: {b.bar} {'n/a' if b.value is None else f'{b.value:.4g}'} (limit {b.limit:.4g})"
              for b in bars if not b.met]
    text = f"BARS {doc['op']} W={doc.get('world_size')}: {len(bars) - len(missed)}/{len(bars)} met"
    problems = output_problems(doc)
    return (text + ("; missed: " + "; ".join(missed) if missed else "")
            + ("; OUTPUT PROBLEMS: " + "; ".join(problems) if problems else ""))


def main(argv: Optional[List[str]] = None) -> int:
    from .results import load
    p = argparse.ArgumentParser(prog="python -m distfuse.bench.bars", description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", help="results JSON files written by distfuse-bench")
    p.add_argument("--append-md", action="store_true",
                   help="append the bars section to the .md next to each JSON (once)")
    args = p.parse_args(argv)
    for path in args.files:
        doc = load(path)
        text = markdown(doc)
        build = f", build {doc['build']}" if doc.get("build") else ""
        title = f"{os.path.basename(path)} ({doc.get('gpu_name', doc.get('gpu'))}, W={doc.get('world_size')}{build})"
        print(f"## {title}\n\n{text or 'no bars (CPU reference run or op without bars)'}\n")
        md = os.path.splitext(path)[0] + ".md"
        if args.append_md and text and os.path.exists(md):
            with open(md) as f:
                current = f.read()
            if "### Bars:" not in current:
                with open(md, "a") as f:
                    f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
