"""The distribution as a user installs it: a wheel built from this checkout, installed into a
fresh virtualenv with the locked runtime dependencies, run from a directory that holds
nothing of the repository. It migrates (SQLite and Postgres), serves, and answers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.conftest import POSTGRES_ADMIN_URL
from tests.support.processes import free_port, start, stop, wait_for_health

REPO = Path(__file__).resolve().parents[2]


def find_uv() -> str:
    """uv as the Makefile installs it (.tools/), or from UV / the PATH."""
    for candidate in (
        os.environ.get("UV"),
        str(REPO / ".tools" / "bin" / "uv"),
        shutil.which("uv"),
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail("uv is not installed: run `make test` (it installs uv into .tools/)")


def run(command: list[str], *, cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin/ folder of a virtualenv holding the wheel and the locked runtime packages."""
    uv = find_uv()
    work = tmp_path_factory.mktemp("wheel")
    run([uv, "build", "--wheel", "--out-dir", str(work / "dist"), str(REPO)], cwd=REPO)
    [wheel] = (work / "dist").glob("agentserve-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert any(name.startswith("app/migrations/versions/") for name in names), names
    assert "app/agents.yaml" in names

    requirements = work / "requirements.txt"
    exported = run(
        [uv, "export", "--frozen", "--no-dev", "--no-emit-project", "--no-hashes"], cwd=REPO
    )
    requirements.write_text(exported, encoding="utf-8")
    venv = work / "venv"
    run([uv, "venv", "--python", sys.executable, str(venv)], cwd=work)
    python = str(venv / "bin" / "python")
    run([uv, "pip", "install", "--python", python, "-r", str(requirements)], cwd=work)
    run([uv, "pip", "install", "--python", python, "--no-deps", str(wheel)], cwd=work)
    return venv / "bin"


@pytest.fixture
def elsewhere(tmp_path: Path) -> Path:
    """A working directory with nothing of the repository in it."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    return folder


def clean_env(database_url: str) -> dict[str, str]:
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "SSL_CERT_FILE")
    env = {name: os.environ[name] for name in keep if name in os.environ}
    env.update(DATABASE_URL=database_url, LOG_LEVEL="WARNING", LOG_JSON="false")
    return env


def serve_and_ask(command: list[str], env: dict[str, str], cwd: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start([*command, "--port", str(port)], env, cwd=cwd)
    try:
        wait_for_health(url, process, timeout=60)
        ready = httpx.get(f"{url}/ready", timeout=10)
        assert ready.status_code == 200, ready.text
        answer = httpx.post(f"{url}/query", json={"message": "hello, wheel"}, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()["answer"].startswith("[simulator]")
    finally:
        stop(process)


def test_the_installed_command_knows_its_version(installed: Path, elsewhere: Path) -> None:
    out = run([str(installed / "agentserve"), "--version"], cwd=elsewhere)
    assert out.startswith("agentserve ")
    assert "agentserve" not in {p.name for p in elsewhere.iterdir()}


def test_migrate_and_serve_on_sqlite_from_any_directory(installed: Path, elsewhere: Path) -> None:
    env = clean_env(f"sqlite+aiosqlite:///{elsewhere / 'data' / 'agentserve.db'}")
    env["DB_AUTO_MIGRATE"] = "false"  # the explicit migrate below must be what creates it
    run([str(installed / "agentserve"), "migrate"], cwd=elsewhere, env=env)
    assert (elsewhere / "data" / "agentserve.db").is_file()
    serve_and_ask([str(installed / "agentserve"), "serve"], env, elsewhere)


def test_uvicorn_serves_the_module_level_app(installed: Path, elsewhere: Path) -> None:
    """`uvicorn app.main:app`, as FastAPI users start an app; SQLite migrates itself."""
    env = clean_env(f"sqlite+aiosqlite:///{elsewhere / 'uvicorn.db'}")
    serve_and_ask([str(installed / "uvicorn"), "app.main:app"], env, elsewhere)


async def test_migrate_and_serve_on_postgres_from_any_directory(
    installed: Path, elsewhere: Path
) -> None:
    name = f"agentserve_wheel_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    try:
        admin = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.fail(f"Postgres is not reachable at {POSTGRES_ADMIN_URL} ({exc!r})")
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0]
        env = clean_env(f"{base}/{name}")  # a plain postgresql:// URL, as operators paste it
        run([str(installed / "agentserve"), "migrate"], cwd=elsewhere, env=env)
        check = await asyncpg.connect(f"{base}/{name}", timeout=5)
        try:
            revision = await check.fetchval("SELECT version_num FROM alembic_version")
        finally:
            await check.close()
        assert revision
        serve_and_ask([str(installed / "agentserve"), "serve"], env, elsewhere)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
