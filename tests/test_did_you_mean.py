"""A misspelled key on the command line is answered with the closest valid one, and an unknown
model, dataset or trainer with the list of available ones."""

from __future__ import annotations

import sys

import pytest

from tests.conftest import CONFIG_DIR, MODEL_CONFIGS, REPO_ROOT
from tests.test_cli import run_cli
from vae_experiments.cli import train as train_cli
from vae_experiments.cli.did_you_mean import closest_key_message, unknown_key_messages


def run_main(monkeypatch, capsys, args: list[str]) -> str:
    """Runs ``python train.py <args>`` in this process; returns its stderr (it must fail)."""
    monkeypatch.setattr(sys, "argv", ["train.py", *args])
    with pytest.raises(SystemExit) as exit_:
        train_cli.main()
    assert exit_.value.code == 1
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "suggestion"),
    [
        (
            "model.latent_dims=8",
            "model.latent_dims is not a config key: did you mean `model.latent_dim`?",
        ),
        (
            "trainer.max_epoch=3",
            "trainer.max_epoch is not a config key: did you mean `trainer.max_epochs`?",
        ),
        ("data.batchsize=4", "data.batchsize is not a config key: did you mean `data.batch_size`?"),
        ("seeed=1", "seeed is not a config key: did you mean `seed`?"),
        ("hydra.run.dirr=x", "hydra.run.dirr is not a config key: did you mean `hydra.run.dir`?"),
    ],
)
def test_misspelled_key_gets_the_closest_valid_name(monkeypatch, capsys, override, suggestion):
    err = run_main(monkeypatch, capsys, [override])
    assert f"Could not override '{override.split('=')[0]}'" in err  # Hydra's message stays
    assert err.rstrip().endswith(suggestion)


def test_misspelled_key_in_a_sweep(monkeypatch, capsys, tmp_path):
    err = run_main(
        monkeypatch, capsys, ["-m", "model.latent_dims=8,16", f"hydra.sweep.dir={tmp_path}"]
    )
    assert "did you mean `model.latent_dim`?" in err


def test_key_missing_for_one_choice_of_a_swept_group(monkeypatch, capsys, tmp_path):
    err = run_main(
        monkeypatch,
        capsys,
        [
            "-m",
            "model=ae,vae",
            "model.beta=4",
            "trainer.max_epochs=1",
            f"hydra.sweep.dir={tmp_path}",
        ],
    )
    assert "model.beta is not a config key; model has: _target_, latent_dim, likelihood," in err
    assert err.rstrip().endswith("(with model=ae)")


def test_misspelled_key_inside_a_group_chosen_on_the_command_line():
    messages = unknown_key_messages(
        str(CONFIG_DIR),
        "train",
        ["model=denoising_ae", "model.corruption.sdt=0.1", "model.latent_dim=3"],
    )
    assert messages == [
        "model.corruption.sdt is not a config key: did you mean `model.corruption.std`?"
    ]


def test_added_keys_and_valid_overrides_get_no_message():
    overrides = [
        "+trainer.limit_train_batches=4",
        "trainer.limit_train_batches=5",
        "++model.network.channels=[8]",
        "model/network=mlp,conv",
        "model=ae,vae",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=5",
    ]
    assert unknown_key_messages(str(CONFIG_DIR), "train", overrides) == []


def test_closest_key_message_walks_the_path():
    tree = {"model": {"noise": {"std": 0.1}, "latent_dim": 2}, "seed": 0}
    assert closest_key_message(tree, "model.noise.std") is None
    assert closest_key_message(tree, "model.nois.std").endswith("did you mean `model.noise.std`?")
    assert closest_key_message(tree, "model.zzz") == (
        "model.zzz is not a config key; model has: latent_dim, noise"
    )
    assert closest_key_message(tree, "model.latent_dim.x") is None  # below a value: Hydra says


@pytest.mark.parametrize(
    ("group", "options"),
    [
        ("model", MODEL_CONFIGS),
        ("data", ["celeba", "digits", "fashion_mnist", "image_folder", "mnist"]),
        ("trainer", ["cpu", "ddp", "default", "gpu"]),
    ],
)
def test_unknown_option_lists_the_available_ones(monkeypatch, capsys, group, options):
    err = run_main(monkeypatch, capsys, [f"{group}=nonesuch"])
    assert f"Could not find '{group}/nonesuch'" in err
    listed = err.split(f"Available options in '{group}':")[1].split()
    assert listed[: len(options)] == options
    assert "is not a config key" not in err


@pytest.mark.slow  # three subprocesses; train.py's suggestions are tested in process
def test_the_analysis_commands_suggest_too(tmp_path):
    result = run_cli(
        [sys.executable, str(REPO_ROOT / "scripts" / "evaluate.py"), "kk=3"],
        cwd=tmp_path,
        expect_success=False,
    )
    assert result.returncode == 1
    assert "kk is not a config key: did you mean `k`?" in result.stderr


@pytest.mark.parametrize(
    ("override", "hint"),
    [
        ("model.arch=mlp", "model.arch is no longer a config key: use `model/network=mlp`"),
        (
            "model.hidden_dims=[64]",
            "model.hidden_dims is no longer a config key: use "
            "`model/network=mlp model.network.hidden_dims=[64]`",
        ),
        (
            "model.conv_channels=[8,16]",
            "model.conv_channels is no longer a config key: use "
            "`model/network=conv model.network.channels=[8,16]`",
        ),
        (
            "model.recon_loss=bce",
            "model.recon_loss is no longer a config key: use `model/likelihood=bernoulli`",
        ),
        (
            "model.sigma=0.05",
            "model.sigma is no longer a config key: use "
            "`model/likelihood=gaussian model.likelihood.sigma=0.05`",
        ),
        (
            "model.min_sigma=0.01",
            "model.min_sigma is no longer a config key: use "
            "`model/likelihood=gaussian model.likelihood.min_sigma=0.01`",
        ),
        (
            "model.noise.kind=mask",
            "model.noise.kind is no longer a config key: use `model/corruption=mask`",
        ),
    ],
)
def test_a_key_of_the_old_flat_model_configs_gets_the_override_that_replaced_it(
    monkeypatch, capsys, override, hint
):
    err = run_main(monkeypatch, capsys, ["model=ae", override])
    assert err.rstrip().splitlines()[-1] == hint


# Every key of the old flat data configs: (data=, the old override) -> what the default digits
# say, and the data option that has it with the override that replaced it there.
OLD_DATA_KEYS = [
    (
        "data.path=/pics",
        "it is data.source.path with data=image_folder or data=shapes; data=digits has no such "
        "setting",
        "image_folder",
    ),
    (
        "data.data_dir=/datasets",
        "it is data.source.data_dir with data=celeba, data=fashion_mnist or data=mnist; "
        "data=digits has no such setting",
        "mnist",
    ),
    (
        "data.image_size=32",
        "it is data.source.image_size with data=celeba or data=image_folder, "
        "data.source.image_shape with data=synthetic; data=digits has no such setting (the "
        "image size comes from its files)",
        "celeba",
    ),
    (
        "data.channels=1",
        "it is data.source.channels with data=image_folder, data.source.image_shape with "
        "data=synthetic; data=digits has no such setting (the channels come from its files)",
        "image_folder",
    ),
    (
        "data.cache_dir=/cache",
        "it is data.source.cache_dir with data=celeba, data=image_folder or data=shapes; "
        "data=digits has no such setting",
        "celeba",
    ),
    (
        "data.cache=false",
        "it is data.source.cache with data=celeba, data=image_folder or data=shapes; "
        "data=digits has no such setting",
        "image_folder",
    ),
    (
        "data.skip_corrupt=true",
        "it is data.source.skip_corrupt with data=celeba or data=image_folder; data=digits has "
        "no such setting",
        "image_folder",
    ),
    ("data.val_size=0.2", "use `data.source.val_size=0.2`", "fashion_mnist"),
    (
        "data.download=true",
        "it is data.source.download with data=fashion_mnist or data=mnist; data=digits has no "
        "such setting",
        "fashion_mnist",
    ),
]


@pytest.mark.parametrize(("override", "on_digits", "data"), OLD_DATA_KEYS)
def test_a_key_of_the_old_flat_data_configs_says_what_it_became(override, on_digits, data):
    from hydra import compose, initialize_config_dir

    key, _, value = override.partition("=")
    for choice, expected in (("digits", on_digits), (data, f"use `data.source.{key[5:]}={value}`")):
        messages = unknown_key_messages(str(CONFIG_DIR), "train", [f"data={choice}", override])
        assert messages == [f"{key} is no longer a config key: {expected}"]
    # What the message says to type composes, and sets the source's key.
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"data={data}", f"data.source.{key[5:]}={value}"])
    assert str(cfg.data.source[key[5:]]).lower() == value.lower()


def test_generated_data_names_its_image_shape_for_an_old_image_size():
    messages = unknown_key_messages(str(CONFIG_DIR), "train", ["data=synthetic", "data.channels=3"])
    assert messages == [
        "data.channels is no longer a config key: data=synthetic makes images of the shape "
        "data.source.image_shape=[channels,height,width]; data.source.channels is a key of "
        "data=image_folder"
    ]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("+data.image_size=32", "data.image_size is no longer a config key: it is data.source"),
        ("+data.val_size=0.2", "data.val_size is no longer a config key: use `data.source.val_"),
        ("+model.arch=mlp", "model.arch is no longer a config key: use `model/network=mlp`"),
        ("+model.hidden_dims=[8,16]", "model.hidden_dims is no longer a config key: use `model/"),
    ],
)
def test_an_old_key_added_with_a_plus_says_what_it_became(make_config, override, expected):
    """Hydra's own message advises ``+data.image_size=32``: the key is then checked against
    the data's parameters, and gets the same answer instead of `did you mean data.batch_size`."""
    from vae_experiments.config_checks import check_config
    from vae_experiments.targets import ConfigError

    with pytest.raises(ConfigError) as refusal:
        check_config(make_config([override]), lightning=False)
    assert str(refusal.value).startswith(expected)
    assert "batch_size" not in str(refusal.value)


def test_a_part_set_like_a_value_gets_its_config_group():
    messages = unknown_key_messages(
        str(CONFIG_DIR), "train", ["model=vae", "model.likelihood=gaussian", "model.network=mlp"]
    )
    assert messages == [
        "model.likelihood is chosen from a config group: use `model/likelihood=gaussian`",
        "model.network is chosen from a config group: use `model/network=mlp`",
    ]
