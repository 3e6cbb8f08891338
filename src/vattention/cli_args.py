"""Build argparse options from the config dataclasses: one flag per field, its help text the
field's comment in the source, so the CLI and the configs cannot drift apart."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import types
import typing

_COMMENT = re.compile(r"^\s+(\w+)\s*:[^#]*#\s*(.+)$")


def field_comments(cls: type) -> dict[str, str]:
    """{field name: its trailing comment} read from the class source."""
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        m = _COMMENT.match(line)
        if m:
            comments[m.group(1)] = m.group(2).strip()
    return comments


def _scalar_type(annotation) -> type:
    hints = annotation if not isinstance(annotation, str) else eval(annotation, vars(typing))  # noqa: S307
    if isinstance(hints, types.UnionType) or typing.get_origin(hints) is typing.Union:
        return next(a for a in typing.get_args(hints) if a is not type(None))  # X | None -> X
    return hints


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = (),
                       only_given: bool = False) -> None:
    """only_given: flags left out stay out of the namespace (their help still shows the default),
    so that defaults from elsewhere (a model's sampling defaults) can fill them."""
    group = parser.add_argument_group(cls.__name__, (cls.__doc__ or "").strip().splitlines()[0]
                                      if cls.__doc__ else None)
    comments = field_comments(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = _scalar_type(f.type)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{comments.get(f.name, '')} (default: {default})".replace("%", "%%")
        if only_given:
            default = argparse.SUPPRESS
        if typing.get_origin(kind) is list:
            group.add_argument(flag, type=typing.get_args(kind)[0], nargs="*", default=default,
                               help=help_text, dest=f.name)
        elif typing.get_origin(kind) is dict:  # KEY=VALUE entries, e.g. --logit-bias 15=-100 42=5
            key_type, value_type = typing.get_args(kind)
            group.add_argument(flag, type=_key_value(key_type, value_type), nargs="*", default=default,
                               action=_StoreDict, help=f"{help_text}; entries KEY=VALUE", dest=f.name)
        elif kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                               help=help_text)
        else:
            group.add_argument(flag, type=kind, default=default, help=help_text, dest=f.name)


def dataclass_values(ns: argparse.Namespace, cls: type, skip: tuple[str, ...] = ()) -> dict:
    return {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)
            if f.name not in skip and hasattr(ns, f.name)}


class _StoreDict(argparse.Action):
    """Parsed KEY=VALUE entries stored as the dict the field holds."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, dict(values))


def _key_value(key_type: type, value_type: type):
    def parse(text: str) -> tuple:
        key, sep, value = text.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
        try:
            return key_type(key), value_type(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {key_type.__name__}={value_type.__name__}, got {text!r}") from None
    return parse
