"""Worker-side record of the head's per-token step logits (and, on request, layer L-2 rows), by request.

Runs inside vLLM's worker process. After every model step, `record` gets the step's flat batch: for each scheduled
request its key (from `SamplingParams.extra_args`), the positions and ids of the tokens that went through the
model, and the head's logit at each of them (computed in the model's forward from the layer L-2 state, see
`model.py`). The engine fetches what it needs once a request has finished (`fetch`) and the record is dropped.

A request's positions are contiguous (a prefill, its chunks, then one decode token per step); a preempted request
that is recomputed overwrites its own tail. Positions served from the prefix cache never go through the model and
have no value (the engine knows and handles it).
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field

import torch

from sprm_kernels.model.core.steps import is_scorable_pair

EXTRA_KEY = "sprm_key"  # SamplingParams.extra_args: the record's key
EXTRA_FEATURES = "sprm_features"  # SamplingParams.extra_args: also keep the layer L-2 rows rules 1-3 could score


@dataclass
class _Record:
    start: int  # position of the first logit
    logits: array = field(default_factory=lambda: array("f"))
    rows: dict | None = None  # position -> [H] layer L-2 row, where rules 1-3 of docs/method.md §3 hold (features only)
    pending: tuple | None = None  # (position, token id, row) of the last token: its successor is not known yet

    def put(self, start: int, values: list[float]) -> None:
        end = self.start + len(self.logits)
        if start < self.start or start > end:  # recomputed from before the record, or a gap: start afresh
            self.start, self.logits = start, array("f")
        elif start < end:  # a preempted request recomputes its tail
            del self.logits[start - self.start :]
        self.logits.extend(values)


class StepRecorder:
    def __init__(self, step_token_ids, think_start_id: int):
        self.step_ids = frozenset(int(i) for i in step_token_ids)
        self.think_start_id = int(think_start_id)
        self.records: dict[str, _Record] = {}

    def record(self, segments, positions: list[int], input_ids: list[int], logits: list[float], hidden) -> None:
        """segments: (key, features, first flat index, token count) per request of the step, in flat order."""
        for key, features, lo, n in segments:
            start = positions[lo]
            if positions[lo + n - 1] != start + n - 1:
                raise RuntimeError(f"sprm: request {key}: positions {positions[lo : lo + n]} are not contiguous")
            record = self.records.get(key)
            if record is None:
                record = self.records[key] = _Record(start, rows={} if features else None)
            record.put(start, logits[lo : lo + n])
            if features and hidden is not None:
                self._keep_rows(record, start, input_ids[lo : lo + n], hidden[lo : lo + n])

    def _keep_rows(self, record: _Record, start: int, ids: list[int], rows: torch.Tensor) -> None:
        """Rows at positions t whose successor x[t+1] is a step token, x[t] is not one and is not `<think>`."""
        if record.pending is not None:
            t, token, row = record.pending
            if t == start - 1 and self._could_score(token, ids[0]):
                record.rows[t] = row
            record.pending = None
        for i in range(len(ids) - 1):
            if self._could_score(ids[i], ids[i + 1]):
                record.rows[start + i] = rows[i].clone()
        record.pending = (start + len(ids) - 1, ids[-1], rows[-1].clone())

    def _could_score(self, token: int, successor: int) -> bool:
        return is_scorable_pair(token, successor, self.step_ids, self.think_start_id)

    def fetch(self, wanted: dict[str, list[int]], features: bool = False) -> dict:
        """{key: (logits, rows)} at the wanted positions (None where a position has no value); drops the records.
        rows: [n][H] floats when `features` (None if a row is missing), else None."""
        found = {}
        for key, wanted_positions in wanted.items():
            record = self.records.pop(key, None)
            logits, rows = [], None
            for t in wanted_positions:
                i = -1 if record is None else t - record.start
                logits.append(record.logits[i] if 0 <= i < len(record.logits) else None)
            if features and record is not None and record.rows is not None:
                kept = dict(record.rows)
                if record.pending is not None:
                    kept.setdefault(record.pending[0], record.pending[2])
                picked = [kept.get(t) for t in wanted_positions]
                if all(row is not None for row in picked):  # nested float lists: what the RPC carries as sent
                    rows = torch.stack(picked).float().tolist() if picked else []
            found[key] = (logits, rows)
        return found

    def drop(self, keys) -> None:
        for key in keys:
            self.records.pop(key, None)
