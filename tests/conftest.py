"""Fixtures shared by the test modules."""

import pytest

import mtht


@pytest.fixture
def restore_num_threads():
    """Gives the test the thread count to change: it is set back afterwards."""
    before = mtht.get_num_threads()
    yield
    mtht.set_num_threads(before)
