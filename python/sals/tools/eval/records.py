"""The eval's records: what ``results.json`` holds per prompt, per setting and per layer.

``results.json`` (``sals.tools.eval.cli``) has ``meta``, ``settings``, ``summary`` and two lists
of records, ``prompts`` (``PromptRecord``: a task prompt under every setting) and
``perplexity`` (``SegmentRecord``: a held-out segment under every setting), each holding a
``Measurement`` per setting, with ``LayerStats`` per layer where measured. ``to_json`` gives a
record's JSON object; ``Measurement.from_json`` reads a setting's row back, from files
written before these classes too: the keys are the same.
"""

from __future__ import annotations

import dataclasses


def _present(record) -> dict:
    """The record's fields that are not None, in declaration order: the JSON leaves out what a
    row did not measure (no ``window`` for a SALS setting, no ``score`` for perplexity), and
    its key order is the fields' order."""
    values = ((f.name, getattr(record, f.name)) for f in dataclasses.fields(record))
    return {name: value for name, value in values if value is not None}


@dataclasses.dataclass
class LayerStats:
    """One full-attention layer of a SALS setting, measured on one prompt. The overlap fields
    come from the first decode step (``runner._OverlapHooks``) and only for layers that select
    tokens; ``key_rel_error`` from the prompt's keys, for every layer with a projection.
    Attention masses are means over the query heads."""

    mass_kept: float | None = None       # exact attention's mass on the kept tokens
    mass_window: float | None = None     # ... on the sinks and the recent window alone
    recall: float | None = None          # the candidates' share of the mass off the window
    oracle_recall: float | None = None   # ... that exact top-k at the same count would have
    selected: int | None = None          # candidates selected
    tokens: int | None = None            # tokens in the cache at that step
    key_rel_error: float | None = None   # relative error of the rebuilt pre-RoPE keys

    def to_json(self) -> dict:
        """The layer's JSON object: its measured fields."""
        return _present(self)


# kw_only: the fields keep results.json's key order, which puts optional ones first
@dataclasses.dataclass(kw_only=True)
class Measurement:
    """One setting on one prompt or segment (``runner.Runner.run``; ``cli`` adds the task's
    ``output``, ``score`` and the comparison with dense). KV fractions: bytes held over dense
    fp16 K+V of the full-attention layers (``kv_fraction``) and of the whole model's cache with
    sliding windows counted (``kv_fraction_model``)."""

    kv_fraction_prefill: float | None = None   # SALS: after the prompt, before decoding
    layers: dict[int, LayerStats] | None = None  # SALS with per-layer measures: by layer index
    window: int | None = None                  # StreamingLLM: tokens kept per layer
    kv_fraction: float
    kv_fraction_model: float
    seconds: float
    tokens: list[int] | None = None            # generated (task prompts)
    nll: list[float] | None = None             # per teacher-forced token (perplexity)
    output: str | None = None                  # the tokens, decoded
    score: float | None = None                 # the task's score of ``output`` (0 to 100)
    agree: int | None = None                   # tokens equal to dense's up to the first change
    identical: bool | None = None              # equal to dense's over their common length

    def to_json(self) -> dict:
        """The row's JSON object: its measured fields, layers keyed by their index as text."""
        out = _present(self)
        if self.layers is not None:
            # JSON's keys are text: made so here, so that to_json equals what json.load reads
            out["layers"] = {str(i): stats.to_json() for i, stats in self.layers.items()}
        return out

    @classmethod
    def from_json(cls, data: dict) -> Measurement:
        """The measurement a row of results.json holds (``to_json``'s object)."""
        record = cls(**data)
        if record.layers is not None:
            record.layers = {int(i): LayerStats(**m) for i, m in record.layers.items()}
        return record


def _rows(results: dict[str, Measurement]) -> dict:
    return {name: m.to_json() for name, m in results.items()}


@dataclasses.dataclass
class PromptRecord:
    """One task prompt (``sals.tools.eval.tasks.Prompt``) under every setting, by name."""

    task: str
    filler: str
    context: int
    seed: int
    n_tokens: int
    answers: list[str]
    results: dict[str, Measurement]

    def to_json(self) -> dict:
        """The record's JSON object, each setting's row by ``Measurement.to_json``."""
        return {**_present(self), "results": _rows(self.results)}


@dataclasses.dataclass
class SegmentRecord:
    """Held-out segment ``segment`` (at ``offset`` tokens into the held-out text) of
    ``context`` tokens, then teacher-forced tokens, under every setting, by name."""

    context: int
    segment: int
    offset: int
    results: dict[str, Measurement]

    def to_json(self) -> dict:
        """The record's JSON object, each setting's row by ``Measurement.to_json``."""
        return {**_present(self), "results": _rows(self.results)}
