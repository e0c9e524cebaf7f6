"""Typed records of what the engine counts: one step over one shard (``StageRecord``), and a step's totals
over the corpus (``StageTotal``) that the manifest reports.

Records travel as JSON (in a shard's history, its cache and its stats file), so each type says once how it
is read from and written to JSON; nothing else reads them by string keys.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StageRecord:
    """What one step did to one shard; summed per step into the manifest."""

    stage: str
    samples_in: int
    samples_out: int
    failed: int
    wall_s: float
    device: str
    run_id: str
    counts: dict[str, int] = field(default_factory=dict)
    reused: bool = False

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StageRecord:
        """A record from a history or stats file; ``counts`` and ``reused`` may be absent in old ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class StageTotal:
    """One step's records summed over every committed shard: the manifest's ``stages.<step>``."""

    device: str
    samples_in: int = 0
    samples_out: int = 0
    failed: int = 0
    wall_s: float = 0.0
    device_s: float = 0.0
    """Seconds on an accelerator: the wall time of the shards this step ran on a device other than CPU."""
    counts: Counter[str] = field(default_factory=Counter)
    reused_shards: int = 0

    def add(self, record: StageRecord) -> None:
        self.samples_in += record.samples_in
        self.samples_out += record.samples_out
        self.failed += record.failed
        self.counts.update(record.counts)
        self.wall_s += record.wall_s
        if record.device != "cpu":
            self.device_s += record.wall_s
        self.reused_shards += int(record.reused)

    def to_json(self) -> dict[str, Any]:
        """The manifest's form (keys in its published order), with throughput and yield."""
        return {
            "samples_in": self.samples_in,
            "samples_out": self.samples_out,
            "failed": self.failed,
            "wall_s": self.wall_s,
            "device_s": self.device_s,
            "counts": dict(self.counts),
            "reused_shards": self.reused_shards,
            "device": self.device,
            "samples_per_s": self.samples_out / self.wall_s if self.wall_s > 0 else 0.0,
            "yield": self.samples_out / self.samples_in if self.samples_in else 0.0,
        }
