"""Shared fixtures: a tiny word-level tokenizer and tiny Llama/OPT models built from configs.

Nothing here touches the network; every model is random-init and small enough to train in seconds.
"""
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from tests.tiny import build_tiny_model_dir, build_tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    return build_tiny_tokenizer(str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny Llama-style causal LM (with a chat template) in HF format."""
    return build_tiny_model_dir(str(tmp_path_factory.mktemp("tiny_llama")), arch="llama")


@pytest.fixture(scope="session")
def tiny_opt_dir(tmp_path_factory):
    """A saved tiny OPT-style causal LM (no chat template) in HF format."""
    return build_tiny_model_dir(str(tmp_path_factory.mktemp("tiny_opt")), arch="opt")


@pytest.fixture(scope="session")
def shared_data():
    if not os.path.isdir(SHARED_DATA):
        pytest.skip("../shared/data is not beside this checkout")
    return SHARED_DATA
