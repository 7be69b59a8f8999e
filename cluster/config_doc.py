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

from cluster.config import DEFAULT_MODEL_DIR, AppConfig

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


def rows(model: BaseModel, prefix: str = "") -> Iterator[tuple[str, str, str, str]]:
    """(key, type, default, meaning) of every field, sections first, from a default instance
    (so that each pool shows its own defaults)."""
    for name, field in type(model).model_fields.items():
        key, value = prefix + name, getattr(model, name)
        if not field.description:
            raise ValueError(f"{key}: a config field without a description (cluster/config.py)")
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield f"`{key}`", "section", "", field.description
            yield from rows(value, f"{key}.")
        else:
            yield (f"`{key}`", type_name(field.annotation) + bounds(field), default_text(value),
                   field.description)


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
