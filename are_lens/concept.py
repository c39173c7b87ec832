"""Concept: the two prompt sets that define an edit, their chat formatting and their held-out split."""

from __future__ import annotations

import csv
import json
import random
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _prompts(values: Any, argument: str) -> tuple[str, ...]:
    if isinstance(values, str) or not isinstance(values, Iterable):
        raise TypeError(f"{argument}= must be a list of strings; got {type(values).__name__}")
    prompts = tuple(values)
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"{argument}[{i}] must be a string; got {type(p).__name__}: {p!r}")
        if not p.strip():
            raise ValueError(f"{argument}[{i}] is an empty prompt")
    if len(prompts) < 2:
        raise ValueError(
            f"{argument}= needs at least 2 prompts (one to train on, one held out); got {len(prompts)}"
        )
    repeated = [p for p, n in Counter(prompts).items() if n > 1]
    if repeated:  # a warning, not an error: repeating prompts on purpose (to weight them) is legitimate
        warnings.warn(
            f"{argument}= repeats {len(repeated)} prompt(s), e.g. {repeated[0]!r}; a repeated prompt can land in "
            "both the training and the held-out split, which flatters the held-out accuracy",
            UserWarning, stacklevel=4,
        )
    return prompts


def format_prompts(tokenizer: Any, prompts: Sequence[str], chat: bool, system: str | None = None,
                   demonstrations: Sequence[tuple[str, str]] = ()) -> list[str]:
    """Wrap each prompt as a user turn of the tokenizer's chat template (when `chat`), ready to answer.

    `demonstrations`: (user, assistant) turns placed before each prompt, after the system turn — an
    in-context demonstration such as the In-Context Defence's (Wei et al. 2023).
    """
    if not chat:
        if demonstrations:
            raise ValueError("demonstrations= are chat turns and need chat=True")
        return list(prompts)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat=True but the model's tokenizer has no chat template; pass chat=False")
    head = [{"role": "system", "content": system}] if system is not None else []
    for user, assistant in demonstrations:
        head += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return [
        tokenizer.apply_chat_template(
            head + [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]


def demonstration_turns(values: Any) -> tuple[tuple[str, str], ...]:
    """Check `demonstrations=`: a list of (user, assistant) string pairs."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"demonstrations= must be a list of (user, assistant) string pairs; got {values!r}")
    turns = tuple(values)
    for i, turn in enumerate(turns):
        if not (isinstance(turn, (tuple, list)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise TypeError(f"demonstrations[{i}] must be a (user, assistant) pair of strings; got {turn!r}")
    return tuple((u, a) for u, a in turns)


@dataclass(frozen=True)
class Split:
    """Prompts the discriminator and adapters train on, and prompts held out to measure the fresh D."""

    train_source: list[str]
    train_target: list[str]
    test_source: list[str]
    test_target: list[str]


@dataclass(frozen=True)
class Concept:
    """Source prompts (whose representation moves) and target prompts (what it should resemble).

    `chat=True` wraps each prompt in the tokenizer's chat template. When both sets have the same
    length they are treated as pairs and split together, so a held-out source prompt never has its
    target twin in the training set.
    """

    source: Sequence[Any]  # validated as non-empty strings in __post_init__
    target: Sequence[Any]
    chat: bool = False
    system: str | None = None
    held_out: float = 0.2
    name: str = "concept"
    paired: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "source", _prompts(self.source, "source"))
        object.__setattr__(self, "target", _prompts(self.target, "target"))
        if not isinstance(self.held_out, float) or not 0.0 < self.held_out < 1.0:
            raise ValueError(f"held_out= must be a float in (0, 1); got {self.held_out!r}")
        object.__setattr__(self, "paired", len(self.source) == len(self.target))

    def split(self, seed: int) -> Split:
        rng = random.Random(seed)
        src_order = list(range(len(self.source)))
        rng.shuffle(src_order)
        if self.paired:
            tgt_order = src_order
        else:
            tgt_order = list(range(len(self.target)))
            rng.shuffle(tgt_order)

        def cut(prompts: Sequence[str], order: list[int]) -> tuple[list[str], list[str]]:
            n_test = min(len(order) - 1, max(1, round(len(order) * self.held_out)))
            return [prompts[i] for i in order[n_test:]], [prompts[i] for i in order[:n_test]]

        train_src, test_src = cut(self.source, src_order)
        train_tgt, test_tgt = cut(self.target, tgt_order)
        return Split(train_src, train_tgt, test_src, test_tgt)

    def render(self, tokenizer: Any, prompts: Sequence[str]) -> list[str]:
        return format_prompts(tokenizer, prompts, self.chat, self.system)

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "n_source": len(self.source),
            "n_target": len(self.target),
            "chat": self.chat,
            "system": self.system,
            "held_out": self.held_out,
            "source_examples": list(self.source[:3]),
            "target_examples": list(self.target[:3]),
        }

    @classmethod
    def from_file(cls, path: str | Path, source: str, target: str, **kwargs: Any) -> Concept:
        """Read two columns of a CSV, JSON (a list of records) or JSONL file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"path= {str(path)!r} is not a file")
        if path.suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as f:
                records = list(csv.DictReader(f))
        elif path.suffix == ".jsonl":
            records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        elif path.suffix == ".json":
            records = json.loads(path.read_text(encoding="utf-8"))
        else:
            raise ValueError(f"path= must end in .csv, .json or .jsonl; got {path.name!r}")
        return cls.from_records(records, source, target, **kwargs)

    @classmethod
    def from_records(cls, records: Iterable[dict], source: str, target: str, **kwargs: Any) -> Concept:
        """Two columns of a list of records, or of a `datasets.Dataset`."""
        rows = list(records)
        for column in (source, target):
            if rows and column not in rows[0]:
                raise KeyError(f"column {column!r} not found; the records have {sorted(rows[0])}")
        return cls([r[source] for r in rows], [r[target] for r in rows], **kwargs)
