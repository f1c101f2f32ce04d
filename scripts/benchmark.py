"""Times our training path against a plain PyTorch loop: same process, data, model, seed, batch.

    python scripts/benchmark.py                      # every case; CPU-sized subsets on a CPU
    python scripts/benchmark.py --cases mlp_vae      # one case
    python scripts/benchmark.py --variants compile,bf16,nchw   # options, against our defaults
    python scripts/benchmark.py --full               # full datasets even on a CPU
    python scripts/benchmark.py --cases overhead --threads 1   # per-step cost of our loop
    python scripts/benchmark.py --cases overhead --threads 1 --variants ungrouped  # and without
                                                     # groups of steps (steps_per_group=1)

For each training case it runs (a) the plain loop written below (Adam, the model's own loss, one
validation pass per epoch, data as one uint8 tensor on the device) and (b) our path exactly as
``python train.py`` builds it, with a user's defaults on (TensorBoard logger, progress bar, best
and last checkpoints, image grids), and prints the median seconds per epoch after the first
(warm-up) epoch, the ratio ours / plain, training images per second and peak memory. The IWAE
case times ``vae_experiments.analysis.likelihood.evaluate_vae`` against a plainly written batched
log-sum-exp with the same chunk budget. The overhead cases (``--cases overhead``) are small models
at batch 20, where the arithmetic of a step is small and the loop's own cost per optimizer step
shows: their figure is milliseconds per step, ours minus plain. Conv cases also run the plain loop
in ``channels_last`` memory format, which our path uses by default; each of our rows is compared
with the plain loop in its own memory format. The table is printed and written into BENCHMARKS.md
(``--markdown``) as this machine's section, replacing its previous one.

Fashion-MNIST is read from ``$VAE_DATA_DIR`` / ``data/`` or Debian's
``/usr/share/datasets/fashion-mnist`` (``apt-get install dataset-fashion-mnist``); the 64x64 case
uses generated images (``data=synthetic``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from time import monotonic

import torch

from vae_experiments.configs import CONFIG_DIR as PACKAGE_CONFIG_DIR

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = Path(PACKAGE_CONFIG_DIR)


@dataclass
class Case:
    """One training case: the ``train.py`` overrides, and how to shrink it on a CPU."""

    title: str
    overrides: list[str]
    cpu_overrides: list[str] = field(default_factory=list)


TRAINING_CASES = {
    "mlp_vae": Case(
        "MLP VAE 784-512-16, Bernoulli, Fashion-MNIST, batch 128",
        [
            "model=vae",
            "model/network=mlp",
            "model/likelihood=bernoulli",  # the setting BENCHMARKS.md measured
            "model.network.hidden_dims=[512]",
            "model.latent_dim=16",
            "data=fashion_mnist",
            "data.batch_size=128",
        ],
    ),
    "conv_vae": Case(
        "conv VAE (default), Fashion-MNIST, batch 128",
        [
            "model=vae",
            "model/network=conv",
            "model/likelihood=bernoulli",
            "data=fashion_mnist",
            "data.batch_size=128",
        ],
        ["+trainer.limit_train_batches=40", "+trainer.limit_val_batches=10"],
    ),
    "conv_vae_64": Case(
        "conv VAE (default), 64x64 RGB generated (CelebA-sized), batch 64",
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
    ),
}
#: Per-step cost: small models at batch 20, 1,000 steps per epoch, where the arithmetic is a
#: small part of a step. Same limits on every device (the step count, not the data, matters).
OVERHEAD_LIMITS = [
    "+trainer.limit_train_batches=1000",
    "+trainer.limit_val_batches=10",
    "+trainer.limit_test_batches=10",
]
TRAINING_CASES["overhead_tiny"] = Case(
    "MLP VAE 784-8-2 (arithmetic nearly free), Fashion-MNIST, batch 20, 1,000 steps per epoch",
    [
        "model=vae",
        "model/network=mlp",
        "model/likelihood=bernoulli",
        "model.network.hidden_dims=[8]",
        "model.latent_dim=2",
        "data=fashion_mnist",
        "data.batch_size=20",
        *OVERHEAD_LIMITS,
    ],
)
TRAINING_CASES["overhead_burda"] = Case(
    "Burda et al.'s 1-layer VAE 784-200-200-50 tanh (experiment=burda_vae_1layer: dynamic "
    "binarization, Adam eps 1e-4, epoch lr schedule) on Fashion-MNIST, batch 20, 1,000 steps per "
    "epoch",
    ["experiment=burda_vae_1layer", "data=fashion_mnist", *OVERHEAD_LIMITS],
)
IWAE_CASE = "iwae"
ALL_CASES = [*TRAINING_CASES, IWAE_CASE]
#: --cases names that stand for several cases.
CASE_GROUPS = {"overhead": [name for name in TRAINING_CASES if name.startswith("overhead_")]}

#: --variants name -> (overrides for our path, applies to conv nets only)
#: The plain loop in NHWC memory format, as our path runs conv nets by default.
PLAIN_CHANNELS_LAST = "plain + channels_last"

VARIANTS = {
    "compile": (["compile=true"], False),
    "bf16": (["trainer.precision=bf16-mixed"], False),
    "nchw": (["channels_last=false"], True),  # the default is channels_last=true
    # Every step through Lightning's per-batch loop (the default groups up to 20 steps a batch).
    "ungrouped": (["steps_per_group=1"], False),
}


# ----------------------------------------------------------------------------- measuring


class PeakMemory:
    """Peak memory while inside: CUDA's allocator peak, or on a CPU the process's resident set
    sampled every 5 ms, above what it was on entry."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes = 0
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _poll(self, start: int) -> None:
        while not self._stop.wait(0.005):
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


@contextlib.contextmanager
def clock(kind: str) -> Iterator[None]:
    """While inside, both paths' epoch timers read ``kind``: ``wall`` (time.perf_counter) or
    ``cpu`` (time.process_time: CPU seconds of this process, all its threads). On a shared
    machine the CPU clock leaves out the time other processes held the cores; it suits CPU runs
    with ``--threads 1``, where it is the work a step costs."""
    if kind == "wall":
        yield
        return
    import types

    from vae_experiments.training import callbacks  # EpochTimer: our path's epoch times

    cpu_time = types.SimpleNamespace(perf_counter=time.process_time)
    saved = callbacks.time, globals()["time"]
    callbacks.time = globals()["time"] = cpu_time
    try:
        yield
    finally:
        callbacks.time, globals()["time"] = saved


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def steady_seconds(epoch_seconds: list[float]) -> float:
    """Median epoch time without the first (warm-up) epoch, when there are others."""
    return statistics.median(epoch_seconds[1:] if len(epoch_seconds) > 1 else epoch_seconds)


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
    """The uint8 splits (N, C, H, W) of ``cfg.data``, through our data code."""
    from vae_experiments.runs import load_data as load_run_data

    data = load_run_data(cfg)
    return {name: split.images for name, split in data.splits.items()}, data.image_shape


def instantiate(cfg, key: str, **kwargs):
    from vae_experiments.targets import instantiate as instantiate_target

    return instantiate_target(cfg, key=key, **kwargs)


def build_model(cfg, image_shape) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)
    return instantiate(cfg.model, key="model", image_shape=list(image_shape))


# ----------------------------------------------------------------------------- (a) the plain loop


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
) -> list[float]:
    """A hand-written loop: returns the seconds of each epoch.

    ``make_optimizer`` takes the parameters (the run's ``optimizer=``, as ours gets it);
    ``dynamic_binarization`` resamples each training batch from Bernoulli(x), as
    ``data.binarize=dynamic`` does; ``channels_last`` stores weights and batches in NHWC.
    """
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(device, memory_format=memory_format)
    train_images, val_images = train_images.to(device), val_images.to(device)
    optimizer = make_optimizer(model.parameters())
    num_batches = len(train_images) // batch_size
    if max_train_batches is not None:
        num_batches = min(num_batches, max_train_batches)
    val_starts = range(0, len(val_images), batch_size)
    if max_val_batches is not None:
        val_starts = val_starts[:max_val_batches]
    epoch_seconds, step = [], 0
    for epoch in range(epochs):
        synchronize(device)
        start = time.perf_counter()
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
            loss = model.loss(x, step=step)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        model.eval()
        total = torch.zeros((), device=device)
        with torch.no_grad():
            for first in val_starts:
                x = val_images[first : first + batch_size].float().div_(255)
                x = x.contiguous(memory_format=memory_format)
                total += model.loss(x)["loss"] * len(x)
        val_loss = (total / min(len(val_images), len(val_starts) * batch_size)).item()
        synchronize(device)
        epoch_seconds.append(time.perf_counter() - start)
        del val_loss  # computed as a real loop would (one host sync per epoch), then unused
    return epoch_seconds


@torch.no_grad()
def mean_loss(model: torch.nn.Module, images: torch.Tensor, batch_size: int) -> float:
    """The model's evaluation loss averaged over uint8 ``images`` (N, C, H, W)."""
    model.eval()
    device = next(model.parameters()).device
    total = 0.0
    for first in range(0, len(images), batch_size):
        x = images[first : first + batch_size].to(device).float().div_(255)
        total += float(model.loss(x)["loss"]) * len(x)
    return total / len(images)


# ----------------------------------------------------------------------------- (b) our path


@contextlib.contextmanager
def output_to(path: Path) -> Iterator[None]:
    """Send stdout/stderr (progress bar, Lightning's messages) to a file while inside."""
    import logging

    handler = logging.FileHandler(path.with_suffix(".messages"))
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "pytorch_lightning")]
    saved = [(lg.handlers, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.handlers, lg.propagate = [handler], False
    try:
        with (
            open(path, "w") as log,
            contextlib.redirect_stdout(log),
            contextlib.redirect_stderr(log),
        ):
            yield
    finally:
        for lg, (handlers, propagate) in zip(loggers, saved, strict=True):
            lg.handlers, lg.propagate = handlers, propagate
        handler.close()


def our_training(cfg, run_dir: Path) -> dict[str, float]:
    """``python train.py`` as Hydra runs it, in this process: returns its metrics."""
    from vae_experiments.training import train

    run_dir.mkdir(parents=True, exist_ok=True)
    with output_to(run_dir / "train.log"):
        return train(cfg, run_dir)


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
    seconds: float
    memory: str
    steps: int | None = None  # optimizer steps per epoch (training cases)
    note: str = ""
    ratio: float | None = None
    overhead_ms: float | None = None  # per step, above the plain loop it is compared with

    @property
    def per_second(self) -> float:
        return self.images / self.seconds

    @property
    def ms_per_step(self) -> float | None:
        """Milliseconds per optimizer step: the epoch (validation included) over its steps."""
        return 1000 * self.seconds / self.steps if self.steps else None


def time_training_case(
    name: str, case: Case, args: argparse.Namespace, device: torch.device, workdir: Path
) -> tuple[list[Row], Path]:
    overrides = [
        *case.overrides,
        *([] if args.full or device.type == "cuda" else case.cpu_overrides),
        f"trainer.max_epochs={args.epochs}",
        f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}",
        "trainer.devices=1",
        f"seed={args.seed}",
    ]
    cfg = compose(overrides)
    splits, image_shape = load_data(cfg)
    batch_size = cfg.data.batch_size
    limit_train = cfg.trainer.get("limit_train_batches")
    limit_val = cfg.trainer.get("limit_val_batches")
    train_batches = len(splits["train"]) // batch_size
    if isinstance(limit_train, int):
        train_batches = min(train_batches, limit_train)
    images_per_epoch = train_batches * batch_size

    variants = [("ours", [])]
    is_conv = cfg.model.network._target_.endswith(".Conv")
    for variant in args.variants:
        variant_overrides, conv_only = VARIANTS[variant]
        if not conv_only or is_conv:
            variants.append((f"ours + {variant}", variant_overrides))
    # Like with like: a conv net's plain loop runs in both memory formats, and each of our rows
    # is compared with the plain loop in its own format (ours: cfg.channels_last).
    plains = {"plain": False, **({PLAIN_CHANNELS_LAST: True} if is_conv else {})}
    make_optimizer = instantiate(cfg.optimizer, key="optimizer")
    test_limit = cfg.trainer.get("limit_test_batches")
    test_images = splits["test"]
    if isinstance(test_limit, int):
        test_images = test_images[: test_limit * batch_size]  # the batches our test sees
    # Each path runs --repeats times, alternating, so that a slow spell of a shared machine
    # does not fall on one path only; a path's time is its fastest run (as timeit reports).
    rows = {label: None for label in [*plains, *(label for label, _ in variants)]}
    times: dict[str, list[float]] = {label: [] for label in rows}
    for repeat in range(args.repeats):
        for label, channels_last in plains.items():
            model = build_model(cfg, image_shape)
            with PeakMemory(device) as memory:
                epoch_seconds = plain_training(
                    model,
                    splits["train"],
                    splits["val"],
                    batch_size,
                    args.epochs,
                    make_optimizer,
                    args.seed,
                    limit_train if isinstance(limit_train, int) else None,
                    limit_val if isinstance(limit_val, int) else None,
                    device,
                    dynamic_binarization=cfg.data.get("binarize") == "dynamic",
                    channels_last=channels_last,
                )
            times[label].append(steady_seconds(epoch_seconds))
            rows[label] = Row(name, label, images_per_epoch, 0.0, memory.label, train_batches)
            rows[label].note = f"test loss {mean_loss(model, test_images, batch_size):.2f}"
            del model
        for label, extra in variants:
            run_dir = workdir / name / f"{label.replace(' + ', '_')}_{repeat}"
            with PeakMemory(device) as memory:
                metrics = our_training(compose([*overrides, *extra]), run_dir)
            times[label].append(metrics["seconds_per_epoch"])
            rows[label] = Row(name, label, images_per_epoch, 0.0, memory.label, train_batches)
            rows[label].note = f"test loss {metrics['test/loss']:.2f}"
    for label, row in rows.items():
        row.seconds = min(times[label])
        if args.repeats > 1:
            row.note += f"; {args.repeats} runs: {', '.join(f'{t:.2f}' for t in times[label])} s"
    ours = rows["ours"]
    for label, extra in variants:
        row = rows[label]
        channels_last = compose([*overrides, *extra]).channels_last
        plain = rows[PLAIN_CHANNELS_LAST if is_conv and channels_last else "plain"]
        row.ratio = row.seconds / plain.seconds
        row.overhead_ms = 1000 * (row.seconds - plain.seconds) / train_batches
        if is_conv:
            row.note += f"; vs {plain.path}"
        if label != "ours":
            row.note += f"; {ours.seconds / row.seconds:.2f}x vs ours"
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
        row = Row(IWAE_CASE, label, len(images), seconds, memory.label)
        row.note = f"log p(x) {log_px:.2f} ({source}, k={args.iwae_k})"
        rows.append(row)
    rows[1].ratio = rows[1].seconds / rows[0].seconds
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


def markdown(rows: list[Row], args: argparse.Namespace, device: torch.device) -> str:
    import pytorch_lightning

    # A run of the overhead cases alone gets its own section, so it leaves the full table be.
    only_overhead = set(args.cases) <= set(CASE_GROUPS["overhead"])
    lines = [
        f"### {device_name(device)}{': overhead cases' if only_overhead else ''}",
        "",
        f"{datetime.date.today()}, torch {torch.__version__}, Lightning {pytorch_lightning.__version__}, "
        f"{args.epochs} epochs per training case (median after the first), seed {args.seed}, "
        f"{'CPU time of the process' if args.clock == 'cpu' else 'wall-clock time'}, "
        f"load average {args.load_before} before and {load_average()} after the run.",
        f"Command: `python scripts/benchmark.py {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        "| case | path | images | s/epoch (s) | ms/step | images/s | ours/plain | + ms/step "
        "| peak memory | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        ratio = f"**{row.ratio:.3f}**" if row.ratio is not None else ""
        ms = f"{row.ms_per_step:.3f}" if row.ms_per_step is not None else ""
        overhead = f"{row.overhead_ms:+.3f}" if row.overhead_ms is not None else ""
        lines.append(
            f"| {row.case} | {row.path} | {row.images:,} | {row.seconds:.3f} | {ms} | "
            f"{row.per_second:,.0f} | {ratio} | {overhead} | {row.memory} | {row.note} |"
        )
    lines += [
        "",
        "ms/step: an epoch's time (its validation pass and checkpoints included) over its optimizer "
        "steps; + ms/step: ours minus the plain loop it is compared with, per step. Conv cases: "
        "each of our rows is compared with the plain loop in the same memory format (ours "
        "defaults to channels_last).",
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
        default=",".join(ALL_CASES),
        help=f"comma-separated, from {ALL_CASES}, or overhead (the overhead_* cases)",
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
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's)"
    )
    parser.add_argument("--full", action="store_true", help="full datasets on a CPU too")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="what an epoch's time is: wall clock, or CPU time of this process (steadier on a "
        "shared machine; use with --threads 1 on a CPU)",
    )
    parser.add_argument("--iwae-k", type=int, default=5000, help="importance samples per image")
    parser.add_argument(
        "--iwae-images", type=int, default=None, help="test images (default: 10,000; 48 on a CPU)"
    )
    parser.add_argument(
        "--markdown",
        type=Path,
        default=REPO_ROOT / "BENCHMARKS.md",
        help="file whose section for this machine gets the table (others are kept)",
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
    args.load_before = load_average()
    print(f"benchmark on {device_name(device)}, load average {args.load_before}", flush=True)

    rows: list[Row] = []
    trained_run = None
    if args.clock == "cpu" and device.type == "cuda":
        raise SystemExit("--clock cpu times CPU work only; on a GPU use the wall clock")
    with tempfile.TemporaryDirectory(prefix="vae-benchmark-") as tmp, clock(args.clock):
        for name in args.cases:
            start = monotonic()  # wall time of the case, whatever --clock times
            if name == IWAE_CASE:
                case_rows = time_iwae_case(args, device, trained_run)
            else:
                case_rows, run_dir = time_training_case(
                    name, TRAINING_CASES[name], args, device, Path(tmp)
                )
                if name == "mlp_vae":
                    trained_run = run_dir
            rows += case_rows
            for row in case_rows:
                ratio = f"  ours/plain {row.ratio:.3f}" if row.ratio is not None else ""
                if row.overhead_ms is not None:
                    ratio += f" ({row.overhead_ms:+.3f} ms/step)"
                ms = f"{row.ms_per_step:7.3f} ms/step  " if row.ms_per_step is not None else ""
                print(
                    f"{row.case:14s} {row.path:22s} {row.seconds:8.3f} s  {ms}"
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
