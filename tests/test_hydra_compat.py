"""One test per use of Hydra beyond its application API (vae_experiments.cli.hydra_compat), run
against the installed Hydra: an upgrade that changes one fails its test by name."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import OverrideParseException

from tests.conftest import CONFIG_DIR
from vae_experiments.cli import hydra_compat


def test_parse_overrides_reads_every_kind_the_cli_handles():
    lines = ["model.latent_dim=8", "+trainer.limit_train_batches=2", "~logger", "model=ae,vae"]
    value, added, deleted, swept = hydra_compat.parse_overrides(lines)
    # What cli/run_dirs.py and cli/did_you_mean.py read from each override:
    assert value.key_or_group == "model.latent_dim" and value.value() == 8
    assert value.input_line == "model.latent_dim=8" and value.package is None
    assert not (value.is_add() or value.is_force_add() or value.is_delete())
    assert not value.is_sweep_override()
    assert added.is_add() and added.key_or_group == "trainer.limit_train_batches"
    assert deleted.is_delete() and deleted.key_or_group == "logger"
    assert swept.is_sweep_override() and list(swept.sweep_string_iterator()) == ["ae", "vae"]
    assert hydra_compat.parse_overrides(["++seed=1"])[0].is_force_add()
    assert hydra_compat.parse_overrides(["model@x=ae"])[0].package == "x"
    with pytest.raises(OverrideParseException):
        hydra_compat.parse_overrides(["model.latent_dim=[1,"])


def test_parse_command_line_reads_a_hydra_main_command_line():
    command_line = hydra_compat.parse_command_line(
        ["-m", "--config-name", "evaluate", "model=vae", "seed=3"]
    )
    assert command_line == hydra_compat.CommandLine("evaluate", False, ["model=vae", "seed=3"])
    assert hydra_compat.parse_command_line(["seed=3"]).config_name is None
    assert hydra_compat.parse_command_line(["-cp", "conf", "seed=3"]).other_config_dir
    assert hydra_compat.parse_command_line(["--config-dir=/x"]).other_config_dir
    with pytest.raises(SystemExit):
        hydra_compat.parse_command_line(["--config-name"])  # the flag's value is missing


def test_fresh_global_hydra_composes_inside_a_running_app_and_restores_it():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        outer = GlobalHydra.instance().config_loader()
        with hydra_compat.fresh_global_hydra():
            assert not GlobalHydra.instance().is_initialized()
            with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
                assert compose("train").seed is not None
        assert GlobalHydra.instance().is_initialized()
        assert GlobalHydra.instance().config_loader() is not None
        assert compose("train", overrides=["seed=5"]).seed == 5
        assert type(GlobalHydra.instance().config_loader()) is type(outer)
    # Outside any app: inside it Hydra is free, and after it Hydra is uninitialized again.
    with hydra_compat.fresh_global_hydra():
        assert not GlobalHydra.instance().is_initialized()
    assert not GlobalHydra.instance().is_initialized()


def test_config_groups_lists_nested_groups():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        groups = hydra_compat.config_groups()
    assert {"model", "data", "trainer", "logger", "optimizer", "scheduler"} <= groups
    assert {"hydra", "hydra/launcher", "hydra/sweeper"} <= groups


def test_group_options_lists_a_nested_groups_files():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        assert hydra_compat.group_options("model/network") == [
            "conv",
            "linear",
            "mlp",
            "small_tanh_mlp",
            "two_block_conv",
        ]
        assert "vae" in hydra_compat.group_options("model")
