"""Fixtures of the serve tests (helpers.py builds the bundle and the servers)."""
from __future__ import annotations

import pytest

from .helpers import build_tiny_bundle


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
  """A tiny random tokenizer + generator bundle (four scales, 32 px, 10 classes)."""
  return build_tiny_bundle(str(tmp_path_factory.mktemp("serve") / "bundle"))
