"""docs/configuration.md's table and .env.example list every setting, and only those."""

from __future__ import annotations

import re
from pathlib import Path

from app.config import Settings

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = {name.upper() for name in Settings.model_fields}


def test_configuration_table_lists_every_setting() -> None:
    table = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `([A-Z0-9_]+)` \|", table, flags=re.MULTILINE))
    assert documented == SETTINGS


def test_env_example_lists_every_setting() -> None:
    text = (ROOT / ".env.example").read_text(encoding="utf-8")
    listed = set(re.findall(r"^#? ?([A-Z][A-Z0-9_]+)=", text, flags=re.MULTILINE))
    assert listed == SETTINGS


def test_env_example_values_parse() -> None:
    settings = Settings(_env_file=ROOT / ".env.example")
    assert settings.database_url.startswith("sqlite+aiosqlite://")
    assert [u.kind for u in settings.upstreams] == ["simulator"]
