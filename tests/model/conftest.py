"""Tiny models run fastest on one thread (and do not fight the other test processes for cores)."""

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # the shared fixture of tests/conftest.py, for every model test
    yield
