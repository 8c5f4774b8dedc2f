"""Progress on stderr: one tqdm wrapper for every loop that shows one (generation, search, evaluation, training,
Ray jobs). Without tqdm installed, bars are None and `track` / `counter` print a count line now and then."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Sized


def progress_bar(total: int | None, description: str, enabled: bool, **options):
    """A tqdm bar on stderr, or None when disabled, when `total` is 0 or when tqdm is not installed. `options` go to
    tqdm (e.g. `leave=False`, `unit="problem"`)."""
    if not enabled or total == 0:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=description, file=sys.stderr, **options)


def track(items: Iterable, description: str, enabled: bool, *, every: int = 1) -> Iterator:
    """Iterate `items` with a bar; without tqdm, a `description: done/total` line every `every` items."""
    total = len(items) if isinstance(items, Sized) else None
    update = counter(total, description, enabled, every=every)
    for item in items:
        yield item
        update()


def counter(total: int | None, description: str, enabled: bool, *, every: int = 1) -> Callable[[], None]:
    """The per-item update of a bar over `total` items (closes itself at the last); a no-op when disabled."""
    if not enabled:
        return lambda: None
    bar = progress_bar(total, description, enabled)
    done = [0]

    def update() -> None:
        done[0] += 1
        if bar is not None:
            bar.update(1)
            if total is not None and done[0] >= total:
                bar.close()
        elif done[0] % every == 0 or done[0] == total:
            print(f"{description}: {done[0]}/{total if total is not None else '?'}", file=sys.stderr, flush=True)

    return update


def log(message: str, bar=None) -> None:
    """A line that does not break a running bar."""
    if bar is not None:
        bar.write(message)
    else:
        print(message, flush=True)
