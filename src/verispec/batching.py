"""Several sequences in one forward pass: ragged batching over a pool of KV slots.

A :class:`KVPool` holds the keys and values of up to ``slots`` sequences of one
model in preallocated tensors, one row (slot) per sequence:
``keys[layer]: [slots, kv_heads, capacity, head_dim]``. A sequence's cache
(:class:`SlotCache`) is its slot and its length, so rolling back is setting
the length (nothing moves) and a batched pass reads every sequence's past in
place, without gathering copies.

:func:`batched_forward` scores a different number of new tokens for each
sequence (ragged): sequence b has ``L_b`` cached positions and ``n_b`` new
tokens. The new tokens are right-padded to ``N = max n_b`` and written at
columns ``L_b .. L_b + N - 1`` of the sequence's own row, at positions
``L_b + j`` (explicit ``position_ids``); a 4D additive mask lets new token j of
sequence b see columns ``0 .. L_b + j`` of its row, nothing else. Padded
tokens write past the sequence's length, where nothing reads them before they
are overwritten.

Example: two sequences with 3 and 5 cached positions score 2 and 1 new
tokens. N = 2; keys span columns 0-6. Sequence 0 writes columns 3-4, its
tokens see columns 0-3 and 0-4; sequence 1 writes column 5 (and a padded
token at 6, ignored), its token sees 0-5. Afterwards the lengths are 5 and 6.

Only plain causal decoders (llama, mistral, qwen2, qwen3 without sliding
windows) are pooled; :func:`pooled` returns any other model unchanged, and
:func:`batched_forward` then runs it one sequence at a time through its own
``forward``, so callers never need to care.

:func:`propose_batch` does the same for draft models: one batched pass per
draft step across all sequences that draft with the same pooled model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from verispec.drafters import Draft, Proposer, include_ids
from verispec.models import HFModel, LanguageModel
from verispec.sampling import SamplingParams, sample, warp

BATCHABLE_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def supports_batching(model: LanguageModel) -> bool:
    """Whether ``model`` can be pooled and run as one batch."""
    if not isinstance(model, HFModel):
        return False
    config = model.hf.config
    if getattr(config, "model_type", None) not in BATCHABLE_MODEL_TYPES:
        return False
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or []):
        return False
    return not getattr(config, "use_sliding_window", False)


class _Slot:
    """Where a sequence lives in its pool; the pool moves it (index) when compacting."""

    __slots__ = ("index", "length")

    def __init__(self, index: int) -> None:
        self.index = index
        self.length = 0


class SlotCache:
    """One sequence's positions in a :class:`KVPool`: a slot and a length."""

    def __init__(self, pool: KVPool, slot: _Slot) -> None:
        self.pool = pool
        self._slot = slot

    @property
    def slot(self) -> int:
        return self._slot.index  # -1 once released

    @property
    def length(self) -> int:
        return self._slot.length

    @length.setter
    def length(self, value: int) -> None:
        self._slot.length = value

    def crop(self, length: int) -> None:
        if length < 0:
            raise ValueError(f"cannot crop a cache to {length} positions")
        self.length = min(self.length, length)

    def release(self) -> None:
        """Give the slot back (idempotent); the cache must not be used afterwards."""
        if self._slot.index >= 0:
            self.pool.release(self._slot)

    def __del__(self) -> None:  # a sequence dropped without release() frees its slot too
        self.release()


class DetachedKV:
    """A sequence's keys and values copied out of a :class:`KVPool`, so that a prefix
    cache can keep them without holding one of the pool's slots."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        self.keys = keys  # per layer [kv_heads, length, head_dim]
        self.values = values
        self.length = int(keys[0].shape[1]) if keys else 0

    def crop(self, length: int) -> None:
        if length < 0:
            raise ValueError(f"cannot crop a cache to {length} positions")
        self.length = min(self.length, length)


class KVPool:
    """Preallocated keys/values for ``slots`` sequences of one model; grows in length on demand.

    The slots in use are always ``0 .. in_use - 1``: releasing a slot moves the
    sequence in the highest slot into it (one sequence's copy), so that a batch
    of all live sequences reads the pool in place. A pool belongs to one thread.
    """

    def __init__(self, model: HFModel, *, slots: int, capacity: int = 256) -> None:
        config = model.hf.config
        self.num_layers = int(config.num_hidden_layers)
        self.kv_heads = int(
            getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        )
        self.head_dim = int(
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        self.dtype = next(model.hf.parameters()).dtype
        self.device = model.device
        self.slots = slots
        self.used: list[_Slot] = []  # used[i].index == i
        self.capacity = 0
        self.keys: list[torch.Tensor] = []  # per layer [slots, kv_heads, capacity, head_dim]
        self.values: list[torch.Tensor] = []
        self.reserve(capacity)

    @property
    def in_use(self) -> int:
        return len(self.used)

    def new_cache(self) -> SlotCache:
        if len(self.used) >= self.slots:
            raise RuntimeError(f"all {self.slots} KV slots are in use")
        slot = _Slot(len(self.used))
        self.used.append(slot)
        return SlotCache(self, slot)

    def detach(self, cache: SlotCache) -> DetachedKV:
        """Copy ``cache``'s positions out and give its slot back."""
        index, n = cache.slot, cache.length
        if index < 0:
            raise ValueError("cannot detach a released cache")
        keys = [layer[index, :, :n].clone() for layer in self.keys]
        values = [layer[index, :, :n].clone() for layer in self.values]
        cache.release()
        return DetachedKV(keys, values)

    def attach(self, kv: DetachedKV) -> SlotCache:
        """A new slot holding the first ``kv.length`` positions of ``kv``."""
        cache = self.new_cache()
        n = kv.length
        self.reserve(n)
        for store, rows in ((self.keys, kv.keys), (self.values, kv.values)):
            for layer, saved in zip(store, rows, strict=True):
                layer[cache.slot, :, :n] = saved[:, :n]
        cache.length = n
        return cache

    def release(self, slot: _Slot) -> None:
        hole, last = slot.index, self.used[-1]
        if last is not slot:  # fill the hole with the highest slot's sequence
            for store in (self.keys, self.values):
                for layer in store:
                    layer[hole, :, : last.length] = layer[last.index, :, : last.length]
            last.index = hole
            self.used[hole] = last
        self.used.pop()
        slot.index = -1

    def reserve(self, capacity: int) -> None:
        """Make every slot hold at least ``capacity`` positions (doubling, keeping contents)."""
        if capacity <= self.capacity:
            return
        new_capacity = max(capacity, 2 * self.capacity)
        shape = (self.slots, self.kv_heads, new_capacity, self.head_dim)
        for store in (self.keys, self.values):
            for layer in range(self.num_layers):
                grown = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if store and self.capacity:
                    grown[:, :, : self.capacity] = store[layer]
                if len(store) > layer:
                    store[layer] = grown
                else:
                    store.append(grown)
        self.capacity = new_capacity


class _PassKV:
    """The cache object of one batched pass: writes new K/V into the pool, returns the past."""

    def __init__(self, pool: KVPool, caches: Sequence[SlotCache], num_new: int) -> None:
        self.pool = pool
        self.lengths = torch.tensor([c.length for c in caches])  # [B]
        slots = [c.slot for c in caches]
        self.slots = torch.tensor(slots)  # [B]
        self.prefix = slots == list(range(len(slots)))  # rows 0..B-1: read the pool in place
        self.total = int(self.lengths.max()) + num_new
        offsets = torch.arange(num_new)  # [N]
        self.rows = self.slots[:, None].expand(-1, num_new)  # [B, N]
        self.cols = self.lengths[:, None] + offsets  # [B, N]: where new token j of b goes
        pool.reserve(self.total)

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *a: Any,
        **kw: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # [B, kv_heads, total, head_dim] x2
        keys, values = self.pool.keys[layer_idx], self.pool.values[layer_idx]
        keys[self.rows, :, self.cols] = key_states.transpose(1, 2)  # [B, N, kv_heads, head_dim]
        values[self.rows, :, self.cols] = value_states.transpose(1, 2)
        if self.prefix:
            b = len(self.slots)
            return keys[:b, :, : self.total], values[:b, :, : self.total]
        return keys[self.slots, :, : self.total], values[self.slots, :, : self.total]

    def mask(self, dtype: torch.dtype) -> torch.Tensor:  # [B, 1, N, total] additive
        cols = torch.arange(self.total)  # [total]
        allowed = cols[None, None, :] <= self.cols[:, :, None]  # [B, N, total]
        additive = torch.zeros(allowed.shape, dtype=dtype)
        return additive.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


class PooledModel:
    """An :class:`HFModel` whose caches live in a :class:`KVPool` (the LanguageModel interface)."""

    def __init__(self, model: HFModel, *, slots: int) -> None:
        self.model = model
        self.pool = KVPool(model, slots=slots)
        self.name = model.name
        self.vocab_size = model.vocab_size
        self.max_context = model.max_context
        self.eos_token_ids = model.eos_token_ids
        self.tokenizer = model.tokenizer

    def new_cache(self) -> SlotCache:
        return self.pool.new_cache()

    def detach_cache(self, cache: SlotCache) -> DetachedKV:
        """For a prefix cache: ``cache``'s contents, its slot given back."""
        return self.pool.detach(cache)

    def attach_cache(self, kv: DetachedKV) -> SlotCache:
        """A slot again for what :meth:`detach_cache` returned."""
        return self.pool.attach(kv)

    def include_ids(self, ids: list[int]) -> None:
        """See :meth:`HFModel.include_ids` (a trimmed draft head scores ``ids`` too)."""
        self.model.include_ids(ids)

    def forward(
        self, cache: SlotCache, tokens: list[int], *, num_logits: int | None = None
    ) -> torch.Tensor:  # [num_logits or len(tokens), vocab]
        return batched_forward(self, [cache], [tokens], num_logits=num_logits)[0]


def pooled(model: LanguageModel, *, slots: int) -> LanguageModel:
    """``model`` with pooled caches when it can be batched, else ``model`` itself."""
    if isinstance(model, HFModel) and supports_batching(model):
        return PooledModel(model, slots=slots)
    return model


@torch.inference_mode()
def batched_forward(
    model: LanguageModel,
    caches: Sequence[Any],
    tokens: Sequence[list[int]],
    *,
    num_logits: int | None = None,
) -> list[torch.Tensor]:  # per sequence [num_logits or len(tokens[b]), vocab] float32 on CPU
    """Append ``tokens[b]`` to ``caches[b]`` for every b in one pass; logits of the new tokens.

    Equivalent to ``[model.forward(c, t) for c, t in zip(caches, tokens)]`` (up
    to float rounding), which is what it does for a model that is not pooled.
    """
    if len(caches) != len(tokens) or not caches:
        raise ValueError("batched_forward needs one token list per cache, and at least one")
    if any(not t for t in tokens):
        raise ValueError("batched_forward needs at least one token per sequence")
    if not isinstance(model, PooledModel):
        return [
            model.forward(c, t, num_logits=num_logits) for c, t in zip(caches, tokens, strict=True)
        ]
    for cache, toks in zip(caches, tokens, strict=True):
        if cache.slot < 0 or cache.pool is not model.pool:
            raise ValueError("a cache does not belong to this model's pool (released?)")
        if cache.length + len(toks) > model.max_context:
            raise ValueError(
                f"{model.name}: {cache.length + len(toks)} positions exceed the context "
                f"window of {model.max_context}"
            )
    order = sorted(range(len(caches)), key=lambda b: caches[b].slot)
    if order != list(range(len(caches))):  # slot order lets a full batch read the pool in place
        out = batched_forward(
            model, [caches[b] for b in order], [tokens[b] for b in order], num_logits=num_logits
        )
        result: list[torch.Tensor] = [out[0]] * len(caches)
        for position, b in enumerate(order):
            result[b] = out[position]
        return result
    hf = model.model.hf
    counts = [len(t) for t in tokens]
    n = max(counts)
    kv = _PassKV(model.pool, caches, n)
    ids = torch.zeros(len(tokens), n, dtype=torch.long)  # [B, N], right-padded with id 0
    for b, toks in enumerate(tokens):
        ids[b, : len(toks)] = torch.tensor(toks)
    device = model.pool.device
    hidden = hf.get_decoder()(
        input_ids=ids.to(device),
        position_ids=kv.cols.to(device),
        attention_mask=kv.mask(model.pool.dtype).to(device),
        cache=kv,
        use_cache=True,
    ).last_hidden_state  # [B, N, hidden]
    keep = [min(c, num_logits or c) for c in counts]
    rows = torch.cat(
        [hidden[b, c - k : c] for b, (c, k) in enumerate(zip(counts, keep, strict=True))]
    )
    logits = hf.get_output_embeddings()(rows).float().cpu()  # [sum keep, vocab]
    for cache, c in zip(caches, counts, strict=True):
        cache.length += c
    return list(torch.split(logits, keep))


def release(cache: Any) -> None:
    """Free a pooled cache now (no-op for other caches)."""
    if isinstance(cache, SlotCache):
        cache.release()


def _draft_model_of(proposer: Proposer | None) -> LanguageModel | None:
    """The pooled draft model behind a draft-model proposer, else None (duck-typed)."""
    model = getattr(proposer, "model", None)
    if isinstance(model, PooledModel) and hasattr(proposer, "cached"):
        return model
    return None


def propose_batch(
    proposers: Sequence[Proposer | None],
    contexts: Sequence[list[int]],
    ks: Sequence[int],
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator],
) -> list[Draft]:
    """Drafts for several sequences. Those that draft with the same pooled model do it in
    lock-step, one batched pass per draft step; others propose one by one.

    A proposer that picks its source per pass (``route``, as ``HybridDrafter``'s does)
    is asked first; where it picks its draft model, that pass joins the lock-step group
    of the model, with the length it chose."""
    drafts = [Draft(tokens=[]) for _ in proposers]
    drafting: list[Any] = list(proposers)  # who drafts for sequence i (a hybrid's own model)
    lengths = list(ks)
    groups: dict[int, list[int]] = {}
    for i, (proposer, k) in enumerate(zip(proposers, ks, strict=True)):
        if proposer is None or k <= 0:
            continue
        route = getattr(proposer, "route", None)
        if route is not None:
            chosen, k = route(contexts[i], k, params=params[i], generator=generators[i])
            if chosen is not None or k <= 0:
                drafts[i] = chosen or drafts[i]
                continue
            proposer = drafting[i] = proposer.model  # type: ignore[attr-defined]
            lengths[i] = k
        model = _draft_model_of(proposer)
        if model is not None:
            groups.setdefault(id(model), []).append(i)
        else:
            drafts[i] = proposer.propose(contexts[i], k, params=params[i], generator=generators[i])
    for members in groups.values():
        batch = _lockstep(
            [drafting[i] for i in members],
            [contexts[i] for i in members],
            [lengths[i] for i in members],
            [params[i] for i in members],
            [generators[i] for i in members],
        )
        for i, draft in zip(members, batch, strict=True):
            drafts[i] = draft
    return drafts


def _lockstep(
    proposers: list[Any],
    contexts: list[list[int]],
    ks: list[int],
    params: list[SamplingParams],
    generators: list[torch.Generator],
) -> list[Draft]:
    """The steps of ``DraftModelDrafter``'s proposer, with its passes shared across sequences."""
    model = proposers[0].model
    # 1. Keep each cached prefix the verified context still agrees with (at least the
    #    last context token is fed again, for fresh logits); feed the rest.
    feeds: list[list[int]] = []
    for proposer, context in zip(proposers, contexts, strict=True):
        cached, keep = proposer.cached, 0
        limit = min(len(cached), len(context) - 1)
        while keep < limit and cached[keep] == context[keep]:
            keep += 1
        proposer.cache.crop(keep)
        del proposer.cached[keep:]
        feeds.append(list(context[keep:]))
        include_ids(model, feeds[-1])
    # A new sequence's draft cache catches up on its prompt in a pass of its own: padding
    # everyone's one or two tokens to a prompt's length would waste the first step.
    behind = [i for i, feed in enumerate(feeds) if len(feed) > 2]
    if behind:
        caches = [proposers[i].cache for i in behind]
        batched_forward(model, caches, [feeds[i][:-1] for i in behind], num_logits=1)
        for i in behind:
            proposers[i].cached.extend(feeds[i][:-1])
            feeds[i] = feeds[i][-1:]
    tokens: list[list[int]] = [[] for _ in proposers]
    probs: list[list[torch.Tensor]] = [[] for _ in proposers]
    active = list(range(len(proposers)))
    # 2. Catch up, then draft: one batched pass per step over the sequences still drafting.
    while active:
        caches = [proposers[i].cache for i in active]
        rows = batched_forward(model, caches, [feeds[i] for i in active], num_logits=1)
        still = []
        for i, logits in zip(active, rows, strict=True):
            proposer = proposers[i]
            proposer.cached.extend(feeds[i])
            row = proposer._align(logits[-1])  # [vocab]
            if params[i].greedy:
                token = int(row.argmax().item())
            else:
                p_draft = warp(row[None], params[i])[0]  # [vocab]
                token = sample(p_draft, generators[i])
                probs[i].append(p_draft)
            tokens[i].append(token)
            if len(tokens[i]) < ks[i]:
                feeds[i] = [token]
                still.append(i)
        active = still
    return [
        Draft(tokens=t, probs=torch.stack(p) if p else None)
        for t, p in zip(tokens, probs, strict=True)
    ]
