"""pytest setup for ``bench/``: the ``ceilings`` fixture, speedups and the side-by-side summary.

Run with ``python -m pytest bench -q`` (add ``--benchmark-json=PATH`` to keep the numbers). The
helpers a benchmark file uses live in ``harness.py``; see its docstring for the pattern.

At the end of the session each record made by ``harness.report`` gets
``extra_info["speedup"] = baseline mean / provider mean`` against its group's baseline provider
(None when the baseline did not run), before pytest-benchmark writes the JSON; the JSON's top
level gets ``"modekernels": {"device", "versions", "ceilings"}``; and the terminal summary shows
one table per group.
"""

from __future__ import annotations

import dataclasses

import pytest

import harness  # first: it sets TRITON_INTERPRET on a machine without a GPU

from modekernels.benchtool.results import format_time

_measured: list[harness.Ceilings] = []


@pytest.fixture(scope="session")
def ceilings() -> harness.Ceilings:
    """The matmul and copy ceilings of this device, measured once per session."""
    _measured.append(harness.measure_ceilings())
    return _measured[0]


def _assign_speedups(records: list[harness.Record]) -> None:
    baseline_mean = {
        r.group: r.mean_s for r in records if r.provider == r.baseline and r.mean_s
    }
    for r in records:
        base = baseline_mean.get(r.group)
        r.extra_info["speedup"] = base / r.mean_s if base and r.mean_s else None


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    # Before pytest-benchmark's own sessionfinish, which writes --benchmark-json.
    _assign_speedups(harness.records)
    yield


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["modekernels"] = {
        **harness.environment(),
        "ceilings": dataclasses.asdict(_measured[0]) if _measured else None,
    }


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _speedup(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter):
    if not harness.records:
        return
    write = terminalreporter.write_line
    terminalreporter.section("modekernels benchmarks")
    env = harness.environment()
    write(f"device: {env['device']}   quick: {harness.QUICK}   {env['versions']}")
    if _measured:
        c = _measured[0]
        write(f"ceilings: {c.matmul_tflops:.1f} TFLOP/s ({c.matmul}); "
              f"{c.copy_gbps:.1f} GB/s ({c.copy})")
    groups: dict[str, list[harness.Record]] = {}
    for r in harness.records:
        groups.setdefault(r.group, []).append(r)
    header = (f"  {'provider':<12} {'mean':>12} {'TFLOP/s':>9} {'of mm':>7} "
              f"{'GB/s':>9} {'of copy':>8} {'speedup':>8}")
    for group, rows in groups.items():
        write("")
        write(f"{group}   (speedup vs {rows[0].baseline})")
        write(header)
        for r in rows:
            i = r.extra_info
            write(f"  {r.provider:<12} {format_time(r.mean_s):>12} {_cell(i.get('tflops'), '.4g'):>9} "
                  f"{_cell(i.get('fraction_of_matmul'), '.1%'):>7} "
                  f"{_cell(i.get('gbps'), '.4g'):>9} {_cell(i.get('fraction_of_copy'), '.1%'):>8} "
                  f"{_speedup(i.get('speedup')):>8}")
