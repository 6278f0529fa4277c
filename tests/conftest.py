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


# -- passes and drafters (test_hints.py, test_prefix.py, test_distribution.py) -------------


class CountingModel:
    """A model wrapper that records how many tokens each pass scores, per sequence:
    ``fed`` one entry per sequence of every ``forward`` / ``forward_batch`` call,
    ``calls`` one list per call."""

    def __init__(self, model):
        self.model = model
        self.fed: list[int] = []
        self.calls: list[list[int]] = []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def forward(self, cache, tokens, *, num_logits=None):
        counts = None if num_logits is None else [num_logits]
        return self.forward_batch([cache], [tokens], num_logits=counts)[0]

    def forward_batch(self, caches, tokens, *, num_logits=None, parents=None):
        self.calls.append([len(t) for t in tokens])
        self.fed.extend(len(t) for t in tokens)
        return self.model.forward_batch(caches, tokens, num_logits=num_logits, parents=parents)


@pytest.fixture
def counting():
    """``counting(model)``: ``model`` wrapped so that its passes are recorded
    (:class:`CountingModel`; subclass ``counting`` itself to change a pass)."""
    return CountingModel


@pytest.fixture
def model_only_hybrid():
    """A :class:`~verispec.drafting.HybridDrafter` class whose route never takes the
    prompt lookup: its draft model drafts every pass, with the lookup's continuation as
    the hint."""
    from verispec.drafting import HybridDrafter

    class ModelOnlyHybrid(HybridDrafter):
        def route(self, request):
            if request.policy is None:
                return None, request.k
            return None, min(request.policy.choose(), request.k)

    return ModelOnlyHybrid
