"""Feedback on long commands: a line per job of a sweep as it ends, with its place in the whole."""

from __future__ import annotations

import logging

from vae_experiments.cli import job_progress
from vae_experiments.cli.job_progress import wait_for_jobs


class FakeJob:
    """A submitit job that is done after ``polls`` looks, and then succeeds or fails."""

    def __init__(self, polls: int, error: Exception | None = None):
        self.polls, self.error = polls, error

    def done(self) -> bool:
        self.polls -= 1
        return self.polls < 0

    def results(self):
        if self.error is not None:
            raise self.error
        return [type("JobReturn", (), {"status": type("Status", (), {"name": "COMPLETED"})})()]


def test_each_job_is_said_as_it_ends_with_its_place_in_the_whole(monkeypatch, caplog):
    monkeypatch.setattr(job_progress.time, "sleep", lambda seconds: None)
    jobs = [FakeJob(3), FakeJob(0), FakeJob(1, RuntimeError("CUDA out of memory\nsecond line"))]
    described = ["model.latent_dim=2", "model.latent_dim=8", "model.latent_dim=32"]
    clock = iter(range(0, 1000, 10))
    with caplog.at_level(logging.INFO, logger="vae_experiments.cli.job_progress"):
        wait_for_jobs(jobs, described, first_index=4, clock=lambda: float(next(clock)))
    assert [r.getMessage() for r in caplog.records] == [
        "job 1 of 3 finished after 10 s: #5 model.latent_dim=8 (2 running or waiting)",
        "job 2 of 3 failed (second line) after 20 s: #6 model.latent_dim=32 "
        "(1 running or waiting; 1 failed so far)",
        "job 3 of 3 finished after 30 s: #4 model.latent_dim=2 (0 running or waiting; "
        "1 failed so far)",
    ]


def test_progress_bars_are_drawn_on_a_terminal_only(monkeypatch):
    import io
    import sys

    from vae_experiments.training.callbacks import shows_progress_bars

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a pipe or a log file
    assert not shows_progress_bars()
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert shows_progress_bars()
