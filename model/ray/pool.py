"""One engine per Ray actor, problems streamed through a Ray Data pipeline: the machinery the batch jobs share.

`run(items, Worker, kwargs, workers)` puts one problem per block into `Dataset.map_batches` over a fixed pool of
`workers.num_workers` actors (each constructs `Worker(**kwargs)` once: it loads its own engine) and yields the
output rows in problem order (`preserve_order`). Faults: Ray Data creates the pool's actors with unlimited restarts
and task retries, so a killed actor is restarted and its unfinished problems run again; the caller keys what it
writes by problem id (see `output.RowWriter`), so a problem is never lost nor written twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from sprm_kernels.model.core.progress import counter
from sprm_kernels.model.ray.cluster import Workers


def run(items: list[dict], worker_cls: type, kwargs: dict, workers: Workers, *, address: str | None = None,
        ) -> Iterator[dict]:  # fmt: skip
    """Rows {"id", "row" (JSON text), "pid"} of `worker_cls(**kwargs)(batch)`, one per item, in item order."""
    from sprm_kernels.model.ray.cluster import connect

    ray = connect(address)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # output in problem order, whatever finishes first
    context.enable_progress_bars = False  # the job shows one bar over problems (see `progress`)
    dataset = ray.data.from_items(items, override_num_blocks=len(items))  # one problem per task
    dataset = dataset.map_batches(
        worker_cls, fn_constructor_kwargs=kwargs, batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=workers.num_workers),
        num_cpus=workers.cpus_per_worker, num_gpus=workers.gpus_per_worker or None,
    )  # fmt: skip
    yield from dataset.iter_rows()


def progress(total: int, description: str, enabled: bool) -> Callable[[], None]:
    """The per-problem update of a bar on stderr (a count line every 25 problems without tqdm)."""
    return counter(total, description, enabled, every=25)
