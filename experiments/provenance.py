"""Where a result came from: the commit of the code and the machine, for the headers of the
experiments' tables and the records of their runs (shared by the scripts in experiments/)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def commit(paths: tuple[str, ...] = ()) -> str:
    """The short hash of HEAD, with ' (with uncommitted changes)' when tracked files (under
    `paths`, relative to the repository, when given) differ from it; 'unknown' outside git."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, cwd=REPO, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", *paths],
            capture_output=True, text=True, cwd=REPO, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" (with uncommitted changes)" if dirty else "")


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """'<CPU model>, <n> cores, <k> <backend> device(s)' (imports jax: call it after the
    script has set its XLA flags)."""
    import jax

    return (
        f"{cpu_model()}, {os.cpu_count()} cores, {jax.device_count()} "
        f"{jax.default_backend()} device(s)"
    )
