"""A server's settings declared once, as a config dataclass: its flags, checks and docs derive.

Each field is declared with `setting(...)`, which carries its help text, its bounds or choices
and whether it is a command-line flag (`--field-name`). From those, `parse` builds the CLI's
flags and the config in one call, `check` (run by each config's `__post_init__`, so by every
way a config is built) refuses a value out of bounds with a message naming the flag and its
limit, and `markdown_table` writes the table of docs/configuration.md.
"""

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from llmserve.common.logs import LogFormat

# Counts that GetInfo reports are int32 on the wire.
INT32_MAX = 2**31 - 1
PORT_MAX = 65535
LOG_FORMATS = typing.get_args(LogFormat)
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

Config = TypeVar("Config")


@dataclass(frozen=True)
class Setting:
    """What a config field's metadata says about it (see `setting`)."""

    help: str
    low: float | None = None
    high: float | None = None
    # The low bound itself is refused (a fraction in (0, 1], say).
    exclusive_low: bool = False
    choices: tuple[Any, ...] | None = None
    # False: set only in code (by the offline API or a benchmark), not on the command line.
    flag: bool = True
    aliases: tuple[str, ...] = ()
    group: str | None = None


def setting(
    default: Any,
    help: str,
    *,
    low: float | None = None,
    high: float | None = None,
    exclusive_low: bool = False,
    choices: Sequence[Any] | None = None,
    flag: bool = True,
    aliases: tuple[str, ...] = (),
    group: str | None = None,
) -> Any:
    """A config field with its default and what its flag, check and docs need."""
    meta = Setting(help, low, high, exclusive_low, None if choices is None else tuple(choices),
                   flag, aliases, group)
    return dataclasses.field(default=default, metadata={"setting": meta})


def _setting(field: dataclasses.Field) -> Setting:
    return field.metadata["setting"]


def flag_name(field: dataclasses.Field) -> str:
    return "--" + field.name.replace("_", "-")


def _label(field: dataclasses.Field) -> str:
    """How messages name a field: by its flag when it has one."""
    return flag_name(field) if _setting(field).flag else field.name


def _value_type(field: dataclasses.Field) -> tuple[type, bool]:
    """The field's type without `| None`, and whether None is allowed."""
    args = typing.get_args(field.type)
    if isinstance(field.type, types.UnionType) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return inner, True
    return field.type, False


def bounds_text(field: dataclasses.Field) -> str:
    """The field's limit, as messages and docs state it ('' when it has none)."""
    s = _setting(field)
    if s.choices is not None:
        return "one of " + ", ".join(str(c) for c in s.choices)
    if s.low is None and s.high is None:
        return ""
    low = "-inf" if s.low is None else _number(s.low)
    high = "inf" if s.high is None else _number(s.high)
    return f"{'(' if s.exclusive_low else '['}{low}, {high}]"


def _number(bound: float) -> str:
    return str(bound) if isinstance(bound, int) else f"{bound:g}"


def check(config: object) -> None:
    """Raises ValueError naming the first field whose value is out of its bounds or choices."""
    for field in dataclasses.fields(config):
        s = _setting(field)
        value = getattr(config, field.name)
        if value is None and _value_type(field)[1]:
            continue
        if s.choices is not None:
            ok = value in s.choices
        else:
            # Written so that NaN fails every bound.
            ok = ((s.low is None or (value > s.low if s.exclusive_low else value >= s.low))
                  and (s.high is None or value <= s.high))
        if not ok:
            limit = bounds_text(field)
            limit = limit if s.choices is not None else f"in {limit}"
            raise ValueError(f"{_label(field)} must be {limit}, not {value!r}")


def _default_text(field: dataclasses.Field) -> str:
    if isinstance(field.default, bool):
        return "on" if field.default else "off"
    return "" if field.default is None else str(field.default)


def build_parser(cls: type, prog: str, description: str | None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per flag field of `cls` (bools: --x / --no-x)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for field in dataclasses.fields(cls):
        s = _setting(field)
        if not s.flag:
            continue
        target: argparse._ActionsContainer = parser
        if s.group is not None:
            if s.group not in groups:
                groups[s.group] = parser.add_argument_group(s.group)
            target = groups[s.group]
        default = _default_text(field)
        help_text = f"{s.help} (default: {default})" if default else s.help
        kind, _ = _value_type(field)
        options: dict[str, Any] = {"dest": field.name, "default": field.default, "help": help_text}
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        else:
            options["type"] = kind
            if s.choices is not None:
                options["choices"] = s.choices
        target.add_argument(flag_name(field), *s.aliases, **options)
    return parser


def parse(cls: type[Config], argv: Sequence[str] | None, prog: str,
          description: str | None = None) -> Config:
    """The config the command line asks for; a value out of bounds exits 2 naming its flag."""
    parser = build_parser(cls, prog, description)
    namespace = parser.parse_args(argv)
    values = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)
              if _setting(f).flag}
    try:
        return cls(**values)
    except ValueError as exc:
        parser.error(str(exc))


def from_json_fields(cls: type[Config], values: dict[str, Any]) -> Config:
    """The config from `dataclasses.asdict` values after a JSON round trip (paths as strings)."""
    typed = {}
    for field in dataclasses.fields(cls):
        value = values[field.name]
        typed[field.name] = Path(value) if _value_type(field)[0] is Path and value else value
    return cls(**typed)


def _rows(cls: type) -> Iterator[tuple[str, str, str, str]]:
    for field in dataclasses.fields(cls):
        s = _setting(field)
        name = " / ".join(f"`{n}`" for n in (flag_name(field), *s.aliases))
        if _value_type(field)[0] is bool:
            name = f"`{flag_name(field)}` / `--no-{flag_name(field)[2:]}`"
        if not s.flag:
            name = f"(no flag: `{field.name}`)"
        default = _default_text(field)
        yield name, f"`{default}`" if default else "", bounds_text(field), s.help


def markdown_table(cls: type) -> str:
    """The settings of `cls` as a Markdown table: flag, default, bounds or choices, help."""
    lines = ["| flag | default | bounds / choices | meaning |", "|---|---|---|---|"]
    for row in _rows(cls):
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    return "\n".join(lines) + "\n"


# Settings every server has, declared once.


def host_setting(group: str | None = None) -> Any:
    return setting("127.0.0.1", "address the gRPC and HTTP ports listen on", group=group)


def log_format_setting(group: str | None = None) -> Any:
    return setting("auto", "log lines as JSON or for a terminal (auto: console on a terminal, "
                           "else JSON)", choices=LOG_FORMATS, group=group)


def log_level_setting(group: str | None = None) -> Any:
    return setting("info", "the least severe level logged", choices=LOG_LEVELS, group=group)
