"""Stand-ins for SLURM's ``sbatch`` and ``srun``, to run the submitit SLURM launcher without a
cluster.

``sbatch`` records the batch script, prints "Submitted batch job <id>" as SLURM does, and runs the
script in the background (once per array index), with the SLURM_* variables a job sees. ``srun``
starts the script's command once per task (``--ntasks-per-node`` x ``--nodes``, all on this
machine) with each task's SLURM_PROCID/SLURM_LOCALID, and fails if any task fails. What this
does not emulate: scheduling, time limits and their signals, requeueing, several machines.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

SBATCH = r"""
import os, re, subprocess, sys
from pathlib import Path

state = Path(os.environ["FAKE_SLURM_DIR"])
state.mkdir(parents=True, exist_ok=True)
script = Path(sys.argv[-1])
text = script.read_text()
job_id = 1000 + len(list(state.glob("*.sbatch")))
(state / f"{job_id}.sbatch").write_text(text)

def option(name, default=None):
    found = re.search(rf"^#SBATCH --{name}=(\S+)", text, re.M)
    return found.group(1) if found else default

array = option("array")
indices = range(int(array.split("-")[0]), int(array.split("-")[1].split("%")[0]) + 1) if array else [None]
for index in indices:
    env = dict(os.environ, SLURM_JOB_NAME=option("job-name", "sbatch"),
               SLURM_NNODES=option("nodes", "1"), SLURM_JOB_NUM_NODES=option("nodes", "1"),
               SLURM_NTASKS_PER_NODE=option("ntasks-per-node", "1"),
               SLURM_JOB_NODELIST="localhost", SLURM_NODELIST="localhost", SLURM_NODEID="0")
    env["SLURM_JOB_ID"] = str(job_id if index is None else job_id + 1 + index)
    if index is not None:
        env.update(SLURM_ARRAY_JOB_ID=str(job_id), SLURM_ARRAY_TASK_ID=str(index))
    log = open(state / f"{env['SLURM_JOB_ID']}.log", "w")
    subprocess.Popen(["bash", str(script)], env=env, stdout=log, stderr=subprocess.STDOUT,
                     start_new_session=True)
print(f"Submitted batch job {job_id}")
"""

SRUN = r"""
import os, subprocess, sys

args = sys.argv[1:]
while args and args[0].startswith("-"):
    flag = args.pop(0)
    if flag in ("--output", "--error", "-o", "-e"):
        args.pop(0)
tasks = int(os.environ.get("SLURM_NTASKS_PER_NODE", "1")) * int(os.environ.get("SLURM_NNODES", "1"))
processes = [
    subprocess.Popen(args, env=dict(os.environ, SLURM_NTASKS=str(tasks), SLURM_PROCID=str(rank),
                                    SLURM_LOCALID=str(rank), SLURM_STEP_NUM_TASKS=str(tasks)))
    for rank in range(tasks)
]
sys.exit(max(p.wait() for p in processes))
"""


def install_fake_slurm(bin_dir: Path) -> None:
    """Writes executable ``sbatch`` and ``srun`` into ``bin_dir`` (put it first on PATH, and set
    FAKE_SLURM_DIR to a folder for the recorded scripts and the jobs' output)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, body in (("sbatch", SBATCH), ("srun", SRUN)):
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\n{body}")
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def fake_slurm_env(bin_dir: Path, state_dir: Path) -> dict[str, str]:
    """The environment for a command that should see the fake SLURM."""
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "FAKE_SLURM_DIR": str(state_dir),
    }
