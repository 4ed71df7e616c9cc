"""``modekernels bench compare OLD.json NEW.json``: each case's time in both runs and the ratio.

Cases are matched by pytest node id. ``new/old`` is the ratio of mean times (below 1 is faster);
a case more than :data:`THRESHOLD` (5%) slower is flagged ``SLOWER``, and one more than 5% faster
``faster``. Cases present in one run only are listed as such; one of OLD missing from NEW (it
failed, was skipped or did not run) counts as a failure like a slower one. Timings compare only
between runs on the same kind of device: a note says when the devices differ.
"""

from __future__ import annotations

import dataclasses

from modekernels.benchtool.results import format_time, load_run

THRESHOLD = 0.05


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One case of the comparison: its name, both mean times (None when missing) and the flag."""

    name: str
    old_s: float | None
    new_s: float | None

    @property
    def ratio(self) -> float | None:
        """new mean / old mean (above 1: slower)."""
        return self.new_s / self.old_s if self.old_s and self.new_s else None

    @property
    def slower(self) -> bool:
        return self.ratio is not None and self.ratio > 1 + THRESHOLD

    @property
    def vanished(self) -> bool:
        """Measured in OLD, missing from NEW."""
        return self.old_s is not None and self.new_s is None

    @property
    def failed(self) -> bool:
        return self.slower or self.vanished

    @property
    def flag(self) -> str:
        if self.old_s is None:
            return "only in new"
        if self.new_s is None:
            return "MISSING from new"
        if self.slower:
            return f"SLOWER (+{self.ratio - 1:.1%})"
        if self.ratio is not None and self.ratio < 1 - THRESHOLD:
            return "faster"
        return ""


def compare_runs(old_path: str, new_path: str) -> tuple[list[Comparison], list[str]]:
    """(one :class:`Comparison` per case of either run, old cases first; notes such as a device
    mismatch)."""
    old, new = load_run(old_path), load_run(new_path)
    old_means = {c.name: c.mean_s for c in old.cases}
    new_means = {c.name: c.mean_s for c in new.cases}
    names = list(old_means) + [n for n in new_means if n not in old_means]
    notes = []
    if old.device != new.device:
        notes.append(f"devices differ ({old.device} vs {new.device}): the ratios mean little")
    return [Comparison(n, old_means.get(n), new_means.get(n)) for n in names], notes


def format_comparison(rows: list[Comparison], notes: list[str]) -> str:
    width = max([len(r.name) for r in rows] + [4])
    lines = [f"{'case':<{width}} {'old':>12} {'new':>12} {'new/old':>8}  flag"]
    for r in rows:
        ratio = "-" if r.ratio is None else f"{r.ratio:.3f}"
        lines.append(f"{r.name:<{width}} {format_time(r.old_s):>12} {format_time(r.new_s):>12} "
                     f"{ratio:>8}  {r.flag}")
    slower, vanished = sum(r.slower for r in rows), sum(r.vanished for r in rows)
    lines += ["", f"{slower} of {len(rows)} cases more than {THRESHOLD:.0%} slower; "
              f"{vanished} of old's cases missing from new (failed or skipped)"]
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)


def main(old_path: str, new_path: str) -> int:
    """Print the comparison; exit code 1 when any case is more than 5% slower or missing from
    NEW, else 0 (``ValueError`` naming the file when one is not a benchmark JSON)."""
    rows, notes = compare_runs(old_path, new_path)
    print(format_comparison(rows, notes))
    return 1 if any(r.failed for r in rows) else 0
