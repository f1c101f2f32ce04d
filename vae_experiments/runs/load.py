"""Loading a trained run back: its model with the checkpoint's weights, and its data.

``load_run`` is "build the model config, load the state dict": the run's ``config.yaml`` holds
the data's image shape, and building goes through :mod:`vae_experiments.targets`, which only
builds classes we ship, so a run directory from someone else cannot run code. Checkpoints load
with ``weights_only=True`` for the same reason, all through :func:`read_checkpoint`, which says
what a file that does not load is (cut short by a full disk, a pickle of other objects, torch's
legacy format) without unpickling it. Plain torch and OmegaConf: no Lightning or Hydra, so it
works in a notebook::

    from vae_experiments.runs import iterate_split, load_data, load_run

    model, cfg = load_run("outputs/2026-11-25/14-03-12")
    data = load_data(cfg)
    for x, labels in iterate_split(data, "test"):
        print(model.loss(x, labels)["loss"])  # labels: used by a model that needs them (CVAE)
"""

from __future__ import annotations

import copy
import io
import pickle
import pickletools
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from vae_experiments.data import ImageData
from vae_experiments.models import LatentModel
from vae_experiments.runs.files import load_config
from vae_experiments.runs.layout import (
    BEST,
    CONFIG_FILE,
    HPC_CHECKPOINT_GLOB,
    LAST,
    checkpoint_path,
    find_checkpoint,
    run_dir_of,
)
from vae_experiments.runs.priors import load_prior
from vae_experiments.targets import format_value, instantiate, resolve_target


def build_model(cfg: DictConfig) -> LatentModel:
    """The untrained model of a run's config (``model.image_shape`` must be set)."""
    if cfg.model.get("image_shape") is None:
        resolve_target(cfg.model.get("_target_"), "model")  # a foreign target is named first
        raise ValueError(
            f"the run's {CONFIG_FILE} has no model.image_shape: it was written by an older "
            "version of vae-experiments; train the run again"
        )
    return instantiate(cfg.model, key="model")


def model_state(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model's state dict inside a Lightning checkpoint (keys without ``model.``)."""
    return {
        key.removeprefix("model."): value
        for key, value in checkpoint["state_dict"].items()
        if key.startswith("model.")
    }


def load_run(
    run: str | Path,
    checkpoint: str = BEST,
    map_location: str | torch.device = "cpu",
    code_prior: bool = True,
) -> tuple[LatentModel, DictConfig]:
    """Loads a trained model and its config from a run directory or a checkpoint file.

    Args:
        run: a run directory or a ``.ckpt`` file inside one.
        checkpoint: ``best`` (lowest validation loss) or ``last``; ignored for a ``.ckpt`` path.
        map_location: device to load the weights to.
        code_prior: a VQ-VAE: attach the run's prior over code grids (False: the first stage
            alone, e.g. to fit a new prior).

    Returns:
        The model in eval mode, its parameters frozen (``requires_grad=False``: what it returns,
        ``loss`` terms included, are plain tensors, as in a notebook one wants them;
        ``model.requires_grad_(True)`` to train it on), and the run's config (``config.yaml``). A
        VQ-VAE gets the run's prior over code grids (``prior.pt``,
        :mod:`~vae_experiments.runs.priors`) attached as its ``code_prior`` when that prior was
        fitted to this checkpoint; else a warning says so.

    Raises:
        FileNotFoundError: ``run`` is no run directory or has no such checkpoint.
        UnreadableCheckpointError: the checkpoint was not loaded (:func:`read_checkpoint`).
        vae_experiments.targets.ConfigError: the config names something we do not build.
    """
    run_dir = run_dir_of(run)
    ckpt_path = find_checkpoint(run, checkpoint)
    cfg = load_config(run_dir)
    model = build_model(cfg)
    state = read_checkpoint(ckpt_path, map_location)
    model.load_state_dict(model_state(state))
    # Frozen: torch warns when a tensor that requires grad is turned into a number (float(),
    # .item()), and refuses .numpy() of it; a loaded run is for looking at.
    model = model.to(map_location).eval().requires_grad_(False)
    if model.discrete_codes and code_prior:  # a VQ-VAE: its second stage, if fitted to this one
        prior = load_prior(
            run_dir,
            ckpt_path,
            int(state.get("global_step", 0)),
            model.grid_shape,
            model.num_codes,
        )
        if prior is not None:
            prior = prior.to(map_location).requires_grad_(False)
        model.set_code_prior(prior)
    return model, cfg


def load_data(cfg: DictConfig, **overrides: Any) -> ImageData:
    """Builds the data of a run's config and loads its splits.

    Args:
        cfg: a run's config (``cfg.data`` is used).
        **overrides: constructor arguments of ``cfg.data`` to replace, e.g. ``batch_size=1000``.
    """
    data = instantiate(cfg.data, key="data", **overrides)
    data.prepare()  # a cache to build, or a download the config asks for
    data.setup()
    return data


class UnreadableCheckpointError(ValueError):
    """A file given as a checkpoint that was not loaded; ``str()`` is one line naming the file,
    what it is and what to do instead.

    Attributes:
        path: the file.
        damaged: True for a checkpoint that is cut short or damaged (a full disk, a killed
            copy), where another checkpoint of the same run may load; False for a file that is
            no checkpoint of ours (a pickle of other objects, torch's legacy format, another
            kind of file).
    """

    def __init__(self, message: str, path: Path, damaged: bool) -> None:
        super().__init__(message)
        self.path = path
        self.damaged = damaged


#: The first bytes of a zip archive: what ``torch.save`` writes (since torch 1.6).
ZIP_MAGIC = b"PK\x03\x04"
#: The number that the first pickle of torch's legacy (non-zip) format holds.
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
#: Bytes of a file that is not a zip archive read to name what its pickles hold.
_SCAN_BYTES = 2**26
#: What to give instead of a file that is no checkpoint of ours.
_GIVE_OURS = (
    "Give a checkpoint that a training run wrote (<run dir>/checkpoints/last.ckpt or best.ckpt)"
)
_STRING_OPS = frozenset(
    {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING"}
)


def read_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False
) -> dict[str, Any]:
    """Loads a checkpoint file with ``weights_only=True``: the one place that reads them.

    Args:
        path: the ``.ckpt`` file.
        map_location: device to load the tensors to.
        mmap: map the file instead of reading it (only the entries used are read).

    Returns:
        What ``torch.save`` saved (for a Lightning checkpoint, a dict with ``state_dict``,
        ``epoch``, ``global_step``, ...).

    Raises:
        FileNotFoundError: there is no such file.
        UnreadableCheckpointError: the file was not loaded: cut short or damaged, or no
            checkpoint of ours; the message says which (see :func:`checkpoint_problem`), and
            never advises loading it with ``weights_only=False``. Only a zip archive is given
            to torch: a file in another format is refused without unpickling anything.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    with path.open("rb") as f:
        is_zip = f.read(len(ZIP_MAGIC)) == ZIP_MAGIC and zipfile.is_zipfile(f)
    if is_zip:
        try:
            with warnings.catch_warnings():
                # torch's note on pickles of a protocol it did not write: ours are protocol 2.
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except Exception as error:
            raise checkpoint_problem(path, error) from None
    raise checkpoint_problem(path)


def checkpoint_problem(path: Path, error: BaseException | None = None) -> UnreadableCheckpointError:
    """What is wrong with a checkpoint file that torch did not load (``error``, None if it was
    not tried): the file read as bytes and its pickles disassembled, never unpickled.

    - empty, or a zip archive without its end: cut short (a full disk, a killed copy);
    - a zip archive whose pickle names globals that are not tensors (``posix.system``): not
      ours, not to be trusted;
    - torch's legacy format, a plain pickle, or neither a zip archive nor a pickle: not ours;
    - a complete zip archive that torch still cannot read: damaged, with torch's reason.
    """
    with path.open("rb") as f:
        head = f.read(len(ZIP_MAGIC))
    if not head:
        return _damaged(path, "it is empty (0 bytes: a full disk or a killed copy?)")
    if head == ZIP_MAGIC:
        if not zipfile.is_zipfile(path):
            return _damaged(
                path,
                "it is cut short: its zip archive has no end (truncated by a full disk or a "
                "killed copy?)",
            )
        try:
            names = _zip_pickle_globals(path)
        except (zipfile.BadZipFile, OSError, ValueError) as exc:  # a damaged member
            return _damaged(path, f"it is damaged ({_reason(exc)})")
        if names is None:
            return _foreign(path, "it is a zip archive without torch's data.pkl")
        foreign = _not_weights(names)
        if foreign:
            return _foreign(path, f"it holds objects that are not tensors ({foreign})", True)
        if isinstance(error, pickle.UnpicklingError):
            return _foreign(path, "it holds objects that torch does not load as weights", True)
        return _damaged(path, f"it is damaged ({_reason(error)})")
    pickles, names, legacy = _scan_pickles(path)
    if not pickles:
        return _foreign(
            path,
            "it is neither a zip archive (what torch.save writes) nor a pickle; it starts "
            f"with {_start(path)!r}",
        )
    foreign = _not_weights(names)
    what = (
        "it is in torch's legacy format (a pickle, not the zip archive torch.save writes since "
        "torch 1.6)"
        if legacy
        else "it is a plain pickle, not a torch checkpoint"
    )
    if foreign:
        return _foreign(path, f"{what}, and holds objects that are not tensors ({foreign})", True)
    return _foreign(path, what)


def _damaged(path: Path, problem: str) -> UnreadableCheckpointError:
    return UnreadableCheckpointError(f"{path} cannot be read: {problem}", path, damaged=True)


def _foreign(path: Path, problem: str, untrusted: bool = False) -> UnreadableCheckpointError:
    ran = ", so nothing in it ran: do not trust this file" if untrusted else ""
    return UnreadableCheckpointError(
        f"{path} is no checkpoint of vae-experiments: {problem}; it was not loaded{ran}. "
        f"{_GIVE_OURS}",
        path,
        damaged=False,
    )


def _reason(error: BaseException | None) -> str:
    """The first line of ``error``, unless it is torch's advice about ``weights_only``."""
    text = str(error).strip().splitlines()[0] if error is not None and str(error).strip() else ""
    if not text or "weights_only" in text or "Weights only" in text:
        return type(error).__name__ if error is not None else "unknown"
    return text


def _start(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(16)


def _zip_pickle_globals(path: Path) -> list[str] | None:
    """The globals that the pickle of a torch zip archive names (``data.pkl``); None if the
    archive has none."""
    with zipfile.ZipFile(path) as archive:
        member = next((n for n in archive.namelist() if n.endswith("/data.pkl")), None)
        if member is None:
            return None
        data = archive.read(member)
    return _pickle_globals(io.BytesIO(data))[0]


def _scan_pickles(path: Path) -> tuple[int, list[str], bool]:
    """(complete pickles, globals they name, whether the first is torch's legacy magic number)
    at the start of a file that is not a zip archive (torch's legacy format is a sequence of
    pickles, then raw tensor bytes)."""
    with path.open("rb") as f:
        stream = io.BytesIO(f.read(_SCAN_BYTES))
    count, names, legacy = 0, [], False
    while True:
        found, complete, magic = _pickle_globals(stream)
        if not complete:
            return count, names, legacy
        legacy = legacy or (count == 0 and magic)
        count += 1
        names += found


def _pickle_globals(stream: io.BytesIO) -> tuple[list[str], bool, bool]:
    """Disassembles one pickle from ``stream`` (``pickletools``: nothing is built or run).

    Returns:
        (the globals it names, ``module.name``, in order; whether it ended with STOP; whether
        it holds torch's legacy magic number).
    """
    names: list[str] = []
    memo: dict[Any, Any] = {}
    pushed: list[Any] = []  # the values pushed, strings kept: what STACK_GLOBAL takes
    magic = False
    try:
        for opcode, arg, _ in pickletools.genops(stream):
            op = opcode.name
            if op in ("GLOBAL", "INST"):
                names.append(str(arg).replace(" ", "."))
            elif op == "STACK_GLOBAL":
                module, name = pushed[-2:] if len(pushed) >= 2 else [None, None]
                known = isinstance(module, str) and isinstance(name, str)
                names.append(f"{module}.{name}" if known else "an object named at run time")
            elif op == "LONG1" and arg == LEGACY_MAGIC:
                magic = True
            if op == "MEMOIZE":
                memo[len(memo)] = pushed[-1] if pushed else None
            elif op in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = pushed[-1] if pushed else None
            elif op in ("GET", "BINGET", "LONG_BINGET"):
                pushed.append(memo.get(arg))
            else:
                pushed.append(arg if op in _STRING_OPS else None)
            if op == "STOP":
                return list(dict.fromkeys(names)), True, magic
    except Exception:  # not a pickle, or cut short: what was named so far
        pass
    return list(dict.fromkeys(names)), False, magic


def _not_weights(names: list[str]) -> str:
    """The globals among ``names`` that torch does not load as weights, comma-separated."""
    try:  # torch's own list; private, so a fallback below where it moved
        from torch import _weights_only_unpickler as unpickler

        allowed = set(unpickler._get_allowed_globals()) | set(unpickler._get_user_allowed_globals())
    except (ImportError, AttributeError):
        allowed = set()

    def is_weights(name: str) -> bool:
        return (
            name in allowed
            or name == "collections.OrderedDict"
            or name.startswith(("torch._utils._rebuild_", "torch._tensor._rebuild_"))
            or re.fullmatch(r"torch\.(cuda\.)?\w+Storage", name) is not None
        )

    return ", ".join(name for name in names if not is_weights(name))


def _position(path: Path) -> tuple[int, int]:
    """(global step, epoch) of a checkpoint; raises UnreadableCheckpointError for a bad file."""
    # mmap: only the small entries are read, not every tensor of a large model.
    state = read_checkpoint(path, mmap=True)
    return int(state.get("global_step", 0)), int(state.get("epoch", 0))


def readable_checkpoints(run_dir: str | Path) -> list[tuple[Path, int, int]]:
    """The run's checkpoints that load (last.ckpt, best.ckpt and Lightning's SLURM
    ``hpc_ckpt_<n>.ckpt``), as (path, global step, epoch), the furthest trained first."""
    run_dir = Path(run_dir)
    candidates = [
        checkpoint_path(run_dir, LAST),
        checkpoint_path(run_dir, BEST),
        *run_dir.glob(HPC_CHECKPOINT_GLOB),
    ]
    readable = []
    for path in candidates:
        if not path.is_file():
            continue
        try:
            readable.append((path, *_position(path)))
        except Exception:
            continue
    return sorted(readable, key=lambda entry: -entry[1])


def check_checkpoint(path: str | Path, key: str = "resume") -> tuple[int, int]:
    """Loads ``path`` as a checkpoint (cheaply, memory-mapped) before a command touches
    anything (``resume=``, ``ckpt_path=``).

    Returns:
        (global step, epoch) of the checkpoint.

    Raises:
        UnreadableCheckpointError: naming the file and what it is (:func:`checkpoint_problem`);
            for one that is cut short or damaged, also the newest checkpoint of the same run
            that does load (to pass as ``<key>=``), if there is one.
    """
    path = Path(path)
    try:
        return _position(path)
    except UnreadableCheckpointError as error:
        if not error.damaged:
            raise
        try:
            run_dir = run_dir_of(path) if path.suffix == ".ckpt" else path
            others = [entry for entry in readable_checkpoints(run_dir) if entry[0] != path]
        except (FileNotFoundError, ValueError):  # a file outside any run (ckpt_path=)
            others = []
        if others:
            other, step, epoch = others[0]
            advice = (
                f"the newest readable checkpoint is {other} (step {step}, epoch {epoch}): "
                f"{'continue' if key == 'resume' else 'start'} from it with {key}={other}"
            )
        else:
            advice = "no other checkpoint of this run can be read: start the run again"
        raise UnreadableCheckpointError(
            f"{error}; nothing was changed. {advice}", path, damaged=True
        ) from None


class CheckpointModelError(ValueError):
    """A checkpoint whose model is not the one a run builds (another class, network, latent
    size or image shape): its weights cannot be loaded. The message names the difference."""


#: What of a model's config decides its parameters' names and shapes, with the words that name it.
ARCHITECTURE = (
    ("model class", "_target_"),
    ("network", "network"),
    ("upper network", "upper_network"),
    ("latent size", "latent_dim"),
    ("latent sizes", "latent_dims"),
    ("likelihood", "likelihood"),
    ("image shape", "image_shape"),
)

#: Most parameter names a message lists, for a checkpoint without a config beside it.
MAX_LISTED_KEYS = 3


def check_checkpoint_model(path: str | Path, cfg: DictConfig, key: str = "ckpt_path") -> None:
    """Raises :class:`CheckpointModelError` when checkpoint ``path`` holds the weights of another
    model than the one ``cfg`` (a composed ``train.yaml`` config, likelihood chosen) builds:
    before anything of a run is built, as the model's parameter names and shapes, built on the
    meta device (no memory, no initialisation), differ from the checkpoint's.

    The message names what differs in the models' configs (model class, network, latent size,
    likelihood, image shape) when the checkpoint's run directory has its ``config.yaml``, and a
    few of the differing parameters when the checkpoint stands alone.

    Raises:
        CheckpointModelError: naming ``key``, the file and the difference.
    """
    path = Path(path)
    state = read_checkpoint(path, mmap=True)  # check_checkpoint read it already
    if not isinstance(state, dict) or not isinstance(state.get("state_dict"), dict):
        raise CheckpointModelError(
            f"{key}={path} is not a checkpoint of a training run (it has no state_dict): pass "
            "a .ckpt file from a run's checkpoints/ folder"
        )
    theirs = {name: tuple(value.shape) for name, value in model_state(state).items()}
    cfg = copy.deepcopy(cfg)
    image_shape = instantiate(cfg.data, key="data").image_shape  # from its config: reads nothing
    with open_dict(cfg):
        cfg.model.image_shape = [int(size) for size in image_shape]
    with torch.device("meta"):
        ours = {name: tuple(value.shape) for name, value in build_model(cfg).state_dict().items()}
    if ours == theirs:
        return
    try:
        saved = load_config(run_dir_of(path)).get("model")
    except (FileNotFoundError, ValueError):
        saved = None
    differences = _config_differences(saved, cfg.model) if saved is not None else []
    if differences:
        raise CheckpointModelError(
            f"{key}={path} holds another model than this run's: {'; '.join(differences)}"
        )
    raise CheckpointModelError(
        f"{key}={path} holds the weights of another model than this run's "
        f"({_state_differences(theirs, ours)})"
    )


def _plain(value: Any) -> Any:
    return (
        OmegaConf.to_container(value, resolve=True)
        if isinstance(value, DictConfig | ListConfig)
        else value
    )


def _class_name(node: Any) -> str:
    target = node.get("_target_") if isinstance(node, dict) else node
    return str(target).rpartition(".")[2]


def _config_differences(saved: DictConfig, model: DictConfig) -> list[str]:
    """What of :data:`ARCHITECTURE` differs between a checkpoint's model config (``saved``) and
    this run's, in words: ``model class: VAE here, Autoencoder in the checkpoint``."""
    differences = []
    for label, name in ARCHITECTURE:
        theirs, ours = _plain(saved.get(name)), _plain(model.get(name))
        if theirs == ours:
            continue
        if name == "_target_":
            differences.append(
                f"{label}: {_class_name(ours)} here, {_class_name(theirs)} in the checkpoint"
            )
        elif isinstance(theirs, dict) and isinstance(ours, dict):
            if theirs.get("_target_") != ours.get("_target_"):
                differences.append(
                    f"{label}: {_class_name(ours)} here, {_class_name(theirs)} in the checkpoint"
                )
            elif name != "likelihood":  # a likelihood's settings: its class decides
                differences += [
                    f"model.{name}.{leaf}: {format_value(ours.get(leaf))} here, "
                    f"{format_value(theirs.get(leaf))} in the checkpoint"
                    for leaf in sorted(set(theirs) | set(ours))
                    if theirs.get(leaf) != ours.get(leaf)
                ]
        else:
            differences.append(
                f"{label}: {format_value(ours)} here, {format_value(theirs)} in the checkpoint"
            )
    return differences


def _state_differences(theirs: dict[str, tuple], ours: dict[str, tuple]) -> str:
    """A few parameters that differ, with their shapes: ``not in the checkpoint: encoder.mu.weight
    [4, 32]; shape: decoder.net.0.weight [64, 4] here, [64, 16] in the checkpoint (+5 more)``."""
    missing = [f"{name} {list(ours[name])}" for name in ours if name not in theirs]
    extra = [f"{name} {list(theirs[name])}" for name in theirs if name not in ours]
    shapes = [
        f"{name} {list(ours[name])} here, {list(theirs[name])} in the checkpoint"
        for name in ours
        if name in theirs and ours[name] != theirs[name]
    ]
    listed, count = [], 0
    for words, names in (
        ("not in the checkpoint", missing),
        ("only in the checkpoint", extra),
        ("shape", shapes),
    ):
        shown = names[: max(0, MAX_LISTED_KEYS - count)]
        count += len(shown)
        if shown:
            listed.append(f"{words}: {', '.join(shown)}")
    more = len(missing) + len(extra) + len(shapes) - count
    return "; ".join(listed) + (f" (+{more} more)" if more else "")
