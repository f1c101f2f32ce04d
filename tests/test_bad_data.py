"""Broken inputs, one test each: the error names the file and what is wrong, before training
starts; ``skip_corrupt=true`` leaves unreadable image files out and says how many. Through
``train.py``, bad data is one ``error:`` line (exit status 2) and leaves nothing that blocks the
corrected command."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO_ROOT, sweep_job
from tests.fake_data import IDX_NAMES, idx_bytes, write_celeba, write_idx, write_idx_dataset
from tests.fake_data import write_image_folder as write_folder
from tests.test_cli import QUICK, run_cli
from tests.test_data import make_celeba, make_folder, make_idx
from vae_experiments.data import DataError, FashionMNIST, read_idx
from vae_experiments.data.files import CorruptImageError

IMAGES = np.random.default_rng(0).integers(0, 256, (4, 28, 28)).astype(np.uint8)


# --- IDX ------------------------------------------------------------------------------------


def write_raw(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


BROKEN_IDX = {
    "html": (b"<!DOCTYPE html><html>rate limited</html>", "bad IDX magic number 0x3c21444f"),
    "empty": (b"", "bad IDX magic number: the file holds only 0 bytes"),
    "no_dims": (b"\x00\x00\x08\x00", "bad IDX magic number 0x00000800"),
    "float": (b"\x00\x00\x0d\x03" + bytes(12), r"bad .* type code 0x0d \(float32\)"),
    "int32": (b"\x00\x00\x0c\x01" + bytes(4), r"bad .* type code 0x0c \(int32\)"),
    "header": (b"\x00\x00\x08\x03\x00\x00", "IDX header is truncated: 6 bytes"),
    "payload": (idx_bytes(IMAGES)[:-100], "IDX file is truncated"),
    "too_long": (idx_bytes(IMAGES) + bytes(7), "IDX file is 7 bytes too long"),
}


@pytest.mark.parametrize("name", BROKEN_IDX)
def test_broken_idx_file_says_what_is_wrong(tmp_path, name):
    data, problem = BROKEN_IDX[name]
    path = write_raw(tmp_path / "train-images-idx3-ubyte", data)
    with pytest.raises(ValueError, match=rf"^{path}: {problem}") as info:
        read_idx(path)
    assert "data.source.skip_corrupt cannot skip part of it" in str(info.value)


@pytest.mark.parametrize("damage", ["cut_short", "bytes_flipped"])
def test_corrupt_gzip_idx_names_the_file(tmp_path, damage):
    packed = bytearray(gzip.compress(idx_bytes(IMAGES)))
    if damage == "cut_short":
        packed = packed[: len(packed) // 2]
    else:
        packed[len(packed) // 2 : len(packed) // 2 + 16] = bytes(16)
    path = write_raw(tmp_path / "train-images-idx3-ubyte.gz", bytes(packed))
    with pytest.raises(ValueError, match=rf"^{path}: .*gzip stream is truncated or corrupt"):
        read_idx(path)


def test_broken_idx_in_a_datamodule_says_how_to_replace_it(tmp_path):
    folder = write_idx_dataset(tmp_path, gz=True)
    bad = folder / f"{IDX_NAMES['test_labels']}.gz"
    bad.write_bytes(bad.read_bytes()[:30])
    with pytest.raises(ValueError) as info:
        make_idx(tmp_path).setup()
    message = str(info.value)
    assert message.startswith(f"{bad}: ")
    assert "data.source.skip_corrupt cannot" in message and "Delete it and get it again" in message
    assert "data.source.download=true" in message


def test_broken_fashion_idx_points_at_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.setattr(FashionMNIST, "fallback_dirs", ())
    folder = write_idx_dataset(tmp_path, name="FashionMNIST", layout="flat")
    write_raw(folder / IDX_NAMES["train_images"], b"\x00\x00\x0b\x03" + bytes(12))
    with pytest.raises(ValueError, match=r"data type code 0x0b \(int16\)") as info:
        make_idx(tmp_path, FashionMNIST).setup()
    assert "apt-get install dataset-fashion-mnist" in str(info.value)


def test_idx_labels_that_do_not_match_their_images_say_how_to_fix_it(tmp_path):
    folder = write_idx_dataset(tmp_path, n_test=32)
    labels = write_idx(folder / IDX_NAMES["test_labels"], np.zeros(31, np.uint8))
    with pytest.raises(DataError) as info:
        make_idx(tmp_path).setup()
    message = str(info.value)
    assert message.startswith(
        f"{labels}: expected 32 labels, one per image of {folder / IDX_NAMES['test_images']}, "
        "got 31 labels: the two files are not a pair"
    )
    assert "Replace both with the four files of one download of MNIST" in message
    assert "data.source.download=true" in message


def test_idx_images_of_the_wrong_shape(tmp_path):
    folder = write_idx_dataset(tmp_path)
    write_raw(folder / IDX_NAMES["test_images"], idx_bytes(np.zeros((32, 32, 32), np.uint8)))
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 28, 28\), got \(32, 32"):
        make_idx(tmp_path).setup()


# --- image files ----------------------------------------------------------------------------


def damage_file(path: Path, damage: str) -> None:
    data = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"<html>404 Not Found</html>")
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "bad_crc":  # PNG: compressed data overwritten, chunk checksum now wrong
        broken = bytearray(data)
        broken[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
        path.write_bytes(bytes(broken))
    else:
        raise ValueError(damage)


# write_folder(n=12): img000.png in cats/, img001.jpg in dogs/.
DAMAGES = [
    ("cats/img000.png", "garbage"),
    ("cats/img000.png", "empty"),
    ("cats/img000.png", "truncated"),
    ("cats/img000.png", "bad_crc"),
    ("dogs/img001.jpg", "garbage"),
    ("dogs/img001.jpg", "truncated"),
]
DAMAGE_IDS = [f"{Path(f).suffix[1:]}_{d}" for f, d in DAMAGES]
CACHE_IDS = ["cached", "per_file"]


@pytest.mark.parametrize("cache", [True, False], ids=CACHE_IDS)
@pytest.mark.parametrize(("name", "damage"), DAMAGES, ids=DAMAGE_IDS)
def test_broken_image_fails_at_setup_naming_it(tmp_path, name, damage, cache):
    root = write_folder(tmp_path / "images", n=12)
    damage_file(root / name, damage)
    datamodule = make_folder(root, cache=cache)
    with pytest.raises(CorruptImageError) as info:
        datamodule.setup()  # before any batch is drawn
    message = str(info.value)
    assert message.startswith(f"{root / name}: image file is corrupt or unreadable")
    assert "data.source.skip_corrupt=true" in message


@pytest.mark.parametrize("cache", [True, False], ids=CACHE_IDS)
@pytest.mark.parametrize(("name", "damage"), DAMAGES, ids=DAMAGE_IDS)
def test_skip_corrupt_leaves_the_broken_image_out(tmp_path, caplog, name, damage, cache):
    root = write_folder(tmp_path / "images", n=12)
    damage_file(root / name, damage)
    datamodule = make_folder(root, cache=cache, skip_corrupt=True)
    with caplog.at_level(logging.WARNING):
        datamodule.setup()
    served = [p for paths in datamodule.source.split_paths.values() for p in paths]
    assert len(served) == 11 and root / name not in served
    assert sum(len(split) for split in datamodule.splits.values()) == 11
    assert "skipped 1 of 12 image files as corrupt or unreadable" in caplog.text
    assert str(root / name) in caplog.text


def test_skip_corrupt_reports_the_count_and_first_names(tmp_path, caplog):
    root = write_folder(tmp_path / "images", n=12, classes=())
    broken = sorted(root.iterdir())[:7]
    for path in broken:
        damage_file(path, "garbage")
    datamodule = make_folder(root, val_size=0, test_size=0, skip_corrupt=True)
    with caplog.at_level(logging.WARNING):
        datamodule.setup()
    assert len(datamodule.splits["train"]) == 5
    assert "skipped 7 of 12 image files" in caplog.text and "and 2 more" in caplog.text
    assert all(str(p) in caplog.text for p in broken[:5])


@pytest.mark.parametrize("cache", [True, False], ids=CACHE_IDS)
def test_every_image_skipped_fails_saying_so(tmp_path, cache):
    root = tmp_path / "images"
    root.mkdir()
    for i in range(6):  # e.g. an HTML error page saved under each image's name
        (root / f"img{i}.png").write_bytes(b"<html>404 Not Found</html>")
        (root / f"pic{i}.jpg").write_bytes(b"")
    datamodule = make_folder(root, cache=cache, skip_corrupt=True)
    with pytest.raises(ValueError, match="^all 12 image files were skipped as corrupt") as info:
        datamodule.setup()  # not "the training split (0 images) ... use fewer devices"
    message = str(info.value)
    assert f"under {root}: img0.png, img1.png, img2.png, img3.png, img4.png and 7 more" in message
    assert "cannot identify image file" in message and "`file <name>`" in message
    assert "devices" not in message


def test_per_file_check_names_every_broken_file(tmp_path):
    root = write_folder(tmp_path / "images", n=12, classes=())
    broken = sorted(root.iterdir())[:3]
    for path in broken:
        damage_file(path, "truncated")
    with pytest.raises(CorruptImageError, match="2 more in the train split") as info:
        make_folder(root, val_size=0, test_size=0, cache=False).setup()
    assert all(str(p) in str(info.value) for p in broken)


def test_jpeg_with_bytes_after_its_end_marker_is_accepted(tmp_path):
    root = write_folder(tmp_path / "images", n=4, classes=())
    jpeg = root / "img001.jpg"
    jpeg.write_bytes(jpeg.read_bytes() + bytes(4096))  # e.g. padding some cameras write
    datamodule = make_folder(root, val_size=0, test_size=0, cache=False)
    datamodule.setup()
    assert len(datamodule.splits["train"]) == 4


def test_image_skipped_in_the_cache_fails_without_skip_corrupt(tmp_path):
    root = write_folder(tmp_path / "images", n=12)
    damage_file(root / "dogs/img001.jpg", "truncated")
    make_folder(root, skip_corrupt=True).setup()
    with pytest.raises(
        CorruptImageError, match="when it was built with data.source.skip_corrupt=true"
    ):
        make_folder(root).setup()


# --- CelebA ---------------------------------------------------------------------------------


def test_celeba_broken_jpeg_fails_while_building_the_cache(tmp_path):
    image_dir = write_celeba(tmp_path, n=12)
    damage_file(image_dir / "000004.jpg", "truncated")
    with pytest.raises(CorruptImageError, match=rf"^{image_dir / '000004.jpg'}: image file"):
        make_celeba(tmp_path).prepare()
    assert not list((tmp_path / "cache").glob("*.npy"))


def test_celeba_skip_corrupt_and_missing_listed_images(tmp_path, caplog):
    image_dir = write_celeba(tmp_path, n=12)
    damage_file(image_dir / "000004.jpg", "garbage")
    (image_dir / "000010.jpg").unlink()  # listed in the partition file, val split
    datamodule = make_celeba(tmp_path, skip_corrupt=True)
    with caplog.at_level(logging.WARNING):
        datamodule.setup()
    assert {k: len(v) for k, v in datamodule.splits.items()} == {"train": 7, "val": 1, "test": 2}
    assert str(image_dir / "000004.jpg") in caplog.text
    assert str(image_dir / "000010.jpg") in caplog.text


def test_celeba_every_listed_image_missing_or_broken_fails_saying_so(tmp_path):
    image_dir = write_celeba(tmp_path, n=6)
    for path in sorted(image_dir.iterdir()):
        path.rename(path.with_name("x" + path.name))  # a .jpg folder, none of the listed names
    with pytest.raises(ValueError, match=rf"^all 6 image files .* under {image_dir}: 000001.jpg"):
        make_celeba(tmp_path, skip_corrupt=True).setup()


def test_celeba_missing_listed_image_suggests_skip_corrupt(tmp_path):
    image_dir = write_celeba(tmp_path, n=12)
    (image_dir / "000010.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=rf"first is {image_dir / '000010.jpg'}") as info:
        make_celeba(tmp_path).setup()
    assert "data.source.skip_corrupt=true" in str(info.value)


@pytest.mark.parametrize("found", ["partition_list", "image_folder", "apart"])
def test_celeba_not_found_says_which_part_was_found_and_which_is_missing(tmp_path, found):
    image_dir = write_celeba(tmp_path, n=6)
    partition = tmp_path / "celeba" / "list_eval_partition.txt"
    if found == "partition_list":
        for path in image_dir.iterdir():
            path.unlink()
        image_dir.rmdir()
    elif found == "image_folder":
        partition.unlink()
    else:
        partition = partition.rename(tmp_path / partition.name)
    with pytest.raises(DataError) as info:
        make_celeba(tmp_path).setup()
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError) and "\n" not in message
    assert message.startswith(f"CelebA not found under data.source.data_dir={tmp_path}: found ")
    expected = {
        "partition_list": f"found its partition list {partition}, but its image folder is "
        f"missing: no {image_dir}/ (nor img_align_celeba/img_align_celeba/ from Kaggle's zip); "
        f"extract img_align_celeba.zip into {tmp_path / 'celeba'}",
        "image_folder": f"found its image folder {image_dir}, but its partition list is "
        "missing: no list_eval_partition.txt or list_eval_partition.csv in "
        f"{tmp_path / 'celeba'}; put list_eval_partition.txt",
        "apart": f"found its partition list {partition} and its image folder {image_dir}, but "
        "not side by side; move them into one folder",
    }[found]
    assert expected in message
    assert "jessicali9530/celeba-dataset" in message


def test_celeba_empty_image_folder_names_it(tmp_path):
    image_dir = write_celeba(tmp_path, n=6)
    for path in image_dir.iterdir():
        path.unlink()
    with pytest.raises(FileNotFoundError, match=rf"image folder {image_dir} holds no \.jpg files"):
        make_celeba(tmp_path).setup()


def test_image_folder_not_a_folder_says_what_to_set(tmp_path):
    (tmp_path / "one.png").write_bytes(b"")
    with pytest.raises(
        FileNotFoundError, match=r"is not a folder \(it is a file\); set data.source.path"
    ):
        make_folder(tmp_path / "one.png").setup()


# --- through train.py -----------------------------------------------------------------------

TRAIN_PY = str(REPO_ROOT / "train.py")
# A small MLP model on whatever data the test gives.
SMALL = [*QUICK, "model/network=mlp", "model.network.hidden_dims=[16]", "model.latent_dim=2"]
SMALL += ["logger=none"]


def assert_one_error_line(result, status: int = 2) -> str:
    """The command ended with one ``error:`` line on stderr, no traceback, and ``status``."""
    assert result.returncode == status, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr[-3000:]
    return errors[0]


def folder_data(path: Path, tmp_path: Path) -> list[str]:
    return [
        "data=image_folder",
        f"data.source.path={path}",
        "data.source.image_size=8",
        "data.source.channels=1",
        f"data.source.cache_dir={tmp_path / 'cache'}",
    ]


def empty_folder(tmp_path: Path) -> tuple[list[str], str]:
    (tmp_path / "images").mkdir()
    return folder_data(tmp_path / "images", tmp_path), "error: no images found under"


def corrupt_jpeg(tmp_path: Path) -> tuple[list[str], str]:
    root = write_folder(tmp_path / "images", n=12)
    damage_file(root / "dogs/img001.jpg", "truncated")
    message = f"error: {root / 'dogs/img001.jpg'}: image file is corrupt or unreadable"
    return folder_data(root, tmp_path), message


def celeba_list_missing(tmp_path: Path) -> tuple[list[str], str]:
    image_dir = write_celeba(tmp_path / "data", n=6)
    (tmp_path / "data" / "celeba" / "list_eval_partition.txt").unlink()
    args = ["data=celeba", f"data.source.data_dir={tmp_path / 'data'}"]
    args += ["data.source.image_size=8", f"data.source.cache_dir={tmp_path / 'cache'}"]
    return (
        args,
        f"error: CelebA not found under data.source.data_dir={tmp_path / 'data'}: found its image folder {image_dir}, but its partition list is missing",
    )


def idx_bad_magic(tmp_path: Path) -> tuple[list[str], str]:
    folder = write_idx_dataset(tmp_path / "data")
    bad = write_raw(folder / IDX_NAMES["train_images"], b"<!DOCTYPE html><html></html>")
    return ["data=mnist", f"data.source.data_dir={tmp_path / 'data'}"], f"error: {bad}: bad IDX"


def idx_truncated_gz(tmp_path: Path) -> tuple[list[str], str]:
    folder = write_idx_dataset(tmp_path / "data", gz=True)
    bad = folder / f"{IDX_NAMES['test_images']}.gz"
    bad.write_bytes(bad.read_bytes()[:200])
    args = ["data=mnist", f"data.source.data_dir={tmp_path / 'data'}"]
    return args, f"error: {bad}: cannot read IDX file, its gzip stream is truncated"


BAD_DATA = [empty_folder, corrupt_jpeg, celeba_list_missing, idx_bad_magic, idx_truncated_gz]


@pytest.mark.slow  # a command each (~7 s of CPU); the default run has the corrected command's test
@pytest.mark.parametrize("fault", BAD_DATA, ids=lambda fault: fault.__name__)
def test_bad_data_is_one_error_line_and_leaves_nothing(tmp_path, fault):
    data_args, message = fault(tmp_path)
    run_dir = tmp_path / "runs" / "x"
    result = run_cli(
        [sys.executable, TRAIN_PY, *SMALL, *data_args, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        expect_success=False,
    )
    assert assert_one_error_line(result).startswith(message)
    assert not (tmp_path / "runs").exists()  # the run directory and the parent it made
    # Caches of the splits that decoded are complete (and shared by runs); none is half-built.
    assert not list((tmp_path / "cache").glob("*-train-*.npy"))
    assert not list((tmp_path / "cache").glob("*.tmp*"))


def test_the_corrected_command_then_trains_into_the_same_directory(tmp_path):
    data_args, message = idx_truncated_gz(tmp_path)
    command = [sys.executable, TRAIN_PY, *SMALL, *data_args, f"hydra.run.dir={tmp_path / 'run'}"]
    line = assert_one_error_line(run_cli(command, cwd=tmp_path, expect_success=False))
    assert line.startswith(message) and not (tmp_path / "run").exists()
    write_idx_dataset(tmp_path / "data", gz=True)  # the files downloaded again
    run_cli(command, cwd=tmp_path)
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "finished"


def fingerprint(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


@pytest.mark.slow  # a run, then its resume
def test_bad_data_on_resume_changes_nothing_of_the_run(tmp_path):
    folder = write_idx_dataset(tmp_path / "data")
    run_dir = tmp_path / "run"
    data_args = ["data=mnist", f"data.source.data_dir={tmp_path / 'data'}"]
    run_cli([sys.executable, TRAIN_PY, *SMALL, *data_args, f"hydra.run.dir={run_dir}"], tmp_path)
    before = fingerprint(run_dir)
    write_raw(folder / IDX_NAMES["test_labels"], b"")  # e.g. a copy that failed since
    result = run_cli(
        [
            sys.executable,
            TRAIN_PY,
            f"resume={run_dir}",
            "trainer.max_epochs=2",
            "optimizer.lr=0.01",
        ],
        cwd=tmp_path,
        expect_success=False,
    )
    line = assert_one_error_line(result)
    assert line.startswith(f"error: {folder / IDX_NAMES['test_labels']}: bad IDX magic number")
    assert fingerprint(run_dir) == before  # config.yaml, status.json, train.log, checkpoints


@pytest.mark.slow  # a sweep of two jobs; test_cli has the default run's failing sweep job
def test_bad_data_in_a_sweep_fails_that_job_alone(tmp_path):
    folder = write_idx_dataset(tmp_path / "bad")
    write_raw(folder / IDX_NAMES["train_labels"], b"")
    write_idx_dataset(tmp_path / "good")
    sweep_dir = tmp_path / "sweep"
    result = run_cli(
        [
            sys.executable,
            TRAIN_PY,
            "-m",
            *SMALL,
            "data=mnist",
            f"data.source.data_dir={tmp_path / 'bad'},{tmp_path / 'good'}",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=tmp_path,
        expect_success=False,
    )
    assert result.returncode != 0  # as for any failed job: the sweep reports it at the end
    failed = json.loads((sweep_job(sweep_dir, 0) / "status.json").read_text())
    assert failed["status"] == "failed"
    assert failed["error"].startswith(f"DataError: {folder / IDX_NAMES['train_labels']}: bad IDX")
    finished = json.loads((sweep_job(sweep_dir, 1) / "status.json").read_text())
    assert finished["status"] == "finished"
