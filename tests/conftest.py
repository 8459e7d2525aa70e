"""Shared test fixtures: where the read-only shared material lives (../shared beside the repo)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MATHSFT_SHARED", REPO.parent / "shared"))
sys.path.insert(0, str(REPO))  # the modules are top-level scripts, not an installed package


@pytest.fixture(scope="session")
def shared() -> Path:
    if not SHARED.is_dir():
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):  # a green CI must not hide skipped tests
            pytest.fail(f"CI: the shared material is missing at {SHARED} (clone ../shared beside the repo or set "
                        f"MATHSFT_SHARED); the tests that need it would be skipped")
        pytest.skip(f"shared material not found at {SHARED} (set MATHSFT_SHARED)")
    return SHARED
