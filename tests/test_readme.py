"""README.md as a new user meets it: its code blocks, pasted in order, work.

Every fenced block has a language. ``bash``/``sh`` blocks run with ``bash -euo pipefail`` and
``python`` blocks with this interpreter, one after another in a scratch copy of the repository,
so a later block finds the runs an earlier one made (``hydra.run.dir=runs/vae``) and nothing lands
in the real checkout. Output (directory trees, logs, error messages) is fenced as ``text`` and
not run. The line just before a fence may mark its block:

- ``<!-- not run by the tests: REASON -->``: cannot run here (a GPU, a cluster, a download,
  TensorBoard's server, a package install); skipped, and the reason is required.
- ``<!-- slow in the tests: REASON -->``: runs only in the slow test (``pytest -m slow``), which
  runs every block that is not skipped; the default test runs the others.

A ``python`` block whose first line is ``# <path>`` is an excerpt of that file (the worked
example of "Adding a model"): it must appear verbatim in the package source and is not run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

README = REPO_ROOT / "README.md"
RUN_LANGUAGES = {"bash", "sh", "python"}
SHOWN_LANGUAGES = {"text", "yaml", "markdown"}
MARKER = re.compile(r"<!--\s*(not run by the tests|slow in the tests)\s*:?\s*(.*?)\s*-->")
EXCERPT_HEADER = re.compile(r"#\s*(\S+\.(?:py|yaml))\s*$")
BLOCK_TIMEOUT_S = 1800
# Top-level paths of the checkout that are not copied: outputs of earlier runs, data, git.
NOT_COPIED_AT_TOP = {".git", ".venv", "runs", "outputs", "multirun", "data", "lightning_logs"}
NOT_COPIED = {"__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache"}


@dataclass
class Block:
    language: str
    code: str
    line: int  # 1-based line of the opening fence
    section: str
    marker: str | None  # "not run by the tests" | "slow in the tests" | None
    reason: str

    @property
    def excerpt_of(self) -> str | None:
        """The file this block quotes (its ``# <path>`` first line), or None."""
        first = self.code.split("\n", 1)[0]
        match = EXCERPT_HEADER.fullmatch(first)
        return match.group(1) if match else None

    @property
    def runs(self) -> bool:
        return (
            self.language in RUN_LANGUAGES
            and self.marker != "not run by the tests"
            and not (self.language == "python" and self.excerpt_of)
        )

    def describe(self) -> str:
        return f"README.md:{self.line} ({self.section!r}, {self.language})"


def parse_readme(text: str) -> list[Block]:
    """The fenced code blocks of a Markdown text, in order, with the marker before each."""
    lines = text.split("\n")
    blocks, section, i = [], "", 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#") and not line.startswith("#!"):
            section = line.lstrip("#").strip()
        if line.startswith("```"):
            language = line[3:].strip()
            start = i
            i += 1
            body = []
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            assert i < len(lines), f"README.md:{start + 1}: the fence is never closed"
            previous = lines[start - 1].strip() if start > 0 else ""
            match = MARKER.fullmatch(previous)
            blocks.append(
                Block(
                    language=language,
                    code="\n".join(body) + "\n",
                    line=start + 1,
                    section=section,
                    marker=match.group(1) if match else None,
                    reason=match.group(2) if match else "",
                )
            )
        i += 1
    return blocks


BLOCKS = parse_readme(README.read_text())


def test_every_block_has_a_language_and_every_marker_a_reason():
    for block in BLOCKS:
        assert block.language in RUN_LANGUAGES | SHOWN_LANGUAGES, (
            f"{block.describe()}: fence it as one of {sorted(RUN_LANGUAGES | SHOWN_LANGUAGES)} "
            "(output as ```text)"
        )
        if block.marker:
            assert block.reason, f"{block.describe()}: `{block.marker}` needs a reason"
            assert block.language in RUN_LANGUAGES, f"{block.describe()}: marks a block not run"
    # A marker that is not on the line just before a fence, or is misspelled, would be ignored.
    lines = README.read_text().split("\n")
    for number, line in enumerate(lines[:-1], start=1):
        comment = line.strip().startswith("<!--")
        if comment and ("not run by the tests" in line or "slow in the tests" in line):
            assert MARKER.fullmatch(line.strip()), f"README.md:{number}: malformed marker"
            assert lines[number].startswith("```"), f"README.md:{number}: no fence after it"


def test_source_excerpts_are_verbatim():
    """Quoted source (``# <path>`` first line) is the shipped file's text, so it cannot drift."""
    excerpts = [b for b in BLOCKS if b.excerpt_of and (REPO_ROOT / b.excerpt_of).is_file()]
    for block in excerpts:
        body = block.code.split("\n", 1)[1]
        assert body in (REPO_ROOT / block.excerpt_of).read_text(), (
            f"{block.describe()} is not verbatim in {block.excerpt_of}:\n{body}"
        )
    for block in BLOCKS:
        if block.language == "python" and block.excerpt_of:
            assert block in excerpts, f"{block.describe()} quotes a missing {block.excerpt_of}"
    # The worked example of a new part: its class and its config file, both shipped.
    adding = {b.excerpt_of for b in excerpts if b.section == "Adding a model"}
    assert {
        "vae_experiments/models/likelihoods.py",
        "vae_experiments/configs/model/likelihood/laplace.yaml",
    } <= adding


def test_the_worked_example_is_trained_by_a_block_that_runs():
    commands = [b for b in BLOCKS if b.section == "Adding a model" and b.runs]
    assert any("model/likelihood=laplace" in b.code for b in commands)
    assert all(b.marker is None for b in commands), "the worked example runs in the default suite"


def test_the_load_a_run_snippet_prints_nothing_but_its_numbers(tmp_path, trained_runs):
    (block,) = [b for b in BLOCKS if 'load_run("runs/vae")' in b.code and b.runs]
    script = tmp_path / "snippet.py"
    script.write_text(block.code.replace('"runs/vae"', repr(str(trained_runs("vae")))))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-W", "default", str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no UserWarning about tensors that require grad, nor any other
    assert result.stdout.startswith("{'loss': ")


def _copy_repository(target: Path) -> Path:
    def ignore(folder: str, names: list[str]) -> set[str]:
        at_top = Path(folder).resolve() == REPO_ROOT.resolve()
        return {
            name
            for name in names
            if name in NOT_COPIED
            or name.endswith(".egg-info")
            or (at_top and name in NOT_COPIED_AT_TOP)
            # a virtual environment under any name (README's is .venv): gigabytes, not ours
            or (Path(folder) / name / "pyvenv.cfg").is_file()
        }

    shutil.copytree(REPO_ROOT, target, ignore=ignore)
    return target


def _run_blocks(blocks: list[Block], tmp_path: Path) -> None:
    repo = _copy_repository(tmp_path / "repo")
    scripts = tmp_path / "blocks"
    scripts.mkdir()
    env = {
        **os.environ,
        # The copy's package, not an installed one; `python` is this interpreter.
        "PYTHONPATH": str(repo),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "MPLBACKEND": "Agg",
        "VAE_CACHE_DIR": str(tmp_path / "cache"),
    }
    env.pop("VAE_DATA_DIR", None)
    for number, block in enumerate(blocks):
        if block.language == "python":
            script = scripts / f"block_{number:02d}.py"
            command = [sys.executable, str(script)]
        else:
            script = scripts / f"block_{number:02d}.sh"
            command = ["bash", "-euo", "pipefail", str(script)]
        script.write_text(block.code)
        try:
            result = subprocess.run(
                command,
                cwd=repo,
                env=env,
                capture_output=True,
                text=True,
                timeout=BLOCK_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired as error:
            pytest.fail(f"{block.describe()} ran over {BLOCK_TIMEOUT_S} s:\n{block.code}\n{error}")
        if result.returncode != 0:
            pytest.fail(
                f"{block.describe()} failed with exit code {result.returncode}:\n"
                f"{block.code}\n--- stdout (end) ---\n{result.stdout[-3000:]}\n"
                f"--- stderr (end) ---\n{result.stderr[-6000:]}",
                pytrace=False,
            )


def test_readme_blocks_run_in_order(tmp_path):
    """The blocks that are neither skipped nor slow (a few minutes on 2 CPU cores)."""
    _run_blocks([b for b in BLOCKS if b.runs and b.marker is None], tmp_path)


@pytest.mark.slow
def test_readme_all_blocks_run_in_order(tmp_path):
    """Every block that can run here, the slow ones too."""
    _run_blocks([b for b in BLOCKS if b.runs], tmp_path)
