import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


# -- the server's tests (test_server*.py, test_playground.py) -------------------------------

import pytest


@pytest.fixture(scope="module")
def chat_target():
    """The tiny chat-capable target the server tests share (one per test module)."""
    from server_support import tiny_target

    return tiny_target()


@pytest.fixture(scope="module")
def chat_server(chat_target):
    """A running server on ``chat_target`` with every drafter (server_support.tiny_server)."""
    from server_support import tiny_server

    with tiny_server(chat_target) as running:
        yield running
