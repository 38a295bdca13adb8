"""Shared torch test fixtures.

Import :func:`one_torch_thread` into a folder's ``conftest.py`` to make it autouse there:
tiny models train about four times faster single-threaded on the 2-core CI machine, and
tests that run side by side do not fight over the cores.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Run the test with one intra-op torch thread; restore the previous count after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
