"""``modekernels bench plot RUN.json``: one PNG per benchmark family of a run.

A family is a group name without its ``key=value`` words (``grouped_mm fwd uniform bf16``);
its chart has one cluster of bars per shape (the ``key=value`` words) and one bar per provider.
The bars show TFLOP/s with the measured matmul limit drawn as a line when every case of the
family reported FLOPs, else GB/s with the copy limit, else the mean time in ms (no limit).
"""

from __future__ import annotations

import re
from pathlib import Path

from modekernels.benchtool.results import Case, load_run, split_group


def _metric(cases: list[Case], ceilings: dict) -> tuple[str, str, float | None, str]:
    """(extra_info key or "ms", axis label, limit or None, limit label)."""
    if all(c.extra.get("tflops") is not None for c in cases):
        return "tflops", "TFLOP/s", ceilings.get("matmul_tflops"), ceilings.get("matmul", "matmul")
    if all(c.extra.get("gbps") is not None for c in cases):
        return "gbps", "GB/s", ceilings.get("copy_gbps"), ceilings.get("copy", "copy")
    return "ms", "mean time (ms)", None, ""


def _file_name(family: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", family).strip("_") + ".png"


def plot_run(path: str, out_dir: str | None = None) -> list[Path]:
    """Write the run's charts to ``out_dir`` (default: ``<RUN>_plots`` beside the JSON) and
    return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = load_run(path)
    out = Path(out_dir) if out_dir else run.path.with_name(run.path.stem + "_plots")
    out.mkdir(parents=True, exist_ok=True)
    families: dict[str, dict[str, dict[str, Case]]] = {}
    for case in run.cases:
        family, shape = split_group(case.group)
        families.setdefault(family, {}).setdefault(shape, {})[case.provider] = case
    written = []
    for family, shapes in families.items():
        cases = [c for by_provider in shapes.values() for c in by_provider.values()]
        key, label, limit, limit_label = _metric(cases, run.ceilings)
        providers = list(dict.fromkeys(c.provider for c in cases))
        width = 0.8 / len(providers)
        fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(shapes) + 2), 4.5))
        for i, provider in enumerate(providers):
            values = []
            for by_provider in shapes.values():
                case = by_provider.get(provider)
                if case is None or case.mean_s is None:
                    values.append(0.0)
                elif key == "ms":
                    values.append(case.mean_s * 1e3)
                else:
                    values.append(case.extra[key])
            ax.bar([s + (i - (len(providers) - 1) / 2) * width for s in range(len(shapes))],
                   values, width, label=provider)
        if limit:
            ax.axhline(limit, color="black", linestyle="--", linewidth=1,
                       label=f"limit {limit:.4g} ({limit_label})")
        ax.set_xticks(range(len(shapes)), list(shapes), rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.set_title(f"{family}\n{run.device}, {run.date[:10]}", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        target = out / _file_name(family)
        fig.savefig(target, dpi=110)
        plt.close(fig)
        written.append(target)
    return written


def main(path: str, out_dir: str | None = None) -> int:
    for target in plot_run(path, out_dir):
        print(f"wrote {target}")
    return 0
