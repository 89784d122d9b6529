"""Debian packages that tests need, installed on demand with apt-get.

The pattern of tests/stack/nginx.py's `install_nginx`, for any package: find the executable;
when it is missing run `apt-get install -y --no-install-recommends <package>`, and only if
that fails `apt-get update` and the install again. When nothing works the error says what to
install by hand, so that a test using it fails loudly (it is never skipped).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

__all__ = ["DebianPackageUnavailableError", "ensure_debian_package", "find_executable"]

APT_TIMEOUT = 900.0
"""Seconds one apt-get command may take (chromium pulls in about 100 MB of libraries)."""


class DebianPackageUnavailableError(RuntimeError):
    """The executable is missing and its Debian package could not be installed."""


def find_executable(executable: str) -> str | None:
    """`executable` as an absolute path when it is one and executable, else looked up in PATH."""
    if os.sep in executable:
        return executable if os.access(executable, os.X_OK) and Path(executable).is_file() else None
    return shutil.which(executable)


def install_hint(package: str) -> str:
    return f"install it with: apt-get install -y --no-install-recommends {package}"


def ensure_debian_package(executable: str, package: str, say: Callable[[str], None] = print) -> str:
    """The path of `executable` (a path such as /usr/bin/chromium, or a name looked up in
    PATH), installing Debian's `package` when it is missing: the plain install first, then
    `apt-get update` and the install again only if that failed. Raises
    DebianPackageUnavailableError saying what to install when it still is missing."""
    found = find_executable(executable)
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt is None:
        raise DebianPackageUnavailableError(
            f"{executable} is not installed and apt-get is missing; {install_hint(package)}"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [apt, "install", "-y", "--no-install-recommends", package]
    failures: list[str] = []
    for commands in ([install], [[apt, "update"], install]):
        for command in commands:
            say(f"{executable} not found; running: {' '.join(command)}")
            try:
                result = subprocess.run(
                    command, env=env, stdin=subprocess.DEVNULL, timeout=APT_TIMEOUT, check=False
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                failures.append(f"{' '.join(command)}: {exc!r}")
                break
            if result.returncode != 0:
                failures.append(f"{' '.join(command)}: exit status {result.returncode}")
                break
        else:
            found = find_executable(executable)
            if found:
                say(f"installed {found} (Debian package {package})")
                return found
            failures.append(f"the package {package} installed no {executable}")
    raise DebianPackageUnavailableError(
        f"{executable} is not installed and installing Debian's {package} failed ("
        + "; ".join(failures)
        + f"); {install_hint(package)}"
    )
