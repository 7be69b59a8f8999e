"""README's configuration table is the one generated from cluster/config.py, and the text
says what `make serve` really runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, Field

from cluster import config_doc
from cluster.config import AppConfig

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"


def test_readme_table_is_the_generated_one():
    assert config_doc.main(["--check", str(README)]) == 0, \
        "run `python -m cluster.config_doc --write README.md`"


def test_every_key_of_the_config_is_in_the_table():
    def keys(model: type[BaseModel], prefix: str = "") -> list[str]:
        out = []
        for name, field in model.model_fields.items():
            nested = isinstance(field.annotation, type) and issubclass(field.annotation,
                                                                       BaseModel)
            out += keys(field.annotation, f"{prefix}{name}.") if nested else [prefix + name]
        return out

    table = config_doc.table()
    for key in keys(AppConfig):
        assert f"| `{key}` |" in table


def test_a_field_without_description_is_refused():
    class Bare(BaseModel):
        documented: int = Field(1, description="has one")
        bare: int = 2

    with pytest.raises(ValueError, match="bare"):
        config_doc.table(Bare())


def test_write_then_check(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(f"intro\n{config_doc.START}\n| stale |\n{config_doc.END}\nafter\n")
    assert config_doc.main(["--check", str(doc)]) == 1
    assert config_doc.main(["--write", str(doc)]) == 0
    assert config_doc.main(["--check", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith("after\n") and "| stale |" not in text


def test_readme_names_the_router_that_make_serve_runs():
    local = yaml.safe_load((ROOT / "deployments" / "local.yaml").read_text())
    policy = local["applications"][0]["args"]["router"]["policy"]
    assert f"`make serve` runs `{policy}`" in README.read_text()
