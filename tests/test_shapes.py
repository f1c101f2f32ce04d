"""data=shapes: the rendered factor grid, its cache and (N, F) labels, the real dSprites .npz and
3D Shapes .h5 formats, and a VAE trained, evaluated and sampled on it from the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO_ROOT, compose_config
from vae_experiments import targets
from vae_experiments.data import DataError, DataNotFoundError, ImageData, Shapes
from vae_experiments.data.batches import BatchGroup, TensorImages
from vae_experiments.data.datamodule import ImageDataModule
from vae_experiments.data.shapes import (
    FACTOR_NAMES,
    SHAPE_NAMES,
    enumerate_grid,
    grid_values,
    render_grid,
)
from vae_experiments.targets import ConfigError

#: 3 x 2 x 3 x 4 x 3 = 216 images: every factor with more than one value.
SMALL = {"shape": 3, "scale": [0.7, 1.0], "orientation": 3, "x": 4, "y": 3}
SMALL_KEYS = [
    "data.source.factors.shape=3",
    "data.source.factors.scale=[0.7,1.0]",
    "data.source.factors.orientation=3",
    "data.source.factors.x=4",
    "data.source.factors.y=3",
]


def make_shapes(tmp_path: Path, factors: dict = SMALL, **overrides) -> ImageData:
    source = dict(
        factors=factors,
        path=None,
        keep={},
        test_size=0.1,
        val_size=0.1,
        cache=True,
        cache_dir=tmp_path / "cache",
    )
    source.update({k: overrides.pop(k) for k in list(overrides) if k in source})
    loader = dict(
        batch_size=16, num_workers=0, seed=0, split_seed=0, binarize="none", on_device="auto"
    )
    return ImageData(Shapes(**source), **{**loader, **overrides})


def centre_of_mass(images: torch.Tensor) -> torch.Tensor:
    """(N, 2) column and row of the mean lit pixel of images (N, 1, H, W)."""
    weights = images[:, 0].float()
    rows = torch.arange(weights.shape[1], dtype=torch.float32)
    total = weights.sum(dim=(1, 2))
    x = (weights.sum(dim=1) * rows).sum(dim=1) / total
    y = (weights.sum(dim=2) * rows).sum(dim=1) / total
    return torch.stack([x, y], dim=1)


# --- the renderer -------------------------------------------------------------------------------


def test_every_combination_is_rendered_once_and_the_labels_are_what_is_drawn():
    values = tuple(grid_values(name, SMALL[name]) for name in FACTOR_NAMES)
    sizes = tuple(len(v) for v in values)
    labels = enumerate_grid(sizes)
    assert labels.shape == (216, 5) and labels.dtype == torch.int64
    assert len({tuple(row) for row in labels.tolist()}) == 216  # each combination once
    assert labels[1].tolist() == [0, 0, 0, 0, 1]  # C order: y fastest, as dSprites
    images = render_grid(values, labels)
    assert images.shape == (216, 1, 64, 64) and images.dtype == torch.uint8
    assert set(images.unique().tolist()) == {0, 255}
    assert len({image.numpy().tobytes() for image in images}) == 216  # no two alike
    grid = images.view(*sizes, 64, 64)
    centre = centre_of_mass(images).view(*sizes, 2)
    # x moves the centre of mass right, y down, each strictly, whatever the other factors.
    assert (centre[..., 1:, :, 0] > centre[..., :-1, :, 0] + 1).all()
    assert (centre[..., 1:, 1] > centre[..., :-1, 1] + 1).all()
    # Larger scales light more pixels; every shape is drawn differently.
    area = grid.float().sum(dim=(-1, -2))
    assert (area[:, 1] > area[:, 0]).all()
    for a in range(3):
        for b in range(a + 1, 3):
            assert (grid[a] != grid[b]).flatten(-2).any(-1).all()
    # Turning a heart changes its image, but not where it is.
    hearts = grid[2, 1, :, 2, 1]  # the 3 orientations at one place
    assert not torch.equal(hearts[0], hearts[1]) and not torch.equal(hearts[1], hearts[2])
    assert torch.allclose(centre[2, 1, :, 2, 1], centre[2, 1, 0, 2, 1], atol=1.5)


def test_a_grid_is_written_as_counts_or_as_values():
    assert grid_values("scale", 2) == grid_values("scale", [0.5, 1.0]) == (0.5, 1.0)
    assert grid_values("shape", 2) == ("square", "ellipse")
    assert grid_values("shape", ["heart"]) == ("heart",)
    assert grid_values("orientation", 4) == (0.0, 90.0, 180.0, 270.0)
    assert grid_values("x", 3) == (0.0, 0.5, 1.0)
    assert grid_values("y", 1) == (0.5,)
    for name, spec, problem in [
        ("shape", 4, "a count must be between 1 and 3"),
        ("shape", ["circle"], "must list names of square, ellipse, heart"),
        ("scale", 0, "a count must be >= 1"),
        ("scale", [0.0, 1.0], r"must list numbers in \(0, 1\]"),
        ("x", [0.5, 0.5], "must not repeat a value"),
        ("y", "big", "must be a count >= 1 or a list of values"),
    ]:
        with pytest.raises(ConfigError, match=f"^factors.{name}=.* is invalid: {problem}"):
            grid_values(name, spec)


def test_a_bad_grid_is_refused_by_its_key_before_anything_is_rendered(tmp_path):
    for overrides, message in [
        (["data.source.factors.x=0"], "data.source.factors.x=0 is invalid: a count must be"),
        (["+data.source.factors.colour=2"], "data.source.factors: has no factor colour"),
        (["data.source.keep={x: 2}"], "data.source.keep={x: 2} is invalid: subsets the factors"),
        (["data.source.path=/some/file.zip"], "data.source.path=/some/file.zip is invalid: must"),
    ]:
        cfg = compose_config(["data=shapes", f"data.source.cache_dir={tmp_path}", *overrides])
        with pytest.raises(ConfigError) as error:
            targets.instantiate(cfg.data, key="data")
        assert str(error.value).startswith(message), str(error.value)
    assert not list(tmp_path.iterdir())


# --- the data: cache, splits, labels ------------------------------------------------------------


def test_shapes_data_has_factor_labels_names_and_sizes_and_no_classes(tmp_path):
    data = make_shapes(tmp_path)
    assert data.factor_names == ("shape", "scale", "orientation", "x", "y")
    assert data.factor_sizes == (3, 2, 3, 4, 3)
    assert data.num_classes is None and data.class_names is None
    assert data.image_shape == (1, 64, 64)
    data.setup()
    sizes = {name: len(split) for name, split in data.splits.items()}
    assert sizes == {"test": 22, "val": 19, "train": 175}
    labels = torch.cat([split.labels for split in data.splits.values()])
    assert labels.shape == (216, 5)
    assert torch.equal(labels.unique(dim=0), enumerate_grid(data.factor_sizes))  # each once
    # Each split's image is the one its labels say.
    values = data.source.factor_values
    test = data.splits["test"]
    assert torch.equal(test.images, render_grid(values, test.labels))


def test_the_rendered_images_are_cached_once_and_read_back(tmp_path, monkeypatch):
    first = make_shapes(tmp_path)
    first.setup()
    (npy,) = (tmp_path / "cache").glob("shapes-216-*.npy")
    meta = json.loads(npy.with_suffix(".json").read_text())
    assert meta["factors"][0] == list(SHAPE_NAMES) and meta["shape"] == [216, 1, 64, 64]

    def no_rendering(*args, **kwargs):
        raise AssertionError("rendered again")

    monkeypatch.setattr("vae_experiments.data.shapes.render_grid", no_rendering)
    again = make_shapes(tmp_path)
    again.setup()
    for name in first.splits:
        assert torch.equal(first.splits[name].images, again.splits[name].images)
        assert torch.equal(first.splits[name].labels, again.splits[name].labels)
    monkeypatch.undo()
    # Without the cache: the same images, and no file.
    memory = make_shapes(tmp_path / "other", cache=False)
    memory.setup()
    assert torch.equal(memory.splits["train"].images, first.splits["train"].images)
    assert not (tmp_path / "other").exists()
    # Another grid is another cache, beside the first.
    make_shapes(tmp_path, factors={**SMALL, "x": 2}).setup()
    assert len(list((tmp_path / "cache").glob("shapes-*.npy"))) == 2


def test_factor_labels_go_through_grouped_training_batches(tmp_path):
    data = make_shapes(tmp_path)
    data.setup()
    train = data.splits["train"]
    indices = torch.arange(12).view(3, 4)  # a group of 3 batches of 4
    images, labels = train[indices]
    assert images.shape == (3, 4, 1, 64, 64) and labels.shape == (3, 4, 5)
    assert torch.equal(labels[1], train.labels[4:8])
    module = ImageDataModule(data)
    module.steps_per_item = 3
    loader = module.train_dataloader()
    batch_images, batch_labels = next(iter(loader))
    assert batch_images.shape == (3, 16, 1, 64, 64) and batch_labels.shape == (3, 16, 5)
    module.trainer = type("T", (), {"training": True, "current_epoch": 0})()
    group, group_labels = module.on_after_batch_transfer((batch_images, batch_labels), 0)
    assert isinstance(group, BatchGroup) and group[2].dtype == torch.float32
    assert group_labels.shape == (3, 16, 5)
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\) or \(2, F\)"):
        TensorImages(images[0, :2], torch.zeros(2, 3, 1, dtype=torch.int64))


def test_a_classifier_of_sample_quality_refuses_factor_labels():
    from vae_experiments.analysis.classifier import UnlabelledDataError, load_or_train_classifier

    images = torch.zeros(8, 1, 8, 8, dtype=torch.uint8)
    labels = torch.zeros(8, 5, dtype=torch.int64)
    with pytest.raises(UnlabelledDataError, match="the labels are 5 factors per image"):
        load_or_train_classifier(images, labels, images, labels, "/nonexistent", "shapes")


def test_cvae_refuses_factor_data_at_start_with_one_line(tmp_path):
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "train.py"), "model=cvae", "data=shapes"]
        + [f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: model=cvae needs class labels (a CVAE), and data=shapes has none (its labels "
        "are factors (shape, scale, orientation, x, y), not classes); train it on labelled data "
        "(data=digits, data=mnist, data=fashion_mnist, or data=image_folder with a subfolder per "
        "class), or choose a model without labels (model=vae)"
    ]
    assert "Traceback" not in done.stderr
    assert not run_dir.exists()


# --- real dSprites and 3D Shapes files ----------------------------------------------------------


def write_dsprites(path: Path) -> np.ndarray:
    """A small file in dSprites' format (3 x 2 x 2 x 4 x 4 = 192 images: colour 1, then
    shape, scale, orientation, x, y); returns its latents_classes."""
    factors = {"shape": 3, "scale": 2, "orientation": 5, "x": 4, "y": 4}
    values = [list(grid_values(name, factors[name])) for name in FACTOR_NAMES]
    values[2] = values[2][:2]  # 2 orientations
    sizes = tuple(len(v) for v in values)
    classes = enumerate_grid(sizes)
    imgs = (render_grid(values, classes)[:, 0] // 255).numpy()  # 0/1, as dSprites stores them
    latents_classes = np.concatenate([np.zeros((len(imgs), 1), np.int64), classes.numpy()], 1)
    latents_values = latents_classes.astype(np.float64) / 10
    np.savez_compressed(
        path, imgs=imgs, latents_classes=latents_classes, latents_values=latents_values
    )
    return latents_classes


def file_data(tmp_path: Path, path: Path, keep: dict | None = None, **overrides) -> ImageData:
    cfg = compose_config(
        ["data=shapes", f"data.source.path={path}", f"data.source.cache_dir={tmp_path / 'c'}"]
        + ["data.batch_size=16"]
    )
    cfg.data.source.keep = keep
    for key, value in overrides.items():
        cfg.data.source[key] = value
    return targets.instantiate(cfg.data, key="data")


def test_dsprites_npz_is_read_with_its_factors_and_can_be_subsampled(tmp_path):
    path = tmp_path / "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz"
    classes = write_dsprites(path)
    data = file_data(tmp_path, path)
    assert data.image_shape == (1, 64, 64)
    assert data.factor_names == ("shape", "scale", "orientation", "x", "y")
    assert data.factor_sizes == (3, 2, 2, 4, 4) and data.num_classes is None
    data.setup()
    with np.load(path) as npz:
        imgs = npz["imgs"]
    for split in data.splits.values():
        rows = [
            int(np.flatnonzero((classes[:, 1:] == row).all(1))[0]) for row in split.labels.numpy()
        ]
        assert np.array_equal(split.images[:, 0].numpy(), imgs[rows] * 255)
    assert sum(len(s) for s in data.splits.values()) == 192
    # A subset: 2 evenly spaced x values of 4 (0 and 3), y values 1 and 2, re-indexed from 0.
    subset = file_data(tmp_path, path, keep={"x": 2, "y": [2, 1]}, test_size=4, val_size=4)
    assert subset.factor_sizes == (3, 2, 2, 2, 2)
    subset.setup()
    labels = torch.cat([s.labels for s in subset.splits.values()])
    images = torch.cat([s.images for s in subset.splits.values()])
    assert len(labels) == 48 and labels.max(0).values.tolist() == [2, 1, 1, 1, 1]
    for label, image in zip(labels.tolist(), images, strict=True):
        original = [0, *label[:3], [0, 3][label[3]], [1, 2][label[4]]]
        row = int(np.flatnonzero((classes == original).all(1))[0])
        assert np.array_equal(image[0].numpy(), imgs[row] * 255)
    # Cached once per file and subset.
    assert len(list((tmp_path / "c").glob("dsprites-*.npy"))) == 2


def test_bad_factor_files_get_one_line_naming_the_file(tmp_path):
    good = tmp_path / "good.npz"
    write_dsprites(good)
    with np.load(good) as npz:
        arrays = dict(npz)
    no_classes = tmp_path / "no_classes.npz"
    np.savez(no_classes, imgs=arrays["imgs"])
    not_zip = tmp_path / "page.npz"
    not_zip.write_text("<html>404</html>")
    short = tmp_path / "short.npz"
    np.savez(short, imgs=arrays["imgs"][:10], latents_classes=arrays["latents_classes"])
    cases = [
        (no_classes, DataError, "it has no latents_classes"),
        (not_zip, DataError, "cannot read it as an .npz archive"),
        (short, DataError, "imgs has 10 images but latents_classes 192"),
        (tmp_path / "missing.npz", DataNotFoundError, "no such file"),
    ]
    for path, error, message in cases:
        with pytest.raises(error) as raised:
            file_data(tmp_path, path).setup()
        text = str(raised.value)
        assert text.startswith(f"{path}: ") and message in text and "\n" not in text, text
    with pytest.raises(ConfigError, match=r"^data.source.keep.x=9 is invalid: .* has 4 values"):
        file_data(tmp_path, good, keep={"x": 9}).setup()
    with pytest.raises(
        ConfigError, match="^data.source.keep.colour: a dSprites .npz .* has no factor colour"
    ):
        file_data(tmp_path, good, keep={"colour": 1})
    assert zipfile.is_zipfile(good)


def test_a_bad_file_on_the_command_line_is_one_error_line_and_leaves_nothing(tmp_path):
    bad = tmp_path / "dsprites.npz"
    bad.write_text("not an archive")
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "train.py"), "data=shapes", f"data.source.path={bad}"]
        + [f"hydra.run.dir={run_dir}", f"data.source.cache_dir={tmp_path / 'cache'}"],
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {bad}: cannot read it as an .npz")
    assert "Traceback" not in done.stderr
    assert not run_dir.exists()


def test_3dshapes_h5_is_read_with_its_factors(tmp_path):
    h5py = pytest.importorskip("h5py")
    sizes = (2, 2, 3, 2, 2, 3)  # floor, wall, object hue, scale, shape, orientation: 144
    classes = enumerate_grid(sizes).numpy()
    hue = np.linspace(0, 0.9, 10)
    values = np.stack(
        [hue[classes[:, 0]], hue[classes[:, 1]], hue[classes[:, 2]]]
        + [0.75 + 0.1 * classes[:, 3], classes[:, 4].astype(float), -30 + 30.0 * classes[:, 5]],
        axis=1,
    )
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (len(classes), 64, 64, 3), dtype=np.uint8)
    path = tmp_path / "3dshapes.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=images)
        f.create_dataset("labels", data=values)
    data = file_data(tmp_path, path, keep={"orientation": [0, 2]}, test_size=8, val_size=8)
    assert data.image_shape == (3, 64, 64)
    assert data.factor_names == (
        "floor_hue",
        "wall_hue",
        "object_hue",
        "scale",
        "shape",
        "orientation",
    )
    assert data.factor_sizes == (2, 2, 3, 2, 2, 2)
    data.setup()
    for split in data.splits.values():
        for label, image in zip(split.labels.tolist(), split.images, strict=True):
            original = [*label[:5], [0, 2][label[5]]]
            row = int(np.flatnonzero((classes == original).all(1))[0])
            assert np.array_equal(image.numpy(), images[row].transpose(2, 0, 1))
    bad = tmp_path / "bad.h5"
    with h5py.File(bad, "w") as f:
        f.create_dataset("images", data=images)
    with pytest.raises(DataError, match=r"bad.h5: it has no dataset labels .* not a 3D Shapes"):
        file_data(tmp_path, bad).setup()


def test_an_h5_file_without_h5py_names_the_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)  # import h5py fails
    with pytest.raises(ConfigError, match=r"reading it needs h5py, .*: pip install h5py"):
        file_data(tmp_path, tmp_path / "3dshapes.h5")


# --- the command line ---------------------------------------------------------------------------


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_a_vae_trains_resumes_evaluates_and_samples_on_shapes(tmp_path):
    run_dir = tmp_path / "run"
    train = [sys.executable, str(REPO_ROOT / "train.py"), "model=vae", "data=shapes"]
    quick = [
        "trainer=cpu",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "data.batch_size=16",
        "model.latent_dim=4",
        "model.network.channels=[4,8]",
        "steps_per_group=4",
    ]
    run([*train, *SMALL_KEYS, *quick, f"hydra.run.dir={run_dir}"], tmp_path)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 10 and np.isfinite(metrics["test/elbo"])  # 175 train images
    run([*train, f"resume={run_dir}", "trainer.max_epochs=2"], tmp_path)
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 20
    evaluated = run(
        [sys.executable, str(REPO_ROOT / "scripts/evaluate.py"), f"run={run_dir}", "k=2"], tmp_path
    )
    assert (
        "no sample quality: the labels are 5 factors per image"
        in evaluated.stdout + evaluated.stderr
    )
    assert "log p(x) is a log-likelihood of the binary pixels" in evaluated.stdout
    assert "test/log_px" in json.loads((run_dir / "metrics.json").read_text())
    run([sys.executable, str(REPO_ROOT / "scripts/sample.py"), f"run={run_dir}", "n=4"], tmp_path)
    (folder,) = (run_dir / "analysis").glob("sample-*")
    assert {"samples_gmm.png", "traversal.png", "latent_scatter.png"} <= {
        p.name for p in folder.iterdir()
    }
