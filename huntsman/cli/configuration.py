"""Which configuration a command-line tool uses: the running service's, or its own."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence

from huntsman.config import Config

__all__ = ["ChosenConfig", "choose_config"]


@dataclasses.dataclass(frozen=True)
class ChosenConfig:
    """The configuration a command uses, and the line that says so (``None``: nothing to say)."""

    config: Config
    note: str | None = None
    conflicts: tuple[str, ...] = ()


def _own_source(args: argparse.Namespace) -> str:
    from huntsman.config import default_config_path

    base = args.config or os.environ.get("HUNTSMAN_CONFIG") or default_config_path()
    text = str(base) if base else "the built-in defaults"
    return f"{text} + {args.override}" if args.override else text


def _listed(keys: Sequence[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def choose_config(args: argparse.Namespace, own: Config) -> ChosenConfig:
    """The running service's configuration by default; the command's own when it gives one.

    Explicit means ``--config``, ``--override`` or ``HUNTSMAN_CONFIG``.  Without one, and when
    the var directory has a ``service-config.json``, the service's configuration is used and
    any data setting in which this command's environment differs is named as ignored.
    """
    from huntsman.service_config import config_differences, read_service_config

    service = read_service_config(own)
    if service is None:
        return ChosenConfig(own)
    differences = tuple(config_differences(own, service.data))
    explicit = args.config is not None or args.override is not None or bool(
        os.environ.get("HUNTSMAN_CONFIG")
    )
    if explicit:
        if not differences:
            return ChosenConfig(own, f"huntsman: using {_own_source(args)} (same as the service's: "
                                     f"{service.describe()})")
        return ChosenConfig(
            own,
            f"huntsman: warning: using {_own_source(args)}, which differs from the service's "
            f"configuration ({service.describe()}) in {_listed(differences)}",
            differences,
        )
    config = service.to_config(own)
    note = f"huntsman: using the service's configuration ({service.describe()})"
    from huntsman.config import _env_overrides
    from huntsman.service_config import flatten

    from_env = set(flatten(_env_overrides(os.environ)))
    ignored = [k for k in differences if k in from_env and not k.startswith("database.uri")]
    if ignored:
        note += f"; ignoring this environment's {_listed(ignored)} (give --config to use them)"
    return ChosenConfig(config, note)
