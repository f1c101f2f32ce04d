"""A line per job of a sweep as it ends, with its place in the whole: ``job 3 of 12 finished
after 41 s: model.latent_dim=8``.

submitit's launchers (``hydra/launcher=submitit``, ``slurm``) submit every job of a sweep and
then wait for their results, silently: a sweep of 12 jobs printed nothing for many minutes.
:func:`reporting_progress` wraps their wait; the jobs themselves are unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

log = logging.getLogger(__name__)

#: Seconds between two looks at the jobs (submitit itself asks SLURM at most once a minute).
POLL_SECONDS = 2.0


def job_outcome(job: Any) -> str:
    """``finished`` or ``failed`` (with why) for a submitit job that is done."""
    try:
        result = job.results()[0]  # Hydra's JobReturn; raises for a job that crashed
    except Exception as error:
        first = str(error).strip().splitlines()
        return f"failed ({first[-1] if first else type(error).__name__})"
    status = getattr(getattr(result, "status", None), "name", "COMPLETED")
    if status == "COMPLETED":
        return "finished"
    try:
        result.return_value  # noqa: B018 - re-raises the task's exception
    except Exception as error:
        return (
            f"failed ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
        )
    return "failed"


def wait_for_jobs(
    jobs: Sequence[Any],
    described: Sequence[str],
    first_index: int = 0,
    poll_seconds: float = POLL_SECONDS,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Waits until every job is done, logging each as it ends: ``job 3 of 12 finished after
    41 s: #2 model.latent_dim=8`` (its place among ``jobs``, and its job number in the sweep).

    Args:
        jobs: submitit jobs (anything with ``done()`` and ``results()``).
        described: each job's overrides, as Hydra lists them.
        first_index: the sweep's job number of ``jobs[0]``.
    """
    start = clock()
    total = len(jobs)
    pending = dict(enumerate(jobs))
    ended = failed = 0
    while pending:
        for place, job in list(pending.items()):
            if not job.done():
                continue
            del pending[place]
            ended += 1
            outcome = job_outcome(job)
            failed += outcome.startswith("failed")
            so_far = f"; {failed} failed so far" if failed else ""
            log.info(
                "job %d of %d %s after %.0f s: #%d %s (%d running or waiting%s)",
                ended,
                total,
                outcome,
                clock() - start,
                first_index + place,
                described[place],
                len(pending),
                so_far,
            )
        if pending:
            time.sleep(poll_seconds)


@contextlib.contextmanager
def reporting_progress(described: Sequence[str], first_index: int) -> Iterator[None]:
    """Inside, the jobs that ``submitit.AutoExecutor.map_array`` submits are waited for with
    :func:`wait_for_jobs` before they are returned, so that the launcher's own wait for their
    results (hydra-submitit-launcher's ``launch``) finds them done."""
    import submitit

    submit = submitit.AutoExecutor.map_array

    def map_array(executor: Any, *args: Any, **kwargs: Any) -> Any:
        jobs = submit(executor, *args, **kwargs)
        log.info("%d jobs submitted; a line as each ends", len(jobs))
        wait_for_jobs(jobs, described, first_index)
        return jobs

    submitit.AutoExecutor.map_array = map_array
    try:
        yield
    finally:
        submitit.AutoExecutor.map_array = submit
