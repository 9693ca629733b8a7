"""Run outputs on rank 0: metrics.jsonl, a progress line, optional TensorBoard (docs/DESIGN.md "Command line and
outputs").

metrics.jsonl holds one JSON object per logged step; floats are written with Python's round-trip repr,
so a resumed run's losses can be compared bit for bit; NaN/inf become null (JSON has neither).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None, tensors/numpy scalars -> Python numbers, recursing into containers."""
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple, dict)):
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def dumps(obj: Any) -> str:
    return json.dumps(_clean(obj), allow_nan=False)


def read_jsonl(path: Path) -> List[Dict[str, Any]]:
    """All complete lines of a JSONL file (a half-written last line of a killed run is ignored)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def truncate_after(path: Path, step: int) -> None:
    """Keep only rows with row['step'] <= step (resume: drop what a killed run logged after its checkpoint)."""
    path = Path(path)
    if not path.is_file():
        return
    rows = [r for r in read_jsonl(path) if r.get("step", -1) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON file write (temp file + os.replace)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_clean(obj), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
    """Rank-0 progress: a carriage-return line on a TTY, else one plain line per logged step."""

    def __init__(self, total_steps: int, start_step: int = 0, enabled: bool = True, stream=None):
        self.stream = stream or sys.stderr
        self.total = total_steps
        self.start_step = start_step
        self.t0 = time.perf_counter()
        self.bar = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self._width = 0

    def eta(self, step: int) -> float:
        done = step - self.start_step
        if done <= 0:
            return float("nan")
        return (time.perf_counter() - self.t0) / done * (self.total - step)

    def line(self, step: int, fields: Dict[str, float]) -> str:
        parts = [f"step {step}/{self.total}"]
        for k, v in fields.items():
            if v is not None and not (isinstance(v, float) and math.isnan(v)):
                parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
        eta = self.eta(step)
        if math.isfinite(eta):
            parts.append(f"ETA {_fmt_time(eta)}")
        return " | ".join(parts)

    def update(self, step: int, fields: Dict[str, float], logged: bool) -> None:
        """Redraw the bar every step on a TTY; otherwise print only on logged steps."""
        if self.bar:
            text = self.line(step, fields)
            pad = max(0, self._width - len(text))
            self.stream.write("\r" + text + " " * pad)
            self.stream.flush()
            self._width = len(text)
        elif logged:
            print(self.line(step, fields), file=sys.stdout, flush=True)

    def close(self) -> None:
        if self.bar and self._width:
            self.stream.write("\n")
            self.stream.flush()


class MetricsWriter:
    """Appends rows to run_dir/metrics.jsonl (and TensorBoard scalars when asked and installed).

    Only rank 0 writes; on other ranks every method is a no-op."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = False, filename: str = "metrics.jsonl"):
        self.enabled = enabled
        self.path = Path(run_dir) / filename
        self._fh = open(self.path, "a") if enabled else None
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except Exception as exc:  # tensorboard not installed: say so once, keep training
                print(f"log.tensorboard=true but TensorBoard is unavailable ({exc}); writing metrics.jsonl only",
                      file=sys.stderr)

    def write(self, row: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._fh.write(dumps(row) + "\n")
        self._fh.flush()
        if self._tb is not None:
            step = row.get("step", 0)
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
