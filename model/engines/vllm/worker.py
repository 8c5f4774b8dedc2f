"""`SPRMWorkerExtension`: mixed into vLLM's worker (`worker_extension_cls`), reached with `LLM.collective_rpc`.

`sprm_install` puts a `StepRecorder` behind the model runner's step (see `compat.wrap_model_runner`); the engine
then calls `sprm_fetch` for the logits (and rows) at the positions it scores, `sprm_running` for the running step
scores of rows still decoding, `sprm_tokens` for what a stopped row fed, `sprm_start_confidence` and
`sprm_confidence` for DeepConf's token confidence, `sprm_poll` for what pruning reads (those, in one call), and
`sprm_drop` to forget requests. `sprm_stats` says how many steps were recorded and how often the host read the
device buffers.
"""

from __future__ import annotations

import sprm_kernels.model.engines.vllm.compat as compat
from sprm_kernels.model.engines.vllm.recorder import StepRecorder


class SPRMWorkerExtension:
    def sprm_install(self, step_token_ids: list[int], think_start_id: int) -> bool:
        recorder = getattr(self, "_sprm_recorder", None)
        if recorder is None:
            runner = self.model_runner
            recorder = StepRecorder(step_token_ids, think_start_id, compat.runner_max_len(runner), runner.device)
            self._sprm_recorder = recorder
            compat.wrap_model_runner(runner, recorder)
        return True

    def sprm_fetch(self, wanted: dict[str, list[int]], features: bool = False) -> dict:
        return self._sprm_recorder.fetch(wanted, features)

    def sprm_running(self, keys: list[str]) -> dict:
        return self._sprm_recorder.running(keys)

    def sprm_start_confidence(self) -> bool:
        compat.enable_confidence(self.model_runner)
        return True

    def sprm_confidence(self, keys: list[str], window: int) -> dict:
        return self._sprm_recorder.confidence(keys, window)

    def sprm_poll(self, keys: list[str], stopped: dict[str, int], window: int = 0) -> dict:
        return self._sprm_recorder.poll(keys, stopped, window)

    def sprm_tokens(self, starts: dict[str, int]) -> dict:
        return self._sprm_recorder.tokens(starts)

    def sprm_drop(self, keys: list[str]) -> int:
        self._sprm_recorder.drop(keys)
        return len(self._sprm_recorder.slots)

    def sprm_stats(self) -> dict:
        return self._sprm_recorder.stats()
