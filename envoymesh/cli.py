"""Command-line flags that mirror pydantic-settings fields.

Each setting is read from its environment variable; a flag given on the command line wins.
The flags are generated from the settings model so ``--help`` and the environment can never
disagree.
"""

from __future__ import annotations

import argparse
import ipaddress
from collections.abc import Sequence
from typing import Annotated, Any, TypeVar, get_origin

from pydantic import AfterValidator, BeforeValidator, ValidationError
from pydantic_settings import BaseSettings, NoDecode

S = TypeVar("S", bound=BaseSettings)


def _split_commas(value: object) -> object:
    """``"a, b"`` (the environment) or ``["a,b", "c"]`` (repeated flags) -> ``["a", "b", "c"]``."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list):
        return [part.strip() for item in value for part in str(item).split(",") if part.strip()]
    return value


def _check_networks(value: list[str]) -> list[str]:
    for entry in value:
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise ValueError(f"{entry!r} is not an IP address or CIDR block") from None
    return value


# A list setting given as comma-separated text in the environment or as repeated flags.
CommaList = Annotated[list[str], NoDecode, BeforeValidator(_split_commas)]
# Such a list of IP addresses or CIDR blocks (trusted proxies).
NetworkList = Annotated[CommaList, AfterValidator(_check_networks)]


def _env_name(model: type[BaseSettings], field: str) -> str:
    prefix = str(model.model_config.get("env_prefix", ""))
    alias = model.model_fields[field].validation_alias
    if isinstance(alias, str):
        return alias
    return (prefix + field).upper()


def build_parser(model: type[BaseSettings], prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one ``--flag`` per settings field, documented with its env var."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
    )
    for name, field in model.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = _env_name(model, name)
        value = field.get_default(call_default_factory=True)
        shown = ",".join(map(str, value)) if isinstance(value, list) else value
        default = "" if shown in (None, "") else f", default {shown}"
        help_text = f"{field.description or ''} [env {env}{default}]"
        annotation = field.annotation
        is_list = get_origin(annotation) is list
        if annotation is bool:
            parser.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        elif is_list:
            parser.add_argument(
                flag,
                dest=name,
                action="append",
                default=None,
                metavar=name.upper(),
                help=help_text + " (repeatable)",
            )
        else:
            parser.add_argument(flag, dest=name, default=None, metavar=name.upper(), help=help_text)
    return parser


def _problem(location: tuple[int | str, ...], message: str) -> str:
    """One settings error as the command line names it: the flag, when it is about one."""
    message = message.removeprefix("Value error, ")
    if not location:  # a rule across several settings; its message names the flags
        return message
    return f"--{'-'.join(str(p) for p in location).replace('_', '-')}: {message}"


def parse(model: type[S], prog: str, description: str, argv: Sequence[str] | None = None) -> S:
    """Settings from the environment, overridden by the flags given in ``argv``."""
    parser = build_parser(model, prog, description)
    args = parser.parse_args(argv)
    given: dict[str, Any] = {k: v for k, v in vars(args).items() if v is not None}
    try:
        return model(**given)
    except ValidationError as exc:
        problems = "; ".join(_problem(e["loc"], e["msg"]) for e in exc.errors())
        parser.error(problems)
