"""Every use of Hydra beyond its application API (``hydra.main``, ``compose``, ``initialize*``,
``HydraConfig``, ``hydra.types``, ``hydra.errors``, ``hydra.utils``), one function each.

These are Hydra's private modules (``hydra._internal``), helpers it does not export, and the
plugin-level API that Hydra documents for sweeper and launcher authors only. Each docstring names
what it uses and why the application API does not serve; ``tests/test_hydra_compat.py`` has one
test per function, run against the installed Hydra, so an upgrade that changes one of them fails
that test by name. The rest of the package uses only the application API; new touchpoints belong
here.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hydra.core.override_parser.types import Override


def parse_overrides(lines: Sequence[str]) -> list[Override]:
    """Hydra's own parse of command-line overrides: ``key=value``, ``+key=value``, ``~key``,
    group choices and sweeps (``model=ae,vae``), with typed values.

    Uses ``hydra.core.override_parser.overrides_parser.OverridesParser`` and its ``Override``
    objects, the plugin-level API that sweepers use. Applications get no parser: ``compose``
    applies overrides but does not say what each one was.

    Raises:
        hydra.errors.OverrideParseException: for a line Hydra would reject.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(list(lines))


@dataclass(frozen=True)
class CommandLine:
    """What a ``@hydra.main`` command line asks for.

    Attributes:
        config_name: ``--config-name``/``-cn``, None if not given.
        other_config_dir: whether ``--config-path``/``-cp`` or ``--config-dir``/``-cd`` was given.
        overrides: the overrides, as written.
    """

    config_name: str | None
    other_config_dir: bool
    overrides: list[str]


def parse_command_line(argv: Sequence[str]) -> CommandLine:
    """Reads a ``@hydra.main`` command line (``sys.argv[1:]``) as Hydra does.

    Private: ``hydra._internal.utils.get_args_parser``, the argument parser ``hydra.main`` uses;
    Hydra has no public one, and a copy of its flags would drift from it.

    Raises:
        SystemExit: for a command line argparse rejects (as argparse does).
    """
    from hydra._internal.utils import get_args_parser

    args = get_args_parser().parse_args(list(argv))
    return CommandLine(
        config_name=args.config_name,
        other_config_dir=args.config_dir is not None or args.config_path is not None,
        overrides=list(args.overrides),
    )


@contextmanager
def fresh_global_hydra() -> Iterator[None]:
    """Inside, Hydra is not initialized, so ``initialize_config_dir`` + ``compose`` work even
    within a running ``@hydra.main`` app; on exit Hydra's global state is as it was.

    Uses ``hydra.core.global_hydra.GlobalHydra.instance().clear()`` and the helpers that Hydra's
    own ``initialize`` uses to restore that state, ``get_gh_backup`` and
    ``restore_gh_from_backup`` (in ``hydra.initialize``, not exported). ``initialize`` refuses to
    run while Hydra is initialized, and offers no way to put a running app's state back.
    """
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        yield
    finally:
        restore_gh_from_backup(backup)


def config_groups() -> set[str]:
    """Every config group the initialized Hydra can choose from, nested ones as
    ``hydra/launcher``; call it inside ``initialize_config_dir``.

    Uses ``GlobalHydra.instance().config_loader().list_groups``, the plugin-level config loader:
    the application API lists no groups.
    """
    from hydra.core.global_hydra import GlobalHydra

    loader = GlobalHydra.instance().config_loader()

    def below(parent: str) -> set[str]:
        groups = set()
        for name in loader.list_groups(parent):
            group = f"{parent}/{name}" if parent else name
            groups |= {group, *below(group)}
        return groups

    return below("")


def group_options(group: str) -> list[str]:
    """The options of config group ``group`` (``model/network`` -> ``[conv, linear, mlp]``);
    call it inside ``initialize_config_dir``.

    Uses the plugin-level config loader's ``get_group_options``, as :func:`config_groups` does.
    """
    from hydra.core.global_hydra import GlobalHydra

    return sorted(GlobalHydra.instance().config_loader().get_group_options(group))
