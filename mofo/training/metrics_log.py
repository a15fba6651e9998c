"""The training loop's ``metrics.jsonl``: JSON lines on rank 0, each record also handed to a
callback (MLflow's live logging); a resumed run drops what a killed run wrote past its step."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

MetricsCallback = Callable[[dict, int], None]


class MetricsLog:
    """Appends JSON lines on rank 0 and forwards every record to ``callback``."""

    def __init__(self, path: Path, enabled: bool, callback: MetricsCallback | None):
        self.path = path
        self.enabled = enabled
        self.callback = callback

    def truncate_after(self, global_step: int) -> None:
        """Drop records a killed run wrote after the step it is resumed from."""
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill
            if record.get("step", 0) <= global_step and record.get("type") != "end":
                kept.append(line)
        self.path.write_text("".join(k + "\n" for k in kept))

    def reset(self) -> None:
        if self.enabled and self.path.exists():
            self.path.unlink()

    def write(self, record: dict, step: int) -> None:
        if not self.enabled:
            return
        record = {"time": time.time(), **record}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.callback is not None:
            self.callback(record, step)
