"""Building objects from config nodes: nested targets, partials, the allow-list, key-named errors."""

from __future__ import annotations

import functools

import pytest
import torch
from omegaconf import OmegaConf

from vae_experiments.targets import ConfigError, check, instantiate, resolve_target


class _Part:
    """A constructor with typed arguments and a value rule, as our model parts have."""

    def __init__(self, size: int, rate: float = 0.5, names: list[int] | None = None):
        if size < 1:
            raise ConfigError("size", size, "must be an integer >= 1")
        self.size, self.rate, self.names = size, rate, names


def test_refuses_targets_that_are_not_ours_before_importing(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    (tmp_path / "evil_module.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass X: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for target in ("evil_module.X", "os.system", "builtins.eval", "torch.hub.load"):
        with pytest.raises(ConfigError, match=r"model\._target_=.* is invalid: not a target"):
            instantiate({"_target_": target, "command": f"touch {marker}"}, key="model")
    assert not marker.exists()


def test_allowed_prefix_must_still_be_a_class():
    with pytest.raises(ConfigError, match="must name a class"):
        resolve_target("torch.optim.lr_scheduler.math", "scheduler")
    with pytest.raises(ConfigError, match="no such class"):
        resolve_target("torch.optim.Adamm", "optimizer")


def test_nested_targets_and_partials():
    params = [torch.nn.Parameter(torch.zeros(2))]
    factory = instantiate(
        OmegaConf.create({"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1})
    )
    optimizer = factory(params)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["lr"] == 0.1
    assert instantiate({"_target_": None}) is None


def test_type_errors_name_the_key():
    node = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": "abc"}
    with pytest.raises(ConfigError, match=r"^optimizer\.lr=abc is invalid: must be a number"):
        instantiate(node, key="optimizer")
    with pytest.raises(ConfigError, match=r"^optimizer\.lr=abc is invalid"):
        check(node, key="optimizer")


def test_non_finite_values_are_refused():
    with pytest.raises(ConfigError, match=r"optimizer\.lr=nan is invalid: must be a finite number"):
        check({"_target_": "torch.optim.Adam", "_partial_": True, "lr": float("nan")}, "optimizer")


def test_unknown_key_gets_the_closest_name_and_missing_key_is_named():
    with pytest.raises(
        ConfigError, match=r"optimizer\.llr: not a parameter of Adam; did you mean `optimizer\.lr`"
    ):
        check({"_target_": "torch.optim.Adam", "_partial_": True, "llr": 0.1}, "optimizer")


def test_constructor_errors_get_the_node_key(monkeypatch):
    import vae_experiments.targets as targets

    monkeypatch.setattr(targets, "ALLOWED_TARGETS", (*targets.ALLOWED_TARGETS, "tests."))
    node = {"_target_": "tests.test_targets._Part", "size": 0}
    with pytest.raises(
        ConfigError, match=r"^model\.network\.size=0 is invalid: must be an integer >= 1$"
    ):
        instantiate(node, key="model.network")
    with pytest.raises(
        ConfigError, match=r"model\.network\.names=\[a\] is invalid: must be a list of integers"
    ):
        check({**node, "size": 2, "names": ["a"]}, key="model.network")
    with pytest.raises(ConfigError, match=r"model\.size: required by _Part"):
        check({"_target_": "tests.test_targets._Part"}, key="model")
    check({"_target_": "tests.test_targets._Part"}, key="model", supplied=["size"])


def test_torch_value_errors_of_a_partial_name_the_node():
    factory = instantiate(
        {"_target_": "torch.optim.Adam", "_partial_": True, "lr": -1.0}, "optimizer"
    )
    assert factory.func is torch.optim.Adam or isinstance(factory, functools.partial)
    with pytest.raises(
        ConfigError,
        match=r"^optimizer: Adam\(lr=-1.0\) refused its arguments: Invalid learning rate",
    ):
        factory([torch.nn.Parameter(torch.zeros(1))])


def test_several_problems_are_listed_together():
    with pytest.raises(ConfigError, match="2 invalid config values"):
        check(
            {"_target_": "torch.optim.Adam", "_partial_": True, "lr": "x", "eps": "y"}, "optimizer"
        )


def test_a_part_given_as_a_plain_value_is_refused_with_its_key():
    node = {
        "_target_": "vae_experiments.models.VAE",
        "latent_dim": 2,
        "network": "mlp",
        "likelihood": {"_target_": "vae_experiments.models.likelihoods.Bernoulli"},
        "beta": 1.0,
        "kl_warmup_steps": 0,
    }
    with pytest.raises(ConfigError, match=r"^model\.network=mlp is invalid: must be a config node"):
        check(node, key="model", supplied=["image_shape"])
