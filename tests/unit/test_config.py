"""Settings that would send requests somewhere else than the operator meant are refused."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.config import Settings, UpstreamConfig


@pytest.mark.parametrize("url", ["http://llm:8000/v1?api-version=2024-06-01", "http://llm/v1#x"])
def test_an_upstream_base_url_with_a_query_or_fragment_is_refused(url: str) -> None:
    with pytest.raises(ValidationError, match="base URL takes no query string or fragment"):
        UpstreamConfig(name="u", base_url=url)
    with pytest.raises(ValidationError, match="base URL takes no query string or fragment"):
        Settings(_env_file=None, llm_base_url=url)


def test_a_base_url_with_a_path_is_kept() -> None:
    settings = Settings(_env_file=None, llm_base_url="http://llm:8000/v1")
    [upstream] = settings.upstreams
    assert str(upstream.base_url) == "http://llm:8000/v1"
