"""The demo's two domains, found on every machine, and a byte-level tokenizer (no download).

- original domain: the English prose that ships with Python (``pydoc_data.topics``, the text of
  ``help("topic")``),
- new domain: Python source files of the standard library, a fixed sorted selection.

Documents are split into train and eval sets by position (every ``eval_every``-th document goes
to eval), tokenized, joined with an end-of-text id and cut into fixed-length blocks: a
:class:`Corpus` holds ``train`` (N, block_size) and ``eval`` (M, block_size) int64 tensors.
"""

from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

__all__ = [
    "ByteTokenizer",
    "Corpus",
    "build_corpus",
    "code_documents",
    "prose_documents",
    "text_file_corpus",
]


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255, then the specials: ``eos_id`` 256 (end of text), ``pad_id`` 257."""

    eos_id = 256
    pad_id = 257
    vocab_size = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


@dataclass
class Corpus:
    """One domain: ``train`` (N, block_size) and ``eval`` (M, block_size) int64 token blocks."""

    name: str
    train: torch.Tensor
    eval: torch.Tensor

    @property
    def block_size(self) -> int:
        return self.train.shape[1]


def prose_documents() -> list[str]:
    """The pydoc topic texts (English prose about Python), sorted by topic name."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def code_documents(max_chars_per_file: int = 8000) -> list[str]:
    """The first ``max_chars_per_file`` characters of each top-level ``.py`` file of the standard
    library, in sorted file-name order (a cap per file spreads the corpus over many modules)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    names = sorted(name for name in os.listdir(stdlib) if name.endswith(".py"))
    documents = []
    for name in names:
        with open(os.path.join(stdlib, name), encoding="utf-8", errors="replace") as file:
            text = file.read(max_chars_per_file)
        if text.strip():
            documents.append(text)
    if not documents:
        raise RuntimeError(f"no Python source files found in the standard library at {stdlib}")
    return documents


def _blocks(ids: list[int], block_size: int, max_blocks: int | None) -> torch.Tensor:
    count = len(ids) // block_size
    if max_blocks is not None:
        count = min(count, max_blocks)
    return torch.tensor(ids[: count * block_size], dtype=torch.int64).view(count, block_size)


def _join(documents: Sequence[str], encode: Callable[[str], list[int]], eos_id: int) -> list[int]:
    ids: list[int] = []
    for document in documents:
        ids += encode(document)
        ids.append(eos_id)
    return ids


def build_corpus(
    name: str,
    documents: Sequence[str],
    encode: Callable[[str], list[int]],
    eos_id: int,
    block_size: int,
    *,
    eval_every: int = 10,
    max_train_blocks: int | None = None,
    max_eval_blocks: int | None = None,
) -> Corpus:
    """Every ``eval_every``-th document (from the first) is held out for eval; each side is
    tokenized, joined with ``eos_id`` and cut into blocks (a trailing partial block is dropped)."""
    held_out = [doc for i, doc in enumerate(documents) if i % eval_every == 0]
    kept = [doc for i, doc in enumerate(documents) if i % eval_every != 0]
    corpus = Corpus(
        name,
        train=_blocks(_join(kept, encode, eos_id), block_size, max_train_blocks),
        eval=_blocks(_join(held_out, encode, eos_id), block_size, max_eval_blocks),
    )
    if len(corpus.train) == 0 or len(corpus.eval) == 0:
        raise ValueError(
            f"the {name} corpus is too small for blocks of {block_size} tokens "
            f"({len(corpus.train)} train and {len(corpus.eval)} eval blocks)"
        )
    return corpus


def text_file_corpus(
    path: str,
    encode: Callable[[str], list[int]],
    eos_id: int | None,
    block_size: int,
    *,
    eval_fraction: float = 0.1,
    max_train_blocks: int | None = None,
    max_eval_blocks: int | None = None,
) -> Corpus:
    """A text file as one domain: its blank-line-separated paragraphs are tokenized and cut into
    blocks; the last ``eval_fraction`` of the blocks (at least one) is the eval set."""
    with open(path, encoding="utf-8", errors="replace") as file:
        text = file.read()
    ids: list[int] = []
    for paragraph in text.split("\n\n"):
        if paragraph.strip():
            ids += encode(paragraph + "\n\n")
    if eos_id is not None:
        ids.append(eos_id)
    blocks = _blocks(ids, block_size, None)
    if len(blocks) < 2:
        raise ValueError(
            f"{path} holds {len(ids)} tokens: too few for a train and an eval block of "
            f"{block_size} tokens"
        )
    eval_count = max(1, round(len(blocks) * eval_fraction))
    train, held_out = blocks[:-eval_count], blocks[-eval_count:]
    return Corpus(
        os.path.basename(path),
        train=train[:max_train_blocks] if max_train_blocks else train,
        eval=held_out[:max_eval_blocks] if max_eval_blocks else held_out,
    )
