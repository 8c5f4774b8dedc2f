"""`SPRMWorkerExtension`: mixed into vLLM's worker (`worker_extension_cls`), reached with `LLM.collective_rpc`.

`sprm_install` puts a `StepRecorder` behind the model runner's step (see `compat.wrap_model_runner`); the engine
then calls `sprm_fetch` for the logits (and rows) at the positions it scores, and `sprm_drop` to forget requests.
"""

from __future__ import annotations

import sprm_kernels.model.engines.vllm.compat as compat
from sprm_kernels.model.engines.vllm.recorder import StepRecorder


class SPRMWorkerExtension:
    def sprm_install(self, step_token_ids: list[int], think_start_id: int) -> bool:
        recorder = getattr(self, "_sprm_recorder", None)
        if recorder is None:
            recorder = self._sprm_recorder = StepRecorder(step_token_ids, think_start_id)
            compat.wrap_model_runner(self.model_runner, recorder)
        return True

    def sprm_fetch(self, wanted: dict[str, list[int]], features: bool = False) -> dict:
        return self._sprm_recorder.fetch(wanted, features)

    def sprm_drop(self, keys: list[str]) -> int:
        self._sprm_recorder.drop(keys)
        return len(self._sprm_recorder.records)
