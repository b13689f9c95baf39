import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # a hub id must fail fast, here and in the scripts we start
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny SD v1.x pipeline folder (text width 32), as a user's local model would be."""
    return tiny.save_pipeline(tmp_path_factory.mktemp("tiny32"), width=32)


@pytest.fixture(scope="session")
def tiny_model_768(tmp_path_factory):
    """The same, with SD v1.x's text width of 768, for the authors' released direction."""
    return tiny.save_pipeline(tmp_path_factory.mktemp("tiny768"), width=768)


@pytest.fixture(scope="session")
def pipe(tiny_model):
    import saferegion
    return saferegion.load_pipeline(tiny_model)
