"""Reading one benchmark run: pytest-benchmark's JSON as written under ``bench/`` (see
``bench/conftest.py``), optionally with the ``"run"`` metadata that ``modekernels bench`` adds.

A run's JSON holds ``benchmarks`` (one per case, each with ``group``, ``fullname``, ``stats``
and the ``extra_info`` that ``bench/harness.py:report`` fills: provider, baseline, tflops,
gbps, fractions of the ceilings, speedup) and, at the top level, ``"modekernels": {"device",
"versions", "ceilings"}`` and ``datetime`` / ``commit_info`` from pytest-benchmark.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark of a run: its unique ``name`` (pytest's node id without the folder, so that
    runs started from the repository root and from ``bench/`` match), the problem ``group``
    its providers share, the ``provider`` and the group's ``baseline``, the mean seconds per call
    (None when timing was off) and the ``extra_info`` dict."""

    name: str
    group: str
    provider: str
    baseline: str
    mean_s: float | None
    extra: dict


@dataclasses.dataclass(frozen=True)
class Run:
    """A run: its ``path``, its top-level ``meta`` (everything but ``benchmarks``) and cases."""

    path: Path
    meta: dict
    cases: list[Case]

    @property
    def device(self) -> str:
        return (self.meta.get("run") or {}).get("device") or (self.meta.get("modekernels") or {}).get(
            "device", "unknown"
        )

    @property
    def date(self) -> str:
        return (self.meta.get("run") or {}).get("date") or self.meta.get("datetime", "")

    @property
    def ceilings(self) -> dict:
        return (self.meta.get("modekernels") or {}).get("ceilings") or {}

    @property
    def on_gpu(self) -> bool:
        """True for a full-size run on a GPU. Runs written by ``modekernels bench`` say so in
        ``run.device_type`` and ``run.quick``; for a plain pytest run, the harness's GPU ceiling
        (a bf16 ``torch.mm``, the CPU one being fp32) tells."""
        run = self.meta.get("run")
        if run is not None:
            return run.get("device_type") == "cuda" and not run.get("quick", False)
        return str(self.ceilings.get("matmul", "")).startswith("torch.mm bfloat16")


def _node_name(fullname: str) -> str:
    """``bench/test_x.py::test_x[id]`` -> ``test_x.py::test_x[id]``."""
    path, sep, rest = fullname.partition("::")
    return Path(path).name + sep + rest


def load_run(path: str | Path) -> Run:
    """Parse one run's JSON; ``ValueError`` naming the file when it is not a benchmark run."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read a benchmark JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise ValueError(f"{path}: not a pytest-benchmark JSON (no 'benchmarks' list)")
    cases = []
    for bench in data["benchmarks"]:
        extra = bench.get("extra_info") or {}
        stats = bench.get("stats") or {}
        cases.append(
            Case(
                name=_node_name(bench.get("fullname") or bench.get("name", "?")),
                group=bench.get("group") or bench.get("name", "?"),
                provider=extra.get("provider") or (bench.get("params") or {}).get("provider", "?"),
                baseline=extra.get("baseline", ""),
                mean_s=stats.get("mean"),
                extra=extra,
            )
        )
    meta = {key: value for key, value in data.items() if key != "benchmarks"}
    return Run(path=path, meta=meta, cases=cases)


def groups(cases: list[Case]) -> dict[str, list[Case]]:
    """Cases by group, in first-seen order."""
    found: dict[str, list[Case]] = {}
    for case in cases:
        found.setdefault(case.group, []).append(case)
    return found


_SIZE = re.compile(r"\S+=\S+")


def split_group(group: str) -> tuple[str, str]:
    """(family, shape) of a group name: its ``key=value`` words are the shape, the other words
    the family, e.g. ``"grouped_mm fwd E=8 S=64 uniform bf16"`` -> ``("grouped_mm fwd uniform
    bf16", "E=8 S=64")``."""
    words = group.split()
    shape = " ".join(w for w in words if _SIZE.fullmatch(w))
    family = " ".join(w for w in words if not _SIZE.fullmatch(w))
    return family or group, shape or group


def format_time(seconds: float | None) -> str:
    """``1.234 ms``-style time, ``-`` for None."""
    if seconds is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3f} {unit}"
    return f"{seconds / 1e-9:.1f} ns"


def format_limit(extra: dict) -> str:
    """The case's fraction of the hardware limit that bounds it: of the matmul rate when it
    reported FLOPs, else of the copy bandwidth, else ``-``."""
    parts = []
    if extra.get("fraction_of_matmul") is not None:
        parts.append(f"{extra['fraction_of_matmul']:.1%} of mm")
    if extra.get("fraction_of_copy") is not None:
        parts.append(f"{extra['fraction_of_copy']:.1%} of copy")
    return ", ".join(parts) or "-"
