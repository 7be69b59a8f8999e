"""The README's configuration table, generated from the pydantic models of cluster/config.py:
a key's type, default and meaning live there only (its Field), so the table cannot drift.

    python -m cluster.config_doc                     # print the table
    python -m cluster.config_doc --write README.md   # replace it between the markers
    python -m cluster.config_doc --check README.md   # exit 1 when the README's is stale
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path

import yaml
from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel

from cluster.autoscaling import ScalingPolicy
from cluster.config import DEFAULT_MODEL_DIR, AppConfig

# sections with a table of their own in the README (a row here, no expansion)
OWN_TABLE = (ScalingPolicy,)
START, END = "<!-- config-table:start -->", "<!-- config-table:end -->"
BOUNDS = ((Ge, "ge", "≥"), (Gt, "gt", ">"), (Le, "le", "≤"), (Lt, "lt", "<"))


def type_name(annotation) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "object"
    return annotation.__name__


def bounds(field) -> str:
    return "".join(f", {sign} {getattr(m, attr)}" for m in field.metadata
                   for kind, attr, sign in BOUNDS if isinstance(m, kind))


def default_text(value) -> str:
    if isinstance(value, BaseModel):
        value = value.model_dump()
    if isinstance(value, str):  # the home folder of whoever runs this is not a fact
        value = value.replace(str(DEFAULT_MODEL_DIR.parents[1]), "$TANDEM_HOME")
    text = yaml.safe_dump(value, default_flow_style=True, width=1000)
    return f"`{text.removesuffix(chr(10)).removesuffix('...').strip()}`"


def section_of(annotation) -> tuple[type[BaseModel] | None, str]:
    """The config model a field holds, and how: `section`, `section | null` (a pool that
    may be left out) or `list of sections`; (None, "") for a plain value."""
    def model_in(a) -> type[BaseModel] | None:
        plain = isinstance(a, type) and issubclass(a, BaseModel) and a not in OWN_TABLE
        return a if plain else None

    if model_in(annotation):
        return annotation, "section"
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is list and args and model_in(args[0]):
        return args[0], "list of sections"
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        models = [a for a in args if model_in(a)]
        if len(models) == 1 and type(None) in args:
            return models[0], "section | null"
    return None, ""


def rows(model: BaseModel, prefix: str = "", shown: frozenset = frozenset()
         ) -> Iterator[tuple[str, str, str, str]]:
    """(key, type, default, meaning) of every field, sections first, from a default instance
    (so that each pool shows its own defaults). A list's items are described from a default
    item; in them, sections of a kind already expanded above get their row only."""
    for name, field in type(model).model_fields.items():
        key, value = prefix + name, getattr(model, name)
        if not field.description:
            raise ValueError(f"{key}: a config field without a description (cluster/config.py)")
        section, kind = section_of(field.annotation)
        if section is None:
            yield (f"`{key}`", type_name(field.annotation) + bounds(field), default_text(value),
                   field.description)
            continue
        yield f"`{key}`", kind, "`null`" if value is None else "", field.description
        if kind == "list of sections":
            above = {section_of(f.annotation)[0] for f in type(model).model_fields.values()}
            yield from rows(section(), f"{key}[].", frozenset(above))
        elif section not in shown:
            yield from rows(value if value is not None else section(), f"{key}.", shown)


def table(model: BaseModel | None = None) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows(model or AppConfig())]
    return "\n".join(lines)


def replace(text: str, new_table: str) -> str:
    """`text` with what stands between the markers replaced by `new_table`."""
    head, start, rest = text.partition(START)
    _, end, tail = rest.partition(END)
    if not start or not end:
        raise ValueError(f"the markers {START} and {END} are missing")
    return f"{head}{START}\n{new_table}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", metavar="MARKDOWN", help="replace the table in this file")
    ap.add_argument("--check", metavar="MARKDOWN", help="exit 1 when its table differs")
    args = ap.parse_args(argv)
    path = args.write or args.check
    if not path:
        print(table())
        return 0
    text = Path(path).read_text()
    fresh = replace(text, table())
    if args.write:
        Path(path).write_text(fresh)
        return 0
    if fresh != text:
        print(f"{path}: the configuration table is stale; run "
              f"`python -m cluster.config_doc --write {path}`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
