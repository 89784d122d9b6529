"""Agent specifications, declared in a YAML file (AGENTS_FILE)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import orjson
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class AgentSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")
    description: str = ""
    instructions: str
    model: str | None = Field(None, description="Model id; LLM_MODEL when omitted.")
    fallback_models: tuple[str, ...] = ()
    temperature: float = Field(0.2, ge=0, le=2)
    max_tokens: int | None = Field(1024, ge=1)
    tools: tuple[str, ...] = ()
    max_steps: int = Field(4, ge=1, le=32)
    pool_size: int = Field(8, ge=1, le=4096)
    cache_ttl: int | None = Field(None, ge=1, description="Seconds; CACHE_TTL_SECONDS if unset.")
    cache_shared: bool = Field(
        False,
        description="Share cached answers across JWT subjects (only for agents whose "
        "answers reveal nothing about the asker).",
    )

    def fingerprint(self, default_model: str, *, upstreams: Sequence[str] = ()) -> str:
        """Digest of everything that shapes an answer (cache keys use it): the spec and the
        upstream chain that answers it."""
        shaping = {
            "upstreams": list(upstreams),
            "instructions": self.instructions,
            "model": self.model or default_model,
            "fallback_models": self.fallback_models,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "tools": sorted(self.tools),
            "max_steps": self.max_steps,
        }
        return hashlib.sha256(orjson.dumps(shaping, option=orjson.OPT_SORT_KEYS)).hexdigest()


class AgentsFileError(ValueError):
    """The agents file is missing, unreadable or invalid; the message says where."""


class AgentsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    agents: list[AgentSpec] = Field(min_length=1)


def load_agent_specs(path: Path) -> dict[str, AgentSpec]:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        specs = AgentsFile.model_validate(raw).agents
    except OSError as exc:
        raise AgentsFileError(f"cannot read agents file {path}: {exc}") from exc
    except (yaml.YAMLError, ValidationError) as exc:
        raise AgentsFileError(f"invalid agents file {path}: {exc}") from exc
    by_name: dict[str, AgentSpec] = {}
    for spec in specs:
        if spec.name in by_name:
            raise AgentsFileError(f"agent {spec.name!r} is declared twice in {path}")
        by_name[spec.name] = spec
    return by_name
