"""Run a per-item task over many items in chunks on a few threads, with a progress bar."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")

# Items per task: few enough futures for 200k files, small enough to stop soon after an error.
CHUNK = 64


def map_chunks(task: Callable[[int, int], list[T]], total: int, threads: int, desc: str) -> list[T]:
    """Call ``task(start, stop)`` on consecutive chunks of ``range(total)``; join the results.

    Threads suit work that releases the GIL (PIL decoding and resizing, file reads). The first
    exception, or Ctrl-C, cancels the chunks not yet started and is raised.

    Args:
        task: Handles items ``start <= i < stop`` and returns a list (e.g. of problems found).
        total: Number of items.
        threads: Worker threads; 1 or less runs in the calling thread.
        desc: Progress bar label.

    Returns:
        The tasks' lists concatenated in item order.
    """
    results: list[T] = []
    starts = range(0, total, CHUNK)
    with tqdm(total=total, desc=desc, unit="img", mininterval=1.0) as bar:
        if threads <= 1:
            for start in starts:
                results += task(start, min(start + CHUNK, total))
                bar.update(min(CHUNK, total - start))
            return results
        pool = ThreadPoolExecutor(threads)
        try:
            chunks = pool.map(lambda start: task(start, min(start + CHUNK, total)), starts)
            for start, chunk in zip(starts, chunks, strict=True):
                results += chunk
                bar.update(min(CHUNK, total - start))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    return results
