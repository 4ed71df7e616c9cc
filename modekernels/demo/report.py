"""The demo's trade-off table: printed with aligned columns, written as JSON and plotted as a PNG
(forgetting on the original domain against the gain on the new one, one labelled point per
method)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

__all__ = ["MethodResult", "format_table", "plot", "write_json"]


@dataclass
class MethodResult:
    """One method's row. Losses are mean next-token cross-entropy in nats per token on the eval
    splits; ``forgetting`` = original after − before (lower is better), ``gain`` = new before −
    after (higher is better)."""

    method: str
    note: str
    original_before: float
    original_after: float
    new_before: float
    new_after: float
    added_parameters: int
    base_parameters: int
    trainable_parameters: int
    lr: float
    train_tokens_per_s: float
    train_seconds: float
    backend: str

    @property
    def forgetting(self) -> float:
        return self.original_after - self.original_before

    @property
    def gain(self) -> float:
        return self.new_before - self.new_after

    def as_dict(self) -> dict:
        return {**asdict(self), "forgetting": self.forgetting, "gain": self.gain}


_COLUMNS = (
    ("method", "{}", lambda r: r.method),
    ("orig before", "{:.3f}", lambda r: r.original_before),
    ("orig after", "{:.3f}", lambda r: r.original_after),
    ("forgetting", "{:+.3f}", lambda r: r.forgetting),
    ("new before", "{:.3f}", lambda r: r.new_before),
    ("new after", "{:.3f}", lambda r: r.new_after),
    ("new gain", "{:+.3f}", lambda r: r.gain),
    ("added params", "{:,}", lambda r: r.added_parameters),
    ("% base", "{:.1%}", lambda r: r.added_parameters / r.base_parameters),
    ("train tok/s", "{:,.0f}", lambda r: r.train_tokens_per_s),
    ("backend", "{}", lambda r: r.backend),
)


def format_table(results: list[MethodResult]) -> str:
    """The rows under a header, text left-aligned and numbers right-aligned."""
    cells = [[title for title, _, _ in _COLUMNS]]
    cells += [[fmt.format(get(r)) for _, fmt, get in _COLUMNS] for r in results]
    widths = [max(len(row[i]) for row in cells) for i in range(len(_COLUMNS))]
    text_columns = {0, len(_COLUMNS) - 1}

    def line(row: list[str]) -> str:
        return "  ".join(
            cell.ljust(width) if i in text_columns else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths))
        ).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(cells[0]), rule] + [line(row) for row in cells[1:]])


def write_json(path: str, results: list[MethodResult], settings: dict) -> None:
    """``{"settings": ..., "methods": [row, ...]}`` with each row's forgetting and gain."""
    with open(path, "w") as file:
        json.dump({"settings": settings, "methods": [r.as_dict() for r in results]}, file, indent=2)
        file.write("\n")


def plot(path: str, results: list[MethodResult], title: str) -> None:
    """A PNG scatter: new-domain gain (x) against original-domain forgetting (y), labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7.5, 5.0), dpi=120)
    for r in results:
        axes.scatter(r.gain, r.forgetting, s=60, zorder=3)
        size = f"+{r.added_parameters / r.base_parameters:.0%} params" if r.added_parameters else "all weights train"
        axes.annotate(
            f"{r.method}\n{size}",
            (r.gain, r.forgetting), textcoords="offset points", xytext=(7, 4), fontsize=8,
        )
    axes.axhline(0.0, color="grey", linewidth=0.8, zorder=1)
    axes.set_xlabel("new-domain gain: loss before − after (nats/token, higher is better)")
    axes.set_ylabel("forgetting: original-domain loss after − before\n(nats/token, lower is better)")
    axes.set_title(title, fontsize=10)
    axes.grid(True, alpha=0.3)
    axes.margins(0.2)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
