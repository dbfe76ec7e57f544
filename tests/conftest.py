"""Shared fixtures: one embedded tiny checkpoint per test session, in a temp cache."""
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
