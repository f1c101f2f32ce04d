"""Times ``python train.py`` against a training loop written by hand, case by case.

    python scripts/benchmark.py                       # the default cases; CPU-sized subsets on a CPU
    python scripts/benchmark.py --cases burda         # one case (batch 20, Burda et al.'s VAE)
    python scripts/benchmark.py --cases mlp_vae --threads 1 --clock cpu
    python scripts/benchmark.py --variants compile,bf16,nchw,ungrouped  # options of ours too
    python scripts/benchmark.py --cases burda --epochs 2 --repeats 1 --smoke 20  # does it run?

Each training case times these paths, each for ``--epochs`` epochs, ``--repeats`` times,
alternating:

- ``hand-written``: ``scripts/hand_written.py`` as a process of its own, the loop a researcher
  writes in an afternoon, importing nothing of ours (nor Lightning): it reads the IDX files
  itself, its own ``nn.Sequential`` networks and loss, ``torch.optim.Adam`` with torch's
  defaults but the case's lr/eps/betas (and the case's epoch lr schedule), a full validation pass
  per epoch. The denominator of every ratio.
- ``plain loop around our model.loss``: a bare loop in this process around our model's
  ``loss`` (same data path, optimizer and schedule as the hand-written loop): the table splits
  the model's own cost (this row over the hand-written one) from our loop's (ours over this row).
- ``ours``: ``python train.py`` as a process, exactly as a user types it at a terminal (through a
  pseudo-terminal, so the progress bar shows), with the defaults on (TensorBoard logger,
  checkpoints, image grids); ``ours + <variant>`` the same with a ``--variants`` option.

A path's figure is its fastest run's steady epoch (the median of a run's epochs after the first),
in wall-clock or CPU seconds (``--clock``), each epoch timed from its start to the next epoch's,
validation included; the spread of the runs is printed. The hand-written loop's test loss
(negative ELBO, nats per image) is compared with ours: the same objective trained alike agrees
within ``TEST_LOSS_TOLERANCE``. The IWAE case times
``vae_experiments.analysis.likelihood.evaluate_vae`` against a plainly written batched
log-sum-exp with the same chunk budget. The table is printed and written into BENCHMARKS.md
(``--markdown``) as a section of its own for this machine and these cases, replacing an earlier
one of the same heading.

Fashion-MNIST is read from ``$VAE_DATA_DIR`` / ``data/`` or Debian's
``/usr/share/datasets/fashion-mnist`` (``apt-get install dataset-fashion-mnist``); the 64x64 case
uses generated images (``data=synthetic``) and has no hand-written loop: its baseline is the plain
loop around our model.
"""

from __future__ import annotations

import os

#: The environment the benchmark was started with, for both processes: before anything of ours
#: is imported, so that nothing we set (nor Lightning, e.g. PYTORCH_NVML_BASED_CUDA_CHECK)
#: reaches the hand-written loop.
USER_ENV = dict(os.environ)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import importlib.metadata  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import select  # noqa: E402
import statistics  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from time import monotonic  # noqa: E402

import torch  # noqa: E402

from vae_experiments.configs import CONFIG_DIR as PACKAGE_CONFIG_DIR  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = Path(PACKAGE_CONFIG_DIR)
HAND_WRITTEN_SCRIPT = Path(__file__).resolve().parent / "hand_written.py"

#: Where the case's evaluation batch size is read from, when the config has the key (default:
#: the training batch size); both loops validate and test at the size our run does.
EVAL_BATCH_SIZE_KEY = "eval_batch_size"

#: How far the hand-written loop's test loss may be from ours, as a fraction of it, for "the same
#: objective". Not bit-equal: the two draw different random streams (initial weights, shuffles,
#: Bernoulli draws of the training batches and of the evaluation splits, the sampled z of each
#: ELBO). Runs of a few epochs that differ only so land a few tenths of a nat apart at about 250
#: nats (up to 1 nat with 1,000-step epochs); a different objective (a KL left out or weighted,
#: a mean instead of a sum over pixels, grey targets instead of binary) is tens of nats away.
TEST_LOSS_TOLERANCE = 0.01


@dataclass
class Case:
    """One training case: the ``train.py`` overrides, and how to shrink it on a CPU.

    ``hand_written``: whether ``scripts/hand_written.py`` runs it (Fashion-MNIST VAEs); if not,
    the plain loop around our model is the baseline.
    """

    title: str
    overrides: list[str]
    cpu_overrides: list[str] = field(default_factory=list)
    hand_written: bool = True


#: Small-batch cases: 1,000 steps per epoch, every device (the step count, not the data, matters).
BATCH_20_STEPS = ["+trainer.limit_train_batches=1000"]
TRAINING_CASES = {
    "burda": Case(
        "Burda et al.'s 1-layer VAE 784-200-200-50 tanh (experiment=burda_vae_1layer: dynamic "
        "binarization, Adam eps 1e-4, its epoch lr schedule, on every path) on Fashion-MNIST, "
        "batch 20, 1,000 training batches per epoch, validation over all 5,000 images",
        ["experiment=burda_vae_1layer", "data=fashion_mnist", *BATCH_20_STEPS],
    ),
    "mlp_vae": Case(
        "MLP VAE 784-512-16 ReLU, Bernoulli, Fashion-MNIST, batch 128, full epochs",
        [
            "model=vae",
            "model/network=mlp",
            "model/likelihood=bernoulli",
            "model.network.hidden_dims=[512]",
            "model.latent_dim=16",
            "data=fashion_mnist",
            "data.batch_size=128",
        ],
    ),
    "conv_vae": Case(
        "conv VAE (default: 4 stride-2 conv blocks 32-256, latent 16), Bernoulli, Fashion-MNIST, "
        "batch 128; on a CPU 40 training batches and 500 validation images per epoch",
        [
            "model=vae",
            "model/network=conv",
            "model/likelihood=bernoulli",
            "data=fashion_mnist",
            "data.batch_size=128",
        ],
        # One validation batch of data.eval_batch_size (500 images) per 40 training batches of
        # 128 (5,120 images): a full epoch's proportion (5,000 to 55,000), as validation costs
        # ours its monitoring terms (recon_mse's decoder pass, active units' encoder pass).
        ["+trainer.limit_train_batches=40", "+trainer.limit_val_batches=1"],
    ),
    "conv_vae_64": Case(
        "conv VAE (default), 64x64 RGB generated (CelebA-sized), batch 64; baseline: the plain "
        "loop around our model (no hand-written loop for generated images)",
        [
            "model=vae",
            "model/network=conv",
            "model/likelihood=bernoulli",
            "data=synthetic",
            "data.source.image_shape=[3,64,64]",
            "data.source.num_train=162770",
            "data.source.num_val=19867",
            "data.source.num_test=19962",
            "data.batch_size=64",
        ],
        ["data.source.num_train=1280", "data.source.num_val=320", "data.source.num_test=64"],
        hand_written=False,
    ),
    "tiny": Case(
        "MLP VAE 784-8-2 (arithmetic nearly free: the loops' own cost per step), Fashion-MNIST, "
        "batch 20, 1,000 training batches per epoch",
        [
            "model=vae",
            "model/network=mlp",
            "model/likelihood=bernoulli",
            "model.network.hidden_dims=[8]",
            "model.latent_dim=2",
            "data=fashion_mnist",
            "data.batch_size=20",
            *BATCH_20_STEPS,
        ],
    ),
}
IWAE_CASE = "iwae"
ALL_CASES = [*TRAINING_CASES, IWAE_CASE]
DEFAULT_CASES = ["burda", "mlp_vae", "conv_vae", "conv_vae_64", IWAE_CASE]
#: --cases names that stand for several cases.
CASE_GROUPS = {"batch20": ["burda", "tiny"]}

#: The rows of a training case, besides ours.
HAND = "hand-written"
HAND_NCHW = "hand-written nchw"  # conv cases with --variants nchw: ours + nchw's baseline
PLAIN = "plain loop around our model.loss"

#: --variants name -> (overrides for our path, applies to conv nets only)
VARIANTS = {
    "compile": (["compile=true"], False),
    "bf16": (["trainer.precision=bf16-mixed"], False),
    "nchw": (["channels_last=false"], True),  # the default is channels_last=true
    # Every step through Lightning's per-batch loop (the default groups up to 20 steps a batch).
    "ungrouped": (["steps_per_group=1"], False),
}


# ----------------------------------------------------------------------------- measuring


class PeakMemory:
    """Peak memory while inside: CUDA's allocator peak, or on a CPU this process's resident set
    sampled every 20 ms, above what it was on entry."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes = 0
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _poll(self, start: int) -> None:
        while not self._stop.wait(0.02):
            self.peak_bytes = max(self.peak_bytes, self._rss() - start)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif Path("/proc/self/statm").exists():
            self._thread = threading.Thread(target=self._poll, args=(self._rss(),), daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        elif hasattr(self, "_thread"):
            self._stop.set()
            self._thread.join()

    @property
    def label(self) -> str:
        kind = "GPU alloc" if self.device.type == "cuda" else "+RSS"
        return f"{self.peak_bytes / 2**20:,.0f} MiB {kind}"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def steady_seconds(epoch_seconds: list[float]) -> float:
    """Median epoch time without the first (warm-up) epoch, when there are others."""
    return statistics.median(epoch_seconds[1:] if len(epoch_seconds) > 1 else epoch_seconds)


@dataclass
class Run:
    """One run of one path: its epochs' wall and CPU seconds, test loss, peak memory and the
    CPU threads it computed with."""

    wall: list[float]
    cpu: list[float]
    test_loss: float
    memory: str
    threads: int | None

    def seconds(self, clock: str) -> float:
        """The steady epoch in ``clock`` (``wall`` or ``cpu``) seconds."""
        return steady_seconds(self.cpu if clock == "cpu" else self.wall)


class PathFailed(Exception):
    """A path's process failed: the message says which and ends in its output's last lines."""


def peak_rss(pid: int) -> int:
    """A process's peak resident set so far (VmHWM), in bytes; 0 once it is gone."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def run_process(command: list[str], output: Path) -> tuple[int, int]:
    """Runs ``command`` with the user's environment, its output into the file ``output``,
    through a pseudo-terminal where there is one, as a user's terminal shows it (progress bars
    and all). Returns the exit status and the process's peak resident memory in bytes."""
    try:
        import fcntl
        import pty
        import termios

        reader, writer = pty.openpty()
        fcntl.ioctl(writer, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    except (ImportError, OSError):  # no terminals here: a pipe
        reader, writer = os.pipe()
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=writer, stderr=writer, env=USER_ENV
    )
    os.close(writer)
    peak = 0
    with open(output, "wb") as log:
        while True:
            ready = select.select([reader], [], [], 0.5)[0]
            peak = max(peak, peak_rss(process.pid))
            if ready:
                try:
                    data = os.read(reader, 1 << 16)
                except OSError:  # EIO: the terminal's last writer has exited
                    data = b""
                if not data:
                    break
                log.write(data)
    os.close(reader)
    return process.wait(), peak


def output_tail(output: Path, lines: int = 15) -> str:
    """The last lines of a process's output (a progress bar's redraws taken as lines)."""
    text = output.read_text(errors="replace").replace("\r", "\n")
    return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])


# ----------------------------------------------------------------------------- configs and data


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from vae_experiments.config_checks import choose_likelihood

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=overrides)
    choose_likelihood(cfg)  # model/likelihood=auto (experiment presets): as train() does first
    return cfg


def load_data(cfg) -> tuple[dict[str, torch.Tensor], tuple[int, int, int]]:
    """The uint8 splits (N, C, H, W) of ``cfg.data``, through our data code (binarised once
    where ``data.binarize`` says so: val and test under ``dynamic``)."""
    from vae_experiments.runs import load_data as load_run_data

    data = load_run_data(cfg)
    return {name: split.images for name, split in data.splits.items()}, data.image_shape


def instantiate(cfg, key: str, **kwargs):
    from vae_experiments.targets import instantiate as instantiate_target

    return instantiate_target(cfg, key=key, **kwargs)


def build_model(cfg, image_shape) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)
    return instantiate(cfg.model, key="model", image_shape=list(image_shape))


def batch_limit(cfg, split: str) -> int | None:
    """``trainer.limit_<split>_batches`` as a number of batches (None: the whole split)."""
    limit = cfg.trainer.get(f"limit_{split}_batches")
    if limit is None or (isinstance(limit, float) and limit == 1.0):
        return None
    if not isinstance(limit, int):
        raise SystemExit(f"error: trainer.limit_{split}_batches={limit}: give a number of batches")
    return limit


def eval_batch_size(cfg) -> int:
    """The batch size our run validates and tests at."""
    from vae_experiments.data.images import evaluation_batch_size

    return evaluation_batch_size(cfg.data.batch_size, cfg.data.get(EVAL_BATCH_SIZE_KEY, "auto"))


def epoch_lr_schedule(cfg) -> tuple[list[int], float] | None:
    """The milestones and gamma of the run's epoch lr schedule (``scheduler=burda``), None for a
    constant lr; a schedule the loops here do not have is refused."""
    scheduler = cfg.get("scheduler")
    if not scheduler or scheduler.get("scheduler") is None:
        return None
    target = scheduler.scheduler._target_
    if target != "torch.optim.lr_scheduler.MultiStepLR" or scheduler.get("interval") != "epoch":
        raise SystemExit(
            f"error: the benchmark's loops have no {target} schedule; use scheduler=burda or none"
        )
    return [int(m) for m in scheduler.scheduler.milestones], float(scheduler.scheduler.gamma)


# ----------------------------------------------------------------------------- the hand-written loop


def hand_written_options(cfg, num_val: int) -> list[str]:
    """``scripts/hand_written.py``'s options for the run ``cfg`` describes. What that loop does
    not have (another model, likelihood, optimizer or dataset) is refused, naming the key."""
    model, optimizer = cfg.model, cfg.optimizer
    network = model.network._target_.rsplit(".", 1)[-1]
    needed = {
        "model": (model._target_.rsplit(".", 1)[-1], "VAE"),
        "model.likelihood": (model.likelihood._target_.rsplit(".", 1)[-1], "Bernoulli"),
        "model.beta": (float(model.beta), 1.0),
        "model.kl_warmup_steps": (int(model.kl_warmup_steps), 0),
        "model.k": (int(model.get("k", 1)), 1),
        "optimizer": (optimizer._target_, "torch.optim.Adam"),
        "optimizer.weight_decay": (float(optimizer.get("weight_decay", 0.0)), 0.0),
        "data.source": (cfg.data.source._target_.rsplit(".", 1)[-1], "FashionMNIST"),
    }
    for key, (value, wanted) in needed.items():
        if value != wanted:
            raise SystemExit(
                f"error: the hand-written loop needs {key}={wanted}, the case has {value}"
            )
    if cfg.data.binarize not in ("none", "dynamic") or network not in ("MLP", "Conv"):
        raise SystemExit(
            f"error: the hand-written loop has no data.binarize={cfg.data.binarize} "
            f"or model.network {network}"
        )
    options = ["--latent", str(model.latent_dim), "--val-size", str(num_val)]
    if network == "MLP":
        hidden = ",".join(str(h) for h in model.network.hidden_dims)
        options += ["--network", "mlp", "--hidden", hidden]
        options += ["--activation", model.network.get("activation", "relu")]
    else:
        options += [
            "--network",
            "conv",
            "--channels",
            ",".join(str(c) for c in model.network.channels),
        ]
    # Validation and test at the run's batch size, as a user writes it (ours evaluates in
    # batches of data.eval_batch_size: a default of ours), over the images our run evaluates.
    options += ["--batch-size", str(cfg.data.batch_size)]
    options += ["--binarize", cfg.data.binarize, "--lr", repr(float(optimizer.lr))]
    if optimizer.get("eps") is not None:
        options += ["--eps", repr(float(optimizer.eps))]
    if optimizer.get("betas") is not None:
        options += ["--betas", ",".join(repr(float(b)) for b in optimizer.betas)]
    schedule = epoch_lr_schedule(cfg)
    if schedule is not None:
        options += ["--lr-milestones", ",".join(str(m) for m in schedule[0])]
        options += ["--lr-gamma", repr(schedule[1])]
    if batch_limit(cfg, "train") is not None:
        options += ["--max-train-batches", str(batch_limit(cfg, "train"))]
    for split in ("val", "test"):
        limit = batch_limit(cfg, split)
        if limit is not None:  # our run's limit counts batches of data.eval_batch_size
            options += [f"--max-{split}-images", str(limit * eval_batch_size(cfg))]
    return options


def hand_written_run(
    options: list[str], output: Path, args: argparse.Namespace, device: torch.device
) -> Run:
    """``scripts/hand_written.py`` as a process of its own: its epochs, test loss and memory."""
    command = [sys.executable, str(HAND_WRITTEN_SCRIPT), *options]
    command += ["--epochs", str(args.epochs), "--seed", str(args.seed), "--device", str(device)]
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    with open(output, "w") as log:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=log, text=True, env=USER_ENV)
    if done.returncode != 0:
        raise PathFailed(f"{HAND} exited with {done.returncode}:\n{output_tail(output)}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["foreign_modules"]:
        raise PathFailed(
            f"{HAND} imported {result['foreign_modules']}: it must import none of ours"
        )
    if result["peak_gpu_bytes"] is not None:
        memory = f"{result['peak_gpu_bytes'] / 2**20:,.0f} MiB GPU alloc"
    else:
        memory = f"{result['peak_rss_bytes'] / 2**20:,.0f} MiB RSS"
    return Run(
        result["epoch_seconds"],
        result["epoch_cpu_seconds"],
        result["test_loss"],
        memory,
        result["threads"],
    )


# ----------------------------------------------------------------------------- the plain loop


@contextlib.contextmanager
def user_environment() -> Iterator[None]:
    """While inside, ``os.environ`` is :data:`USER_ENV` (what the benchmark started with)."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(USER_ENV)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def plain_training(
    model: torch.nn.Module,
    train_images: torch.Tensor,
    val_images: torch.Tensor,
    batch_size: int,
    epochs: int,
    make_optimizer: Callable[..., torch.optim.Optimizer],
    seed: int,
    max_train_batches: int | None,
    max_val_batches: int | None,
    device: torch.device,
    dynamic_binarization: bool = False,
    channels_last: bool = False,
    lr_schedule: tuple[list[int], float] | None = None,
    val_batch_size: int | None = None,
) -> tuple[list[float], list[float]]:
    """A bare loop around our model's ``loss``: returns the wall and the CPU seconds of each
    epoch, each from its start to the next one's, its validation pass included.

    ``make_optimizer`` takes the parameters (the run's ``optimizer=``, as ours gets it);
    ``dynamic_binarization`` resamples each training batch from Bernoulli(x), as
    ``data.binarize=dynamic`` does; ``channels_last`` stores weights and batches in NHWC;
    ``lr_schedule``: (milestones, gamma) of an epoch ``MultiStepLR``; validation batches have
    ``val_batch_size`` images (default: ``batch_size``).
    """
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(device, memory_format=memory_format)
    train_images, val_images = train_images.to(device), val_images.to(device)
    optimizer = make_optimizer(model.parameters())
    scheduler = (
        torch.optim.lr_scheduler.MultiStepLR(optimizer, *lr_schedule) if lr_schedule else None
    )
    num_batches = len(train_images) // batch_size
    if max_train_batches is not None:
        num_batches = min(num_batches, max_train_batches)
    val_size = val_batch_size or batch_size
    val_starts = range(0, len(val_images), val_size)[:max_val_batches]
    # Training steps read only "loss": a model that can leave out the terms that only monitor
    # training (``monitor=False``) is asked to, as our training steps do.
    unmonitored = (
        {"monitor": False} if "monitor" in inspect.signature(model.loss).parameters else {}
    )
    wall, cpu, step = [], [], 0
    synchronize(device)
    mark = time.perf_counter(), time.process_time()
    for epoch in range(epochs):
        model.train()
        generator = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(len(train_images), generator=generator).to(device)
        for batch in range(num_batches):
            # index_select: as fast as a careful hand-written loop gets (x[idx] is far slower).
            x = train_images.index_select(0, order[batch * batch_size : (batch + 1) * batch_size])
            x = x.float().div_(255)
            if dynamic_binarization:
                x = torch.bernoulli(x)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            loss = model.loss(x, step=step, **unmonitored)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        if scheduler is not None:
            scheduler.step()
        model.eval()
        total = torch.zeros((), device=device)
        with torch.no_grad():
            for first in val_starts:
                x = val_images[first : first + val_size].float().div_(255)
                x = x.contiguous(memory_format=memory_format)
                total += model.loss(x)["loss"] * len(x)
        val_loss = (total / min(len(val_images), len(val_starts) * val_size)).item()
        del val_loss  # computed as a real loop would (one host sync per epoch), then unused
        synchronize(device)
        now = time.perf_counter(), time.process_time()
        wall.append(now[0] - mark[0])
        cpu.append(now[1] - mark[1])
        mark = now
    return wall, cpu


@torch.no_grad()
def mean_loss(
    model: torch.nn.Module, images: torch.Tensor, batch_size: int, channels_last: bool = False
) -> float:
    """The model's evaluation loss averaged over uint8 ``images`` (N, C, H, W)."""
    model.eval()
    device = next(model.parameters()).device
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    total = 0.0
    for first in range(0, len(images), batch_size):
        x = images[first : first + batch_size].to(device).float().div_(255)
        total += float(model.loss(x.contiguous(memory_format=memory_format))["loss"]) * len(x)
    return total / len(images)


# ----------------------------------------------------------------------------- ours


def our_run(overrides: list[str], run_dir: Path, args: argparse.Namespace) -> Run:
    """``python train.py <overrides>`` as a process, as a user types it at a terminal (with
    ``threads=N`` for ``--threads N``): its epochs from the run's ``last.ckpt`` (EpochTimer's
    record), its test loss from ``metrics.json``, its threads from ``train.log``."""
    from vae_experiments.runs import LAST, METRICS_FILE, checkpoint_path
    from vae_experiments.runs.load import read_checkpoint

    command = [sys.executable, str(REPO_ROOT / "train.py"), *overrides, f"hydra.run.dir={run_dir}"]
    if args.threads is not None:
        command.append(f"threads={args.threads}")
    output = run_dir.with_name(run_dir.name + ".out")
    status, peak = run_process(command, output)
    if status != 0:
        raise PathFailed(f"python train.py exited with {status}:\n{output_tail(output)}")
    metrics = json.loads((run_dir / METRICS_FILE).read_text())
    timer = read_checkpoint(checkpoint_path(run_dir, LAST))["callbacks"]["EpochTimer"]
    log_text = (run_dir / "train.log").read_text()
    threads = re.search(r"CPU threads: (\d+)", log_text)
    return Run(
        timer["epoch_seconds"],
        timer["epoch_cpu_seconds"],
        metrics["test/loss"],
        f"{peak / 2**20:,.0f} MiB RSS",
        int(threads.group(1)) if threads else None,
    )


# ----------------------------------------------------------------------------- IWAE


@torch.no_grad()
def plain_iwae(
    model, images: torch.Tensor, k: int, max_batch_elems: int, batch_size: int
) -> torch.Tensor:
    """log p(x) per image by a batched log-sum-exp over k importance samples: the plain loop
    (all k log-weights of a batch kept, no float64 accumulation), with the log-weights from the
    model's own ``log_importance_weights``."""
    model.eval()
    num_pixels = images[0].numel()
    latent_dim = model.latent_dim
    results = []
    for first in range(0, len(images), batch_size):
        x = images[first : first + batch_size].float().div_(255)  # (B, C, H, W)
        posterior = model.posterior(x)  # mu, logvar: (B, D) each
        samples = max(1, min(k, max_batch_elems // (len(x) * max(num_pixels, 512))))
        log_w = []
        for start in range(0, k, samples):
            eps = torch.randn(len(x), min(samples, k - start), latent_dim, device=x.device)
            log_w.append(model.log_importance_weights(x, eps, posterior)[0])  # (B, S)
        log_w = torch.cat(log_w, dim=1).double()  # (B, k)
        results.append(torch.logsumexp(log_w, dim=1) - math.log(k))
    return torch.cat(results)


def our_iwae(model, images: torch.Tensor, k: int, max_batch_elems: int, batch_size: int) -> float:
    from vae_experiments.analysis.likelihood import evaluate_vae

    batches = (
        images[i : i + batch_size].float().div_(255) for i in range(0, len(images), batch_size)
    )
    return evaluate_vae(model, batches, k, max_batch_elems)["log_px"]


# ----------------------------------------------------------------------------- the cases


@dataclass
class Row:
    case: str
    path: str
    images: int
    wall: float  # seconds: a training case's steady epoch; the IWAE case's whole run
    cpu: float | None  # the same in CPU seconds of the path's process
    memory: str
    clock: str = "wall"  # which of the two the ratios compare
    steps: int | None = None  # optimizer steps per epoch (training cases)
    note: str = ""
    baseline: str | None = None  # the row the ratio divides by
    ratio: float | None = None
    overhead_ms: float | None = None  # per step, above the baseline

    @property
    def seconds(self) -> float:
        return self.cpu if self.clock == "cpu" and self.cpu is not None else self.wall

    @property
    def per_second(self) -> float:
        return self.images / self.seconds

    @property
    def ms_per_step(self) -> float | None:
        """Milliseconds per optimizer step: the epoch (validation included) over its steps."""
        return 1000 * self.seconds / self.steps if self.steps else None


def case_overrides(case: Case, args: argparse.Namespace, device: torch.device) -> list[str]:
    """``train.py``'s overrides for a case as this benchmark runs it."""
    overrides = [
        *case.overrides,
        *([] if args.full or device.type == "cuda" else case.cpu_overrides),
        f"trainer.max_epochs={args.epochs}",
        f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}",
        "trainer.devices=1",
        f"seed={args.seed}",
    ]
    if args.smoke is not None:  # few batches of every split: does every row run?
        overrides += [f"++trainer.limit_{s}_batches={args.smoke}" for s in ("train", "val", "test")]
    return overrides


def same_objective(hand: float, ours: float) -> tuple[bool, str]:
    """Whether two test losses (nats per image) agree within TEST_LOSS_TOLERANCE, and a note."""
    agree = abs(ours - hand) <= TEST_LOSS_TOLERANCE * abs(hand)
    verdict = "same objective" if agree else "NOT the same objective"
    return agree, (
        f"{verdict} as {HAND} (test loss {hand:.2f}, {ours - hand:+.2f}; "
        f"tolerance {TEST_LOSS_TOLERANCE:.0%})"
    )


def time_training_case(
    name: str, case: Case, args: argparse.Namespace, device: torch.device, workdir: Path
) -> tuple[list[Row], Path]:
    """Runs every path of a training case ``--repeats`` times, alternating; returns its rows
    and the run directory of ours' first run (the IWAE case evaluates its model)."""
    overrides = case_overrides(case, args, device)
    cfg = compose(overrides)
    splits, image_shape = load_data(cfg)
    batch_size, val_batch_size = cfg.data.batch_size, eval_batch_size(cfg)
    train_batches = len(splits["train"]) // batch_size
    if batch_limit(cfg, "train") is not None:
        train_batches = min(train_batches, batch_limit(cfg, "train"))
    test_images = splits["test"]
    if batch_limit(cfg, "test") is not None:  # the batches our test sees
        test_images = test_images[: batch_limit(cfg, "test") * val_batch_size]
    is_conv = cfg.model.network._target_.endswith(".Conv")
    channels_last = is_conv and cfg.channels_last  # ours' memory format: every loop uses it
    (workdir / name).mkdir(parents=True, exist_ok=True)

    # The images our run validates (its limit counts batches of data.eval_batch_size), which
    # the loops here validate at the run's batch size, as the hand-written loop does.
    val_images = splits["val"]
    if batch_limit(cfg, "val") is not None:
        val_images = val_images[: batch_limit(cfg, "val") * val_batch_size]

    def plain(repeat: int) -> Run:
        model = build_model(cfg, image_shape)
        # Importing our code imported Lightning, which set PYTORCH_NVML_BASED_CUDA_CHECK=1 in
        # this process (an NVML query per optimizer step, which our training pauses): this loop
        # runs in the environment the benchmark started with, as the hand-written one does.
        with PeakMemory(device) as memory, user_environment():
            wall, cpu = plain_training(
                model,
                splits["train"],
                val_images,
                batch_size,
                args.epochs,
                instantiate(cfg.optimizer, key="optimizer"),
                args.seed,
                batch_limit(cfg, "train"),
                None,
                device,
                dynamic_binarization=cfg.data.get("binarize") == "dynamic",
                channels_last=channels_last,
                lr_schedule=epoch_lr_schedule(cfg),
                val_batch_size=batch_size,
            )
        loss = mean_loss(model, test_images, val_batch_size, channels_last)
        return Run(wall, cpu, loss, memory.label, torch.get_num_threads())

    paths: dict[str, Callable[[int], Run]] = {}
    baselines: dict[str, str | None] = {PLAIN: None}
    if case.hand_written:
        options = hand_written_options(cfg, len(splits["val"]))
        hand_options = [*options, *(["--channels-last"] if channels_last else [])]
        paths[HAND] = lambda r: hand_written_run(
            hand_options, workdir / name / f"hand_{r}.out", args, device
        )
        if channels_last and "nchw" in args.variants:
            paths[HAND_NCHW] = lambda r: hand_written_run(
                options, workdir / name / f"hand_nchw_{r}.out", args, device
            )
        baselines[PLAIN] = HAND
    paths[PLAIN] = plain
    labelled = [("ours", [])]
    for variant in args.variants:
        variant_overrides, conv_only = VARIANTS[variant]
        if not conv_only or is_conv:
            labelled.append((f"ours + {variant}", variant_overrides))
    for label, extra in labelled:
        run_name = label.replace(" + ", "_")
        paths[label] = lambda r, extra=extra, run_name=run_name: our_run(
            [*overrides, *extra], workdir / name / f"{run_name}_{r}", args
        )
        # Like with like: each of ours is compared with a hand-written loop in its memory format.
        nchw = is_conv and not compose([*overrides, *extra]).channels_last
        if not case.hand_written:
            baselines[label] = PLAIN
        else:
            baselines[label] = HAND_NCHW if nchw and HAND_NCHW in paths else HAND

    # Each path runs --repeats times, alternating, so that a slow spell of a shared machine
    # does not fall on one path only; a path's figure is its fastest run (as timeit reports).
    runs: dict[str, list[Run]] = {label: [] for label in paths}
    for repeat in range(args.repeats):
        for label, run in paths.items():
            runs[label].append(run(repeat))

    rows: dict[str, Row] = {}
    for label, path_runs in runs.items():
        fastest = min(path_runs, key=lambda run: run.seconds(args.clock))
        row = Row(
            name,
            label,
            train_batches * batch_size,
            fastest.seconds("wall"),
            fastest.seconds("cpu") if fastest.cpu else None,
            fastest.memory,
            args.clock,
            train_batches,
        )
        losses = [run.test_loss for run in path_runs]
        row.note = f"test loss {statistics.mean(losses):.2f}"
        if args.repeats > 1:
            spread = ", ".join(f"{run.seconds(args.clock):.2f}" for run in path_runs)
            row.note += f"; {args.repeats} runs: {spread} s"
        rows[label] = row
    for label, row in rows.items():
        baseline = baselines.get(label)
        if baseline is None:
            continue
        base = rows[baseline]
        row.baseline = baseline
        row.ratio = row.seconds / base.seconds
        row.overhead_ms = 1000 * (row.seconds - base.seconds) / train_batches
        if baseline != HAND:
            row.note += f"; vs {baseline}"
        if label.startswith("ours + "):
            row.note += f"; {rows['ours'].seconds / row.seconds:.2f}x vs ours"

    # The same objective: the hand-written loop's test loss against ours (means over runs).
    if case.hand_written:
        hand = statistics.mean(run.test_loss for run in runs[HAND])
        ours = statistics.mean(run.test_loss for run in runs["ours"])
        agree, note = same_objective(hand, ours)
        rows["ours"].note += f"; {note}"
        print(f"  {name}: {note}", flush=True)
        if not agree:
            print(
                f"WARNING: {name}: the hand-written loop and ours do not reach the same test loss "
                "within the tolerance: the ratios compare unlike runs (a different objective or "
                "training), or the runs are too short to tell",
                flush=True,
            )
    threads = {label: path_runs[0].threads for label, path_runs in runs.items()}
    args.threads_seen[name] = threads
    shown = ", ".join(f"{label} {count}" for label, count in threads.items())
    print(f"  {name}: CPU threads: {shown}", flush=True)
    if device.type == "cpu" and len(set(threads.values())) > 1:
        print(f"WARNING: {name}: the paths computed with different numbers of threads", flush=True)
    return list(rows.values()), workdir / name / "ours_0"


def time_iwae_case(
    args: argparse.Namespace, device: torch.device, trained_run: Path | None
) -> list[Row]:
    from vae_experiments.cli.evaluate import CPU_MAX_BATCH_ELEMS, GPU_MAX_BATCH_ELEMS

    cfg = compose([*TRAINING_CASES["mlp_vae"].overrides, f"seed={args.seed}"])
    splits, image_shape = load_data(cfg)
    if trained_run is not None:
        from vae_experiments import load_run

        model, _ = load_run(trained_run, map_location=device)
        source = "trained by the mlp_vae case"
    else:
        model = build_model(cfg, image_shape)
        source = "untrained"
    model.to(device).eval()
    num_images = args.iwae_images or (10_000 if args.full or device.type == "cuda" else 48)
    images = splits["test"][:num_images].to(device)
    budget = GPU_MAX_BATCH_ELEMS if device.type == "cuda" else CPU_MAX_BATCH_ELEMS
    batch_size = 128
    rows = []
    for label, run in (("plain", plain_iwae), ("ours", our_iwae)):
        torch.manual_seed(args.seed)
        with PeakMemory(device) as memory:
            synchronize(device)
            start = time.perf_counter()
            log_px = run(model, images, args.iwae_k, budget, batch_size)
            log_px = float(log_px.mean()) if isinstance(log_px, torch.Tensor) else log_px
            synchronize(device)
            seconds = time.perf_counter() - start
        row = Row(IWAE_CASE, label, len(images), seconds, None, memory.label)
        row.note = f"log p(x) {log_px:.2f} ({source}, k={args.iwae_k})"
        rows.append(row)
    rows[1].baseline, rows[1].ratio = "plain", rows[1].seconds / rows[0].seconds
    return rows


# ----------------------------------------------------------------------------- report


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    return f"{platform.processor() or 'CPU'} ({torch.get_num_threads()} threads)"


def load_average() -> str:
    """The 1-minute load average (``uptime``'s first figure): other work on a shared machine."""
    with contextlib.suppress(OSError, AttributeError):
        return f"{os.getloadavg()[0]:.2f}"
    return "unknown"


def heading(args: argparse.Namespace, device: torch.device) -> str:
    """The machine section's heading: the machine, and the cases and clock where they are not
    the defaults, so that runs of single cases keep sections of their own."""
    parts = [] if args.cases == DEFAULT_CASES else [", ".join(args.cases)]
    if args.clock == "cpu":
        parts.append("CPU time")
    return f"### {device_name(device)}" + (f": {'; '.join(parts)}" if parts else "")


def markdown(rows: list[Row], args: argparse.Namespace, device: torch.device) -> str:
    lightning = importlib.metadata.version("pytorch-lightning")  # not imported: see USER_ENV
    threads = "; ".join(
        f"{case}: " + ", ".join(f"{path} {count}" for path, count in seen.items())
        for case, seen in args.threads_seen.items()
    )
    lines = [
        heading(args, device),
        "",
        f"{datetime.date.today()}, torch {torch.__version__}, Lightning {lightning}, "
        f"{args.epochs} epochs per training run (median after the first), fastest of "
        f"{args.repeats} alternating runs per path, seed {args.seed}, ratios in "
        f"{'CPU time of each process' if args.clock == 'cpu' else 'wall-clock time'}, "
        f"load average {args.load_before} before and {load_average()} after the run.",
        f"Command: `python scripts/benchmark.py {' '.join(sys.argv[1:])}`".rstrip(),
    ]
    if threads:
        lines.append(f"CPU threads per path: {threads}.")
    lines += [
        "",
        "| case | path | images | s/epoch | CPU s/epoch | ms/step | images/s | × baseline "
        "| + ms/step | peak memory | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        ratio = f"**{row.ratio:.3f}**" if row.ratio is not None else ""
        ms = f"{row.ms_per_step:.3f}" if row.ms_per_step is not None else ""
        cpu = f"{row.cpu:.3f}" if row.cpu is not None else ""
        overhead = f"{row.overhead_ms:+.3f}" if row.overhead_ms is not None else ""
        lines.append(
            f"| {row.case} | {row.path} | {row.images:,} | {row.wall:.3f} | {cpu} | {ms} | "
            f"{row.per_second:,.0f} | {ratio} | {overhead} | {row.memory} | {row.note} |"
        )
    lines += [
        "",
        f"× baseline: the row's {args.clock} seconds per epoch over its baseline's: `{HAND}` "
        f"(`{HAND_NCHW}` for `ours + nchw`), or `{PLAIN}` where a case has no hand-written "
        "loop (the note says so). ms/step: an epoch (validation, checkpoints and all) over its "
        "optimizer steps; + ms/step: above the baseline. Peak memory: a process's peak resident "
        "set (RSS) for the processes, growth of the benchmark's own (+RSS) for the loop inside "
        "it.",
        "",
        "Cases:",
    ]
    for name, case in TRAINING_CASES.items():
        if name in args.cases:
            lines.append(f"- `{name}`: {case.title}")
    if IWAE_CASE in args.cases:
        lines.append(
            f"- `{IWAE_CASE}`: IWAE log p(x) of the MLP VAE, k={args.iwae_k} "
            "(time for all its images)"
        )
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    """Puts ``section`` (a markdown part starting ``### <machine>``) into ``path``: it replaces
    the part with the same heading, so the file keeps the latest table of each machine."""
    heading = section.splitlines()[0]
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    parts = re.split(r"(?m)^(?=### )", text)
    if heading in (part.splitlines()[0] for part in parts[1:]):
        parts = [section if part.splitlines()[0] == heading else part for part in parts]
    else:
        parts.append(section)
    parts = [part.rstrip("\n") + "\n" for part in parts]
    path.write_text("\n".join(parts))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cases",
        default=",".join(DEFAULT_CASES),
        help=f"comma-separated, from {ALL_CASES}, or batch20 (burda and tiny); "
        f"default: {','.join(DEFAULT_CASES)}",
    )
    parser.add_argument(
        "--variants",
        default="",
        help=f"options to time on our path, comma-separated, from {list(VARIANTS)}",
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 ...")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per training run (>= 2)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs of each path, alternating (fastest counts)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads of every path (ours: threads=N); default: what users get "
        "(ours: threads=auto, the others: torch's default)",
    )
    parser.add_argument("--full", action="store_true", help="full datasets on a CPU too")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="what the ratios compare: wall-clock seconds, or CPU seconds of each path's "
        "process (steadier on a shared machine; with --threads 1 on a CPU)",
    )
    parser.add_argument(
        "--smoke",
        type=int,
        default=None,
        metavar="N",
        help="at most N training, validation and test batches per epoch on every path: a quick "
        "check that every row runs (its figures mean nothing)",
    )
    parser.add_argument("--iwae-k", type=int, default=5000, help="importance samples per image")
    parser.add_argument(
        "--iwae-images", type=int, default=None, help="test images (default: 10,000; 48 on a CPU)"
    )
    parser.add_argument(
        "--markdown",
        type=Path,
        default=REPO_ROOT / "BENCHMARKS.md",
        help="file whose section for this machine and these cases gets the table (others are kept)",
    )
    args = parser.parse_args(argv)
    args.cases = [
        c for group in args.cases.split(",") if group for c in CASE_GROUPS.get(group, [group])
    ]
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = [c for c in args.cases if c not in ALL_CASES] + [
        v for v in args.variants if v not in VARIANTS
    ]
    if unknown:
        parser.error(
            f"unknown case or variant {unknown}; cases: {ALL_CASES}, variants: {list(VARIANTS)}"
        )
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.epochs < 2:
        parser.error("--epochs must be >= 2: the first epoch is warm-up and is not timed")
    if args.smoke is not None and args.smoke < 1:
        parser.error("--smoke must be >= 1")
    args.threads_seen = {}
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device_arg = args.device
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_arg)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    if args.clock == "cpu" and device.type == "cuda":
        sys.exit("error: --clock cpu times CPU work only; on a GPU use --clock wall")
    args.load_before = load_average()
    print(f"benchmark on {device_name(device)}, load average {args.load_before}", flush=True)

    rows: list[Row] = []
    trained_run = None
    with tempfile.TemporaryDirectory(prefix="vae-benchmark-") as tmp:
        for name in args.cases:
            start = monotonic()  # wall time of the case, whatever --clock times
            if name == IWAE_CASE:
                case_rows = time_iwae_case(args, device, trained_run)
            else:
                try:
                    case_rows, run_dir = time_training_case(
                        name, TRAINING_CASES[name], args, device, Path(tmp)
                    )
                except PathFailed as failure:
                    sys.exit(f"error: case {name}: {failure}")
                if name == "mlp_vae":
                    trained_run = run_dir
            rows += case_rows
            for row in case_rows:
                ratio = f"  {row.ratio:.3f}x {row.baseline}" if row.ratio is not None else ""
                if row.overhead_ms is not None:
                    ratio += f" ({row.overhead_ms:+.3f} ms/step)"
                ms = f"{row.ms_per_step:7.3f} ms/step  " if row.ms_per_step is not None else ""
                print(
                    f"{row.case:12s} {row.path:34s} {row.seconds:8.3f} s  {ms}"
                    f"{row.per_second:9,.0f} images/s  {row.memory}{ratio}  {row.note}",
                    flush=True,
                )
            print(f"  ({name}: {monotonic() - start:.0f} s)", flush=True)
    table = markdown(rows, args, device)
    write_section(args.markdown, table)
    print()
    print(table)
    print(f"written to {args.markdown}")


if __name__ == "__main__":
    main()
