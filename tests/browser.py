"""Headless Chromium (Debian package 'chromium') for the report tests; they skip when it is absent."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TIMEOUT_S = 120


def flags(profile: Path) -> list[str]:
    """A fresh, quiet, sandbox-free headless browser (we run as root in CI)."""
    return [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
    ]


def dump_dom(url: str, profile: Path) -> str:
    """The page's DOM after its scripts ran."""
    return subprocess.run(
        [*flags(profile), "--dump-dom", url], capture_output=True, text=True, timeout=TIMEOUT_S
    ).stdout


def screenshot(url: str, profile: Path, out: Path, size: str = "1200,900") -> Path:
    subprocess.run(
        [*flags(profile), f"--window-size={size}", f"--screenshot={out}", url],
        capture_output=True,
        timeout=TIMEOUT_S,
    )
    return out
