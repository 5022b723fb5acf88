"""Shared test fixtures.

``one_thread``: run a module's tests with one intra-op thread. Tiny models and
small matrices gain nothing from threads, and on a shared 2-core machine
oversubscribed threads make them many times slower. Use it per module with
``pytestmark = pytest.mark.usefixtures("one_thread")``.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
