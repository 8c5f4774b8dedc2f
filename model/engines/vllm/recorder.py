"""Worker-side record of the head's per-token step logits, by request, in device buffers (and, on request, layer
L-2 rows on the host).

Runs inside vLLM's worker process. After every model step, `record_step` gets the step's flat batch: the request
ids in batch order with their scheduled token counts, and the device tensors of the forward (positions, ids, the
head's logit at each token, computed in the model's forward from the layer L-2 state, see `model.py`). Each request
that carries a key (`SamplingParams.extra_args`) owns a row ("slot") of fixed-shape device buffers for as long as
the engine has not fetched or dropped it:

- `logits[slot, t]` and `ids[slot, t]`: the logit and the input id at every position t that went through the model
  (ids -1 where none did: the prefix cache served it). A preempted request that is recomputed writes the same
  positions again; nothing is appended, so nothing can be duplicated.
- `sums[slot]`, `counts[slot]`: the running sum of clamped log p and the number of scored steps, over the
  positions t where rules 1-3 of docs/method.md §3 hold (x[t+1] a step token, x[t] neither a step token nor
  `<think>`) and t lies after the latest `<think>` the request fed (rule 4 with the row's end still open); a step is
  added once (`evaluated[slot]`: the last position whose pair was seen), so recomputation does not count it twice.
- `lengths[slot]`, `firsts[slot]`: one past the last position fed, and the first position fed (the tokens before it
  came from the prefix cache).

A step costs a handful of fixed-shape device ops and one host-to-device copy of the flat batch's slot per token
(built with numpy from per-request counts): no device-to-host copy, no synchronisation with the forward, no Python
per token. The host reads the buffers only when the engine asks (`fetch` once a request ends, `running` while
pruning): each read is one copy, counted in `host_reads` (the tests check it does not grow with the steps).

Every entry point runs in inference mode, as vLLM's steps do, so the buffers (made in either) stay inference
tensors that both may update in place.

`return_features` (training) is the exception: the layer L-2 rows where rules 1-3 hold are kept on the host, which
reads that request's ids each step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from sprm_kernels.model.core.steps import is_scorable_pair
from sprm_kernels.torch_ops import clamped_log_sigmoid

EXTRA_KEY = "sprm_key"  # SamplingParams.extra_args: the record's key
EXTRA_FEATURES = "sprm_features"  # SamplingParams.extra_args: also keep the layer L-2 rows rules 1-3 could score
INITIAL_SLOTS = 64  # rows of the buffers; doubled when more requests are recorded at once


@dataclass
class _Rows:
    """The layer L-2 rows of one `return_features` request, on the host."""

    rows: dict = field(default_factory=dict)  # position -> [H] row, where rules 1-3 of docs/method.md §3 hold
    pending: tuple | None = None  # (position, token id, row) of the last token: its successor is not known yet


class StepRecorder:
    def __init__(self, step_token_ids, think_start_id: int, max_len: int, device, capacity: int = INITIAL_SLOTS):
        self.step_ids = frozenset(int(i) for i in step_token_ids)
        self.think_start_id = int(think_start_id)
        self.device = torch.device(device)
        self.max_len = int(max_len)
        self.step_tensor = torch.tensor(sorted(self.step_ids), dtype=torch.int64, device=self.device)
        self.slots: dict[str, int] = {}  # key -> slot
        self.free: list[int] = []
        self.capacity = 0
        self.req_keys: dict[str, tuple[str, bool] | None] = {}  # vLLM request id -> (key, features), None: no key
        self.features: dict[str, _Rows] = {}
        self.steps = 0  # model steps recorded
        self.host_reads = 0  # device-to-host reads of the buffers (fetch, running, tokens)
        self._batch = (None, None, None)  # (request ids, slot per request, prompt lengths) of the latest step
        self._grow(capacity)

    # -- the buffers ---------------------------------------------------------------------------------------------

    def _grow(self, capacity: int) -> None:
        """Rows 0..capacity-1 for requests and one more (the last) where unkeyed tokens and padding land."""
        old, self.capacity = self.capacity, capacity
        rows, length, device = capacity + 1, self.max_len, self.device

        def grown(name, fill, dtype, *shape):
            new = torch.full((rows, *shape), fill, dtype=dtype, device=device)
            if old:
                new[:old] = getattr(self, name)[:old]
            setattr(self, name, new)

        grown("logits", float("nan"), torch.float32, length)
        grown("conf", float("nan"), torch.float32, length)  # token confidence of the distribution at t (DeepConf)
        grown("ids", -1, torch.int64, length)
        grown("sums", 0.0, torch.float32)
        grown("counts", 0, torch.int64)
        grown("thinks", -1, torch.int64)  # position of the latest `<think>` fed
        grown("evaluated", -1, torch.int64)  # last position t whose pair (x[t], x[t+1]) was seen
        grown("lengths", 0, torch.int64)
        grown("firsts", length, torch.int64)
        self.free.extend(range(capacity - 1, old - 1, -1))  # lowest slot handed out first

    @property
    def dump(self) -> int:
        return self.capacity

    def _slot(self, key: str) -> int:
        slot = self.slots.get(key)
        if slot is None:
            if not self.free:
                self._grow(2 * self.capacity)
            slot = self.slots[key] = self.free.pop()
        return slot

    def _release(self, key: str) -> None:
        slot = self.slots.pop(key, None)
        self.features.pop(key, None)
        if slot is None:
            return
        self.logits[slot].fill_(float("nan"))
        self.conf[slot].fill_(float("nan"))
        self.ids[slot].fill_(-1)
        for name, value in (("sums", 0.0), ("counts", 0), ("thinks", -1), ("evaluated", -1), ("lengths", 0),
                            ("firsts", self.max_len)):  # fmt: skip
            getattr(self, name)[slot] = value
        self.free.append(slot)
        self.req_keys = {r: v for r, v in self.req_keys.items() if v is None or v[0] != key}
        self._batch = (None, None, None)

    # -- one model step -----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def record_step(
        self, req_ids, counts, extra_of, positions, input_ids, logits, hidden, *, confidence=None,
        prompt_length_of=None,
    ) -> None:  # fmt: skip
        """req_ids: the flat batch's requests in order, `counts` their token counts; `extra_of(req_id)`: the
        request's `extra_args` (or None); positions, input_ids, logits: [N] device tensors (N >= sum(counts):
        trailing padding lands in the dump row); hidden: [N, H] layer L-2 rows (read only for features).
        confidence: [len(req_ids)] token confidence of each request's last token (the distribution it samples
        from), kept from the prompt's last position on (`prompt_length_of(req_id)`); None when off."""
        self.steps += 1
        req_ids = tuple(req_ids)
        if self._batch[0] != req_ids:  # requests that left the batch are looked up again if they come back
            self.req_keys = {r: self.req_keys[r] for r in req_ids if r in self.req_keys}
            slots = np.array([self._slot_of(r, extra_of) for r in req_ids], dtype=np.int64)
            self._batch = (req_ids, slots, None)
        slot_of_request = self._batch[1]
        total = int(positions.shape[0])
        per_token = np.full(total, self.dump, dtype=np.int64)
        used = int(sum(counts))
        per_token[:used] = np.repeat(slot_of_request, np.asarray(counts, dtype=np.int64))
        slots = torch.from_numpy(per_token).to(self.device, non_blocking=True)
        self._update(slots, positions.to(torch.int64), input_ids.to(torch.int64), logits.to(torch.float32))
        if confidence is not None and prompt_length_of is not None and len(confidence) == len(req_ids) and used:
            self._keep_confidence(req_ids, counts, positions, confidence, prompt_length_of)
        if self.features:
            self._keep_feature_rows(req_ids, counts, positions, input_ids, hidden)

    def _slot_of(self, req_id: str, extra_of) -> int:
        if req_id not in self.req_keys:
            extra = extra_of(req_id) or {}
            self.req_keys[req_id] = (extra[EXTRA_KEY], bool(extra.get(EXTRA_FEATURES))) if EXTRA_KEY in extra else None
        entry = self.req_keys[req_id]
        if entry is None:
            return self.dump
        key, features = entry
        if features:
            self.features.setdefault(key, _Rows())
        return self._slot(key)

    def _keep_confidence(self, req_ids, counts, positions, confidence, prompt_length_of) -> None:
        """conf[slot, t] at each request's last position t of the step (its logits were computed: the token at t + 1
        is sampled from them), from the prompt's last position on. Device ops; the prompt lengths are host data."""
        if self._batch[2] is None:
            lengths = np.array([prompt_length_of(r) for r in req_ids], dtype=np.int64)
            self._batch = (*self._batch[:2], torch.from_numpy(lengths).to(self.device))
        last = torch.from_numpy(np.cumsum(np.asarray(counts, dtype=np.int64)) - 1).to(self.device)
        slots = torch.from_numpy(self._batch[1]).to(self.device)
        where = positions.to(torch.int64)[last].clamp(0, self.max_len - 1)
        kept = (where >= self._batch[2] - 1) & (slots < self.dump)
        slots = torch.where(kept, slots, torch.full_like(slots, self.dump))
        self.conf[slots, where] = confidence.to(torch.float32)

    def _update(self, slots, pos, ids, z) -> None:
        """The step's device work: fixed shapes ([N] per token, [capacity + 1] per slot), no host read."""
        pos = pos.clamp(0, self.max_len - 1)
        self.logits[slots, pos] = z
        self.ids[slots, pos] = ids
        self.lengths.scatter_reduce_(0, slots, pos + 1, "amax")
        self.firsts.scatter_reduce_(0, slots, pos, "amin")
        # A `<think>` fed now moves the span's start: the steps counted before it no longer count.
        think_here = torch.where(ids == self.think_start_id, pos, torch.full_like(pos, -1))
        thinks = self.thinks.clone().scatter_reduce_(0, slots, think_here, "amax")
        moved = thinks > self.thinks
        self.sums.masked_fill_(moved, 0.0)
        self.counts.masked_fill_(moved, 0)
        self.thinks.copy_(thinks)
        # The pair (x[t], x[t+1]) of t = pos - 1 is complete now: x[t] was fed this step or before.
        before = (pos - 1).clamp(min=0)
        prev_ids, prev_z = self.ids[slots, before], self.logits[slots, before]
        step_now = torch.isin(ids, self.step_tensor)
        scored = (
            (pos > 0)
            & step_now
            & (prev_ids >= 0)
            & ~torch.isin(prev_ids, self.step_tensor)
            & (prev_ids != self.think_start_id)
            & (before > thinks[slots])
            & (before > self.evaluated[slots])
        )
        contribution = torch.where(scored, clamped_log_sigmoid(prev_z), torch.zeros_like(prev_z))
        self.sums.index_add_(0, slots, contribution)
        self.counts.index_add_(0, slots, scored.to(torch.int64))
        seen = torch.where(pos > 0, before, torch.full_like(before, -1))
        self.evaluated.scatter_reduce_(0, slots, seen, "amax")

    def _keep_feature_rows(self, req_ids, counts, positions, input_ids, hidden) -> None:
        """The layer L-2 rows at positions t whose successor x[t+1] is a step token, x[t] is not one and is not
        `<think>` (host work, only for the requests that asked for features)."""
        lo = 0
        for req_id, n in zip(req_ids, counts, strict=True):
            entry = self.req_keys.get(req_id)
            if n and entry is not None and entry[1]:
                record = self.features[entry[0]]
                start = int(positions[lo])
                ids = input_ids[lo : lo + n].tolist()
                rows = hidden[lo : lo + n]
                if record.pending is not None:
                    t, token, row = record.pending
                    if t == start - 1 and self._could_score(token, ids[0]):
                        record.rows[t] = row
                    record.pending = None
                for i in range(len(ids) - 1):
                    if self._could_score(ids[i], ids[i + 1]):
                        record.rows[start + i] = rows[i].clone()
                record.pending = (start + len(ids) - 1, ids[-1], rows[-1].clone())
            lo += n

    def _could_score(self, token: int, successor: int) -> bool:
        return is_scorable_pair(token, successor, self.step_ids, self.think_start_id)

    # -- what the engine reads ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def fetch(self, wanted: dict[str, list[int]], features: bool = False) -> dict:
        """{key: (logits, rows)} at the wanted positions (None where a position has no value); drops the records.
        One device-to-host read for all keys. rows: [n][H] floats when `features` (None if a row is missing)."""
        keys = [key for key in wanted if key in self.slots]
        flat_slots = [self.slots[key] for key in keys for _ in wanted[key]]
        flat_positions = [min(max(int(t), 0), self.max_len - 1) for key in keys for t in wanted[key]]
        values = seen = []
        if flat_slots:
            slots = torch.tensor(flat_slots, dtype=torch.int64, device=self.device)
            where = torch.tensor(flat_positions, dtype=torch.int64, device=self.device)
            both = torch.stack([self.logits[slots, where].double(), (self.ids[slots, where] >= 0).double()])
            values, seen = self._read(both)
        found, i = {}, 0
        for key, positions in wanted.items():
            logits = [None] * len(positions)
            if key in self.slots:
                for j, t in enumerate(positions):
                    if seen[i] and 0 <= t < self.max_len:
                        logits[j] = values[i]
                    i += 1
            found[key] = (logits, self._feature_rows(key, positions) if features else None)
            self._release(key)
        return found

    def _feature_rows(self, key: str, positions: list[int]):
        record = self.features.get(key)
        if record is None:
            return None
        kept = dict(record.rows)
        if record.pending is not None:
            kept.setdefault(record.pending[0], record.pending[2])
        picked = [kept.get(t) for t in positions]
        if not all(row is not None for row in picked):
            return None
        return torch.stack(picked).float().tolist() if picked else []  # nested float lists: what the RPC carries

    @torch.inference_mode()
    def running(self, keys: list[str]) -> dict:
        """{key: (sum of clamped log p, scored steps, length fed, first position fed)} of the recorded keys, in one
        read (unknown keys are left out)."""
        known = [key for key in keys if key in self.slots]
        if not known:
            return {}
        slots = torch.tensor([self.slots[key] for key in known], dtype=torch.int64, device=self.device)
        table = torch.stack([self.sums[slots].double(), self.counts[slots].double(), self.lengths[slots].double(),
                             self.firsts[slots].double()])  # fmt: skip
        sums, counts, lengths, firsts = self._read(table)
        return {
            key: (sums[i], int(counts[i]), int(lengths[i]), int(firsts[i])) for i, key in enumerate(known)
        }  # fmt: skip

    @torch.inference_mode()
    def confidence(self, keys: list[str], window: int) -> dict:
        """{key: (mean token confidence of the latest window of `window` tokens, lowest mean over the full windows
        so far (the latest when none is full yet), tokens with a confidence)}: DeepConf's group confidence over a
        sliding window, computed on the device for all keys, one read."""
        known = [key for key in keys if key in self.slots]
        if not known:
            return {}
        slots = torch.tensor([self.slots[key] for key in known], dtype=torch.int64, device=self.device)
        rows = self.conf[slots]
        valid = ~torch.isnan(rows)
        sums = torch.where(valid, rows, torch.zeros_like(rows)).double().cumsum(1)
        counts = valid.to(torch.int64).cumsum(1)
        shift = min(window, rows.shape[1])

        def back(table):  # table[:, t - window], 0 before the start
            return torch.cat([torch.zeros_like(table[:, :shift]), table[:, : table.shape[1] - shift]], dim=1)

        in_window = counts - back(counts)
        means = (sums - back(sums)) / in_window.clamp(min=1)
        total = counts[:, -1]
        last = rows.shape[1] - 1 - valid.flip(1).to(torch.int64).argmax(1)
        latest = means.gather(1, last[:, None])[:, 0]
        full = valid & (in_window == window)
        lowest = torch.where(full, means, torch.full_like(means, float("inf"))).min(1).values
        lowest = torch.where(full.any(1), lowest, latest)
        latest, lowest, total = self._read(torch.stack([latest, lowest, total.double()]))
        return {key: (latest[i], lowest[i], int(total[i])) for i, key in enumerate(known)}

    @torch.inference_mode()
    def tokens(self, starts: dict[str, int]) -> dict:
        """{key: the ids fed at positions start, start + 1, ... (up to the first position not fed)}: what a stopped
        row wrote and the model read. One read for all keys."""
        out = {key: [] for key in starts}
        known = [key for key in starts if key in self.slots]
        if known:
            slots = torch.tensor([self.slots[key] for key in known], dtype=torch.int64, device=self.device)
            for key, row in zip(known, self._read(self.ids[slots]), strict=True):
                ids = row[max(0, starts[key]) :]
                out[key] = ids[: ids.index(-1)] if -1 in ids else ids
        return out

    def poll(self, keys: list[str], stopped: dict[str, int], window: int = 0) -> dict:
        """What the engine reads while pruning, in one call: "running" (`running(keys)`), "confidence"
        (`confidence(keys, window)`, when window > 0) and "stopped": {key: (ids fed from its start on, first
        position fed)} of rows the engine stopped."""
        firsts = self.running(list(stopped)) if stopped else {}
        return {
            "running": self.running(keys) if keys and not window else {},
            "confidence": self.confidence(keys, window) if keys and window else {},
            "stopped": {key: (ids, firsts.get(key, (0, 0, 0, 0))[3]) for key, ids in self.tokens(stopped).items()},
        }

    def _read(self, table: torch.Tensor) -> list[list[float]]:
        self.host_reads += 1
        return table.tolist()

    @torch.inference_mode()
    def drop(self, keys) -> None:
        for key in keys:
            self._release(key)

    def stats(self) -> dict:
        return {"steps": self.steps, "host_reads": self.host_reads, "records": len(self.slots)}
