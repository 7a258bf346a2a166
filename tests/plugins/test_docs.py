"""The plugin docs stay true: a page per built-in plugin naming every option, and examples that load."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tollway.plugins.registry import BUILTIN, resolve

DOCS = Path(__file__).resolve().parents[2] / "docs" / "plugins"


def yaml_blocks(text: str) -> list[Any]:
    return [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", text, re.S)]


def walk(node: Any):
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item)


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_every_option_is_documented(name):
    page = (DOCS / f"{name}.md").read_text()
    cls = resolve(name)
    models = [cls.config_model] + ([cls.consumer_credential] if cls.consumer_credential else [])
    for model in models:
        for field in model.model_fields:
            assert f"`{field}`" in page, f"{name}.md does not document {model.__name__}.{field}"
    assert f"({name}.md)" in (DOCS / "README.md").read_text()


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")))
def test_yaml_examples_validate(page):
    for block in yaml_blocks((DOCS / page).read_text()):
        for node in walk(block):
            if isinstance(node, dict) and node.get("name") in BUILTIN and "service" not in node:
                cls = resolve(node["name"])
                cls.config_model.model_validate(node.get("config") or {})
            if isinstance(node, dict) and isinstance(node.get("credentials"), dict):
                for plugin, items in node["credentials"].items():
                    model = resolve(plugin).consumer_credential
                    assert model is not None
                    for item in items:
                        model.model_validate(item)
