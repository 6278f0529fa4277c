"""Tiny models for tests: no downloads, milliseconds per forward."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from verispec.models import HFModel, forward_each


@dataclass
class TableCache:
    tokens: list[int] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.tokens)

    def crop(self, length: int) -> None:
        del self.tokens[length:]


class TableModel:
    """A second-order Markov "language model": logits = table[previous, current].

    Cheap enough to run tens of thousands of generations in a statistical test,
    and its exact sequence distribution is easy to enumerate.
    """

    def __init__(
        self, vocab_size: int, *, seed: int, scale: float = 1.5, eos: frozenset[int] = frozenset()
    ) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.table = torch.randn(vocab_size, vocab_size, vocab_size, generator=gen) * scale
        self.name = f"table-{seed}"
        self.vocab_size = vocab_size
        self.max_context = 512
        self.eos_token_ids = eos
        self.tokenizer: Any = None
        self.supports_tree = False
        self.forward_calls = 0

    def new_cache(self) -> TableCache:
        return TableCache()

    def logits_after(self, tokens: list[int]) -> torch.Tensor:  # [vocab]
        prev = tokens[-2] if len(tokens) > 1 else 0
        return self.table[prev, tokens[-1]]

    def forward(
        self, cache: TableCache, tokens: list[int], *, num_logits: int | None = None
    ) -> torch.Tensor:  # [n, vocab]
        self.forward_calls += 1
        rows = []
        for t in tokens:
            cache.tokens.append(t)
            rows.append(self.logits_after(cache.tokens))
        out = torch.stack(rows)
        return out[-num_logits:] if num_logits else out

    def forward_batch(
        self,
        caches: Any,
        tokens: Any,
        *,
        num_logits: Any = None,
        parents: Any = None,
    ) -> list[torch.Tensor]:
        assert parents is None or all(p is None for p in parents)
        return forward_each(self, caches, tokens, num_logits=num_logits)


def byte_tokenizer() -> Any:
    """A byte-level BPE tokenizer with no merges: 256 byte tokens + <eos>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def tiny_llama(
    *, seed: int, vocab_size: int = 257, layers: int = 2, hidden: int = 64, tokenizer: Any = None
) -> HFModel:
    """A random Llama with logits spread wide enough that greedy argmax has no near-ties."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.3,
        tie_word_embeddings=False,
        eos_token_id=256 if vocab_size > 256 else None,
    )
    hf = LlamaForCausalLM(config).float()
    return HFModel(
        hf=hf,
        tokenizer=tokenizer,
        name=f"tiny-llama-{seed}",
        eos_token_ids=frozenset({256}) if vocab_size > 256 else frozenset(),
    )


def plain_greedy(model: Any, prompt: list[int], n: int) -> list[int]:
    """Reference greedy decoding: a fresh full forward per token, no KV cache reuse."""
    tokens = list(prompt)
    out: list[int] = []
    for _ in range(n):
        logits = model.forward(model.new_cache(), tokens)
        token = int(logits[-1].argmax())
        out.append(token)
        tokens.append(token)
        if token in model.eos_token_ids:
            break
    return out
