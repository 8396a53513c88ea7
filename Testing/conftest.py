"""Shared pytest fixtures: the real CT data in ../shared/data (never copied into the repository)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("ONCOPILOT_DATA", REPO.parent / "shared" / "data"))


def _require_data() -> Path:
    if not (DATA / "manifest.csv").exists():
        pytest.skip(f"real CT data not found at {DATA} (set ONCOPILOT_DATA); CI always has it")
    return DATA


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return _require_data()


@pytest.fixture(scope="session")
def manifest(data_dir) -> dict[str, dict[str, str]]:
    """Rows of ../shared/data/manifest.csv keyed by lesion id."""
    with open(data_dir / "manifest.csv", newline="") as handle:
        return {row["id"]: row for row in csv.DictReader(handle)}
