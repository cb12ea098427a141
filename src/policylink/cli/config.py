"""Configuration files and environment variables for ``serve``, ``run`` and ``eval``.

Every flag of these commands can also come from a YAML file
(``--config FILE``) or an environment variable, with this precedence::

    defaults  <  --config FILE  <  POLICYLINK_* environment  <  command-line flags

Keys are the flag names without their dashes, as written on the command
line (``policy.path``, ``max-batch``, ``port``) or with underscores
(``policy_path``, ``max_batch``); a nested mapping is read with dots
(``policy: {path: ...}`` is ``policy.path``). The environment variable of a
flag is ``POLICYLINK_`` and the flag's name in capitals with ``.`` and ``-``
as ``_``: ``POLICYLINK_POLICY_PATH``, ``POLICYLINK_MAX_BATCH``. Lists (a
repeatable flag) are YAML lists in a file and comma-separated in the
environment.

Values are checked by a pydantic model built from the command's own flags
(types and choices), so a file or variable cannot set what the command line
could not, and an unknown key or a bad value is refused with its name, its
value and where it came from. ``--print-config`` prints the effective
configuration as YAML (secrets masked) and exits.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

__all__ = ["add_config_flags", "apply_config", "CONFIGURABLE", "ENV_PREFIX", "ConfigError"]

#: Commands that read ``--config`` and ``POLICYLINK_*``.
CONFIGURABLE = ("serve", "run", "eval")
ENV_PREFIX = "POLICYLINK_"
#: Flags that are about reading the configuration itself, never configured.
_NOT_CONFIGURABLE = {"help", "config", "print_config"}
#: Values never printed by --print-config.
_SECRETS = {"api_key"}


class ConfigError(ValueError):
    """A configuration file or variable that cannot be used, with the key, the value and the source."""


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


_UNSET = _Unset()


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("configuration (docs/deploy.md)")
    group.add_argument("--config", metavar="FILE", default=None,
                       help="YAML file of flags (keys: flag names without dashes); POLICYLINK_* variables override it, flags override both")
    group.add_argument("--print-config", action="store_true", help="print the effective configuration as YAML and exit")


def apply_config(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: Sequence[str], environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Merge file, environment and flags into ``args`` (in place); returns each configured key's source.

    ``parser`` is the command's own parser and ``argv`` the arguments after
    the command name: they tell which flags were given explicitly.
    """
    environ = os.environ if environ is None else environ
    fields = _Fields(parser)
    explicit = _explicit_flags(parser, argv)
    sources: dict[str, str] = {}
    merged: dict[str, Any] = {}
    if args.config:
        for dest, value in _read_file(args.config, fields).items():
            merged[dest], sources[dest] = value, f"file {args.config}"
    for dest, value in _read_environment(environ, fields).items():
        merged[dest], sources[dest] = value, f"environment {fields.env_name(dest)}"
    for dest in explicit:
        merged.pop(dest, None)  # the command line wins: its value is already in args
        sources[dest] = "command line"
    for dest, value in fields.validate(merged, sources).items():
        setattr(args, dest, value)
    return sources


def effective_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """The configuration ``args`` now holds, as YAML keyed by flag names (secrets masked)."""
    yaml = _needs("yaml")

    fields = _Fields(parser)
    values = {}
    for dest in fields.dests:
        value = getattr(args, dest, None)
        if dest in _SECRETS and value:
            value = "***"
        values[fields.key(dest)] = str(value) if isinstance(value, Path) else value
    return yaml.safe_dump(values, sort_keys=False)


# -- which flags were given ----------------------------------------------------


def _explicit_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The flags ``argv`` sets: argparse fills in a default only for names the namespace lacks."""
    probe = argparse.Namespace()
    for action in parser._actions:
        if action.dest in _NOT_CONFIGURABLE or action.dest == argparse.SUPPRESS:
            continue
        # An 'append' flag copies what is there first; None reads as an empty list.
        setattr(probe, action.dest, None if isinstance(action, argparse._AppendAction) else _UNSET)
    parsed, _ = parser.parse_known_args(list(argv), probe)
    return {name for name, value in vars(parsed).items() if value is not _UNSET and value is not None}


# -- the flags as typed fields ---------------------------------------------------


class _Fields:
    """The command's flags: their types, their names in files and in the environment."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.actions: dict[str, argparse.Action] = {}
        self.names: dict[str, str] = {}
        for action in parser._actions:
            if action.dest in _NOT_CONFIGURABLE or not action.option_strings or action.dest == argparse.SUPPRESS:
                continue
            self.actions[action.dest] = action
            self.names[_normal(action.dest)] = action.dest
            if isinstance(action, argparse._StoreFalseAction):
                continue  # '--no-overlap' is 'overlap: false' in a file: only the positive name is a key
            for option in action.option_strings:
                self.names[_normal(option)] = action.dest
        self.dests = list(self.actions)

    def key(self, dest: str) -> str:
        """The name a file uses for ``dest``: its first long flag without dashes (a ``--no-X`` flag's positive name)."""
        if isinstance(self.actions[dest], argparse._StoreFalseAction):
            return dest.replace("_", "-")
        long = [option for option in self.actions[dest].option_strings if option.startswith("--")]
        return (long or self.actions[dest].option_strings)[0].lstrip("-")

    def env_name(self, dest: str) -> str:
        return ENV_PREFIX + _normal(self.key(dest)).upper()

    def dest_of(self, key: str) -> str | None:
        return self.names.get(_normal(key))

    def validate(self, values: dict[str, Any], sources: Mapping[str, str]) -> dict[str, Any]:
        if not values:
            return {}  # nothing from a file or the environment: the robot-side install needs no pydantic
        pydantic = _needs("pydantic")

        model = pydantic.create_model(
            "Configuration", __config__=pydantic.ConfigDict(extra="forbid", arbitrary_types_allowed=True),
            **{dest: (self._annotation(self.actions[dest]), None) for dest in values},
        )
        try:
            checked = model(**values)
        except pydantic.ValidationError as exc:
            problems = []
            for error in exc.errors():
                dest = str(error["loc"][0]) if error["loc"] else "?"
                shown = "***" if dest in _SECRETS else repr(values.get(dest))
                problems.append(f"'{self.key(dest) if dest in self.actions else dest}' = {shown} "
                                f"(from {sources.get(dest, '?')}): {error['msg']}")
            raise ConfigError("bad configuration: " + "; ".join(problems)) from None
        return {dest: self._converted(self.actions[dest], getattr(checked, dest)) for dest in values}

    @staticmethod
    def _annotation(action: argparse.Action) -> Any:
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return bool
        item: Any = action.type if action.type in (int, float, str) else str
        if action.choices:
            item = Literal[tuple(action.choices)]  # type: ignore[misc]
        if isinstance(action, argparse._AppendAction) or action.nargs in ("*", "+"):
            return list[item]  # type: ignore[valid-type]
        return item | None

    @staticmethod
    def _converted(action: argparse.Action, value: Any) -> Any:
        """Apply the flag's own converter (``Path``, a parser) as the command line would."""
        if value is None or action.type in (None, int, float, str) or not callable(action.type):
            return value
        if isinstance(value, list):
            return [action.type(item) for item in value]
        return action.type(value)


def _needs(module: str) -> Any:
    """``module``, or a clear error: the robot-side install has no pydantic or PyYAML until asked for."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"configuration files and POLICYLINK_* variables need the config extra: pip install 'policylink[config]' "
                          f"(missing {module})") from None


def _normal(name: str) -> str:
    return name.lstrip("-").replace(".", "_").replace("-", "_").lower()


# -- sources ---------------------------------------------------------------------


def _read_file(path: str, fields: _Fields) -> dict[str, Any]:
    yaml = _needs("yaml")

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of flag names to values, not a {type(data).__name__}")
    values: dict[str, Any] = {}
    unknown = []
    for key, value in _flattened(data):
        dest = fields.dest_of(key)
        if dest is None:
            unknown.append(key)
        else:
            values[dest] = value
    if unknown:
        raise ConfigError(f"config file {path}: unknown key(s) {', '.join(repr(key) for key in unknown)}; "
                          "keys are this command's flag names without dashes (see --help)")
    return values


def _flattened(data: Mapping[Any, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            items += _flattened(value, name + ".")
        else:
            items.append((name, value))
    return items


def _read_environment(environ: Mapping[str, str], fields: _Fields) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for dest, action in fields.actions.items():
        if dest == "api_key":
            continue  # POLICYLINK_API_KEY keeps its meaning: the key, read where it is needed, never echoed as a flag
        text = environ.get(fields.env_name(dest))
        if text is None:
            continue
        if isinstance(action, argparse._AppendAction) or action.nargs in ("*", "+"):
            values[dest] = [item.strip() for item in text.split(",") if item.strip()]
        else:
            values[dest] = text
    return values
