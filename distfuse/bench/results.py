"""Results files: ``<dir>/<op>_<gpu>_w<W>.json``, a markdown table (``.md``) and a plot (``.png``).

JSON schema (DESIGN.md, measuring)::

    {"op", "gpu", "world_size", "torch", "nccl", "date",
     "rows": [{"shape": {...}, "graph": bool, "times_us": {"<method>": us or null, ...}, ...extra}]}

plus descriptive fields (``gpu_name``, ``build``: the revision the distfuse library was built
from, ``dtype``, ``cpu_reference``, ``config``, ``notes``).
Non-finite numbers are written as null so that every file is strict JSON.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

from . import bars

CPU_LABEL = "CPU reference run (no GPU): not a performance measurement"


def gpu_tag(name: str) -> str:
    """A short file-name tag for a device name: 'NVIDIA H100 80GB HBM3' -> 'h100', 'cpu' -> 'cpu'."""
    low = name.lower()
    m = re.search(r"\b([a-z]{1,2}\d{2,4}[a-z]?)\b", low.replace("nvidia", " "))
    if m:
        return m.group(1)
    tag = re.sub(r"[^a-z0-9]+", "_", low).strip("_")
    return tag or "unknown"


def nccl_version() -> Optional[str]:
    try:
        v = torch.cuda.nccl.version()
    except Exception:  # noqa: BLE001  (CPU-only builds)
        return None
    if isinstance(v, tuple):
        return ".".join(str(x) for x in v)
    return str(v)


def environment(device: torch.device) -> Dict[str, Any]:
    """What every results file records about the machine and the build."""
    import distfuse
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = "cpu"
    return {
        "gpu": gpu_tag(name),
        "gpu_name": name if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "nccl": nccl_version(),
        "cuda": torch.version.cuda,
        "build": distfuse.build_id(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu_reference": device.type != "cuda",
    }


@dataclass
class Table:
    headers: List[str]
    rows: List[List[str]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def markdown(self) -> str:
        widths = [len(h) for h in self.headers]
        for r in self.rows:
            for i, c in enumerate(r):
                widths[i] = max(widths[i], len(c))

        def line(cells):
            return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"

        out = [line(self.headers), "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"]
        out += [line(r) for r in self.rows]
        return "\n".join(out)


def fmt(value: Optional[float], digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def fmt_bytes(n: int) -> str:
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} B"


def _clean(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, torch.dtype):
        return str(obj).replace("torch.", "")
    return obj


def stem(op: str, env: Dict[str, Any], world_size: int) -> str:
    return f"{op}_{env['gpu']}_w{world_size}"


def header_lines(op: str, doc: Dict[str, Any]) -> List[str]:
    lines = [f"## {op}", ""]
    if doc.get("cpu_reference"):
        lines += [f"**{CPU_LABEL}**", ""]
    lines += [
        f"- GPU: {doc['gpu_name']} (world size {doc['world_size']})",
        f"- torch {doc['torch']}, NCCL {doc['nccl'] or 'n/a'}, CUDA {doc.get('cuda') or 'n/a'}",
        f"- date: {doc['date']}",
    ]
    if doc.get("build"):
        lines.append(f"- distfuse build: {doc['build']}")
    if doc.get("dtype"):
        lines.append(f"- dtype: {doc['dtype']}")
    cfg = doc.get("config") or {}
    if cfg:
        lines.append("- timing: " + ", ".join(f"{k}={v}" for k, v in cfg.items()))
    return lines + [""]


def write_results(op: str, rows: List[Dict[str, Any]], env: Dict[str, Any], world_size: int,
                  table: Table, output_dir: str, extra: Optional[Dict[str, Any]] = None,
                  plot: Optional[Callable[[Any, List[Dict[str, Any]], str], Any]] = None) -> Dict[str, str]:
    """Write the JSON, markdown and (when matplotlib imports) PNG files; returns their paths,
    the markdown text under "markdown" and the one-line verdict on the bars under "bars"
    (None for a CPU reference run)."""
    os.makedirs(output_dir, exist_ok=True)
    base = os.path.join(output_dir, stem(op, env, world_size))
    doc: Dict[str, Any] = {"op": op, "gpu": env["gpu"], "world_size": world_size, "torch": env["torch"],
                           "nccl": env["nccl"], "date": env["date"]}
    doc.update({k: v for k, v in env.items() if k not in doc})
    doc.update(extra or {})
    doc["rows"] = rows
    doc = _clean(doc)
    with open(base + ".json", "w") as f:
        json.dump(doc, f, indent=1, allow_nan=False)
        f.write("\n")
    paths = {"json": base + ".json"}

    notes = list(table.notes)
    if plot is not None:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except Exception as exc:  # noqa: BLE001
            notes.append(f"PNG plot skipped: matplotlib is not importable ({type(exc).__name__}).")
        else:
            try:
                title = f"{op} - {doc['gpu_name']} x{world_size}"
                if doc.get("cpu_reference"):
                    title += " (CPU reference, not a measurement)"
                fig = plot(plt, doc["rows"], title)
                fig.savefig(base + ".png", dpi=110, bbox_inches="tight")
                plt.close(fig)
                paths["png"] = base + ".png"
            except Exception as exc:  # noqa: BLE001
                notes.append(f"PNG plot failed: {type(exc).__name__}: {exc}")

    text = "\n".join(header_lines(op, doc)) + "\n" + table.markdown() + "\n"
    if notes:
        text += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    bars_text = bars.markdown(doc)
    if bars_text:
        text += "\n" + bars_text
    with open(base + ".md", "w") as f:
        f.write(text)
    paths["md"] = base + ".md"
    paths["markdown"] = text
    paths["bars"] = bars.summary_line(doc)
    return paths


def load(path: str) -> Dict[str, Any]:
    with open(path) as f:
        return json.load(f)


REQUIRED_KEYS = ("op", "gpu", "world_size", "torch", "nccl", "date", "rows")


def forced_cell(us: str, forced: str, ran: Optional[str]) -> str:
    """A forced column's cell: its time, and the schedule that ran where the op took another
    one (a forced schedule that does not fit the shape falls back), so that no column shows
    one schedule's time under another's name."""
    if ran is None or ran == forced:
        return us
    return f"{us} ({ran})"


def gain_pct(before: Optional[float], after: Optional[float]) -> Optional[float]:
    """(before - after) / before in percent, None where either is missing."""
    return 100.0 * (before - after) / before if (before and after) else None


def fmt_pct(value: Optional[float]) -> str:
    return f"{value:.1f}%" if value is not None else "n/a"


def fmt_err(value: Optional[float]) -> str:
    """A relative error for a table cell."""
    return f"{value:.2e}" if value is not None else "n/a"


def dtype_name(dtype: torch.dtype) -> str:
    """The name a results file gives a dtype (bf16, fp16, fp32)."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))


def with_timing_details(row: Dict[str, Any], timings, errors_seen: Dict[str, str]) -> Dict[str, Any]:
    """`row` with every method's samples and host times, and the errors of the methods that
    failed (each method's first error also kept in `errors_seen`, for the table's notes)."""
    row["samples"] = {k: v.samples for k, v in timings.items()}
    row["host_us"] = {k: v.host_us for k, v in timings.items()}
    errors = {k: v.error for k, v in timings.items() if v.error}
    if errors:
        row["errors"] = errors
        for k, e in errors.items():
            errors_seen.setdefault(k, e)
    return row


def validate(doc: Dict[str, Any]) -> None:
    """Raise ValueError when ``doc`` does not follow the results schema."""
    for k in REQUIRED_KEYS:
        if k not in doc:
            raise ValueError(f"results file lacks the key {k!r}")
    if not isinstance(doc["rows"], list) or not doc["rows"]:
        raise ValueError("results file has no rows")
    for i, row in enumerate(doc["rows"]):
        for k in ("shape", "graph", "times_us"):
            if k not in row:
                raise ValueError(f"row {i} lacks the key {k!r}")
        if not isinstance(row["shape"], dict) or not isinstance(row["graph"], bool):
            raise ValueError(f"row {i}: shape must be an object and graph a bool")
        for name, v in row["times_us"].items():
            if v is not None and not isinstance(v, (int, float)):
                raise ValueError(f"row {i}: times_us[{name!r}] must be a number or null")


class Unavailable(RuntimeError):
    """A benchmark cannot run here (a missing module, shapes not divisible by W): skipped, not failed."""


@dataclass
class OpResult:
    """What a benchmark module returns on every rank (rank 0 writes it)."""
    op: str
    rows: List[Dict[str, Any]]
    table: Table
    extra: Dict[str, Any] = field(default_factory=dict)
    summary: str = ""                                   # one line for the final summary
    failures: List[str] = field(default_factory=list)   # correctness failures (non-empty: exit code 1)
    plot: Optional[Callable[[Any, List[Dict[str, Any]], str], Any]] = None
