"""A lean forward pass for Llama-family decoders (Llama, Qwen2), used by :class:`HFModel`.

transformers' generic forward spends several milliseconds per call in Python
(mask construction, cache bookkeeping, dispatch), which is a large share of a
small draft model's step on a CPU. This module runs the *same* modules (the
same ``nn.Linear`` objects, so the same kernels: oneDNN-prepacked, int8, int4,
plus the model's fused projections) with a direct loop and a preallocated KV cache:

* the cache is one ``[kv_heads, capacity, head_dim]`` tensor per layer and
  side; appending writes in place and rolling back just moves ``length``;
* a pass over one new token needs no mask; a pass over several uses a
  boolean causal mask against the cached positions;
* several sequences score in one pass (:meth:`LeanRunner.forward_batch`): their
  rows are packed for the linear layers, attention goes sequence by sequence;
* RoPE, RMSNorm, GQA attention and the SwiGLU MLP follow the transformers
  implementations operation by operation, so logits agree with
  ``model.hf(...)`` to float rounding (tested within 1e-4).

Only plain configurations are accepted (:func:`lean_unsupported` says why
not otherwise); anything else keeps the transformers forward.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from verispec.models.kernels import RowQuantizedLinear

LEAN_MODEL_TYPES = ("llama", "qwen2")
# Passes of at most this many positions (verification: k + 1 <= 17) of a model with
# exact rows attend query by query, as decoding each position alone does.
EXACT_ROWS_MAX = 17

log = logging.getLogger(__name__)


def compiler_missing() -> str | None:
    """Why torch.compile cannot build CPU kernels here (no C++ compiler), or None."""
    if any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        return None
    return "no C++ compiler (g++, c++ or clang++) on PATH, which torch.compile needs on a CPU"


def _rope_theta(config: Any) -> float | None:
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict):
        if params.get("rope_type", "default") != "default":
            return None
        theta = params.get("rope_theta")
        if theta is not None:
            return float(theta)
    if getattr(config, "rope_scaling", None):
        return None
    theta = getattr(config, "rope_theta", None)
    return float(theta) if theta is not None else None


def lean_unsupported(hf: Any) -> str | None:
    """Why ``hf`` cannot take the lean forward, or None when it can."""
    config = hf.config
    model_type = getattr(config, "model_type", "")
    if model_type not in LEAN_MODEL_TYPES:
        return f"model type {model_type!r} (lean forward covers {', '.join(LEAN_MODEL_TYPES)})"
    if _rope_theta(config) is None:
        return "RoPE scaling"
    if getattr(config, "use_sliding_window", False):
        return "sliding-window attention"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "pretraining_tp > 1"
    inner = getattr(hf, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "embed_tokens"):
        return "unexpected module layout"
    return None


class LeanCache:
    """Per-layer K/V tensors ``[kv_heads, capacity, head_dim]``; the first ``length`` are valid."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: Any):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.shape = (layers, kv_heads, head_dim)
        self.dtype = dtype
        self.device = device
        self.length = 0
        self.capacity = 0

    def reserve(self, needed: int, limit: int) -> None:
        if needed <= self.capacity:
            return
        capacity = min(max(needed, 2 * self.capacity, 256), max(limit, needed))
        layers, kv_heads, head_dim = self.shape
        keys, values = [], []
        for i in range(layers):
            k = torch.empty(kv_heads, capacity, head_dim, dtype=self.dtype, device=self.device)
            v = torch.empty_like(k)
            if self.length:
                k[:, : self.length] = self.keys[i][:, : self.length]
                v[:, : self.length] = self.values[i][:, : self.length]
            keys.append(k)
            values.append(v)
        self.keys, self.values, self.capacity = keys, values, capacity

    def crop(self, n: int) -> None:
        """Drop positions like ``DynamicCache.crop``: a negative ``n`` drops ``-n`` positions."""
        self.length = self.length + n if n < 0 else min(n, self.length)

    @torch.inference_mode()
    def move(self, source: int, destination: int) -> None:
        """Copy one position's keys and values over another's (a verified tree's branch
        taking its place in the sequence)."""
        if not 0 <= destination < self.length or not 0 <= source < self.length:
            raise ValueError(f"cannot move position {source} to {destination} of {self.length}")
        for keys, values in zip(self.keys, self.values, strict=True):
            keys[:, destination] = keys[:, source]
            values[:, destination] = values[:, source]


class LeanRunner:
    """Runs a transformers Llama/Qwen2 model's modules without transformers' forward."""

    def __init__(
        self, hf: Any, fused: Sequence[tuple[Any, Any] | None] = (), *, exact: bool = False
    ) -> None:
        reason = lean_unsupported(hf)
        if reason is not None:
            raise ValueError(f"no lean forward for this model: {reason}")
        config = hf.config
        self.hf = hf
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        self.gqa = self.heads != self.kv_heads  # a bool, not an int comparison, under compile
        self.max_context = int(getattr(config, "max_position_embeddings", 0) or 2048)
        theta = _rope_theta(config)
        assert theta is not None
        param = next(hf.parameters())
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim
        self.inv_freq = (1.0 / (theta**exponents)).to(param.device)  # [head_dim / 2]
        self.dtype = hf.model.embed_tokens.weight.dtype
        self.device = param.device
        # Fused q|k|v and gate|up projections of quantized models (kernels.Kernels.fused),
        # or (None, None) where a layer has only the separate ones.
        layers = len(hf.model.layers)
        if fused and len(fused) != layers:
            raise ValueError(f"fused projections for {len(fused)} of {layers} layers")
        self.fused = [pair or (None, None) for pair in fused] or [(None, None)] * layers
        # An int8 target quantizes each row on its own (kernels.RowQuantizedLinear), so a
        # position's result must not depend on the other positions of its pass anywhere:
        # quantization turns the last-bit differences of a batched attention into visible
        # ones. Such a model's short passes attend query by query, and so do those of a
        # reduced-precision target (``exact``: bf16 rounding does the same).
        self.exact_rows = exact or any(isinstance(m, RowQuantizedLinear) for m in hf.modules())
        self._cos = torch.empty(0, self.head_dim, device=self.device)
        self._sin = torch.empty(0, self.head_dim, device=self.device)
        self._step: Any = None  # the compiled one-position pass (compile_steps)

    def compile_steps(self) -> str | None:
        """Run one-position passes (a draft's decoding steps) through ``torch.compile``.

        A draft model's step is small enough that the ~40 elementwise operations per
        layer around its matmuls cost a fifth of it in dispatch; inductor fuses them.
        The compile (seconds with inductor's disk cache, about half a minute without)
        happens here, on throwaway caches, with the position and the cache's capacity
        dynamic, so no request pays it. Returns None when compiled, else why not (the
        eager pass stays in use).
        """
        reason = compiler_missing()
        if reason is not None:
            return reason
        self._step = torch.compile(self._layers, dynamic=True)
        try:
            with torch.inference_mode():
                # Steps at several positions of two cache capacities, the last filling
                # its cache (a case torch guards apart), so one graph serves them all.
                # (Positions 0 and 1 would get graphs of their own: torch specializes
                # sizes 0 and 1. Such a step is rare, a one-token prompt's, and compiles then.)
                for capacity in (256, 300):
                    cache = self.new_cache()
                    cache.reserve(capacity, self.max_context)
                    for tensor in cache.keys + cache.values:
                        tensor.zero_()  # not the garbage of torch.empty (NaN upsets int8)
                    for position in (2, 3, capacity - 1):
                        cache.length = position
                        self.forward(cache, torch.zeros(1, dtype=torch.long), 1)
        except Exception as exc:  # any compiler failure: keep the eager pass
            self._step = None
            return f"torch.compile failed ({type(exc).__name__}: {exc})"
        return None if self._step is not None else "torch.compile failed (see the log)"

    def new_cache(self) -> LeanCache:
        layers = len(self.hf.model.layers)
        return LeanCache(layers, self.kv_heads, self.head_dim, self.dtype, self.device)

    def _rope(self, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:  # 2 x [n, head_dim]
        end = start + n
        if end > self._cos.shape[0]:
            size = min(max(end, 2 * self._cos.shape[0], 1024), max(self.max_context, end))
            positions = torch.arange(size, device=self.device).float()
            freqs = positions[:, None] * self.inv_freq[None, :]  # [size, head_dim / 2]
            emb = torch.cat((freqs, freqs), dim=-1)
            self._cos = emb.cos().to(self.dtype)
            self._sin = emb.sin().to(self.dtype)
        return self._cos[start:end], self._sin[start:end]

    @staticmethod
    def _rms_norm(norm: Any, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused op, same math
            return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        return norm.weight * h.to(x.dtype)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def forward(
        self,
        cache: LeanCache,
        ids: torch.Tensor,
        num_logits: int,
        parents: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """``ids`` [n] -> logits of the last ``num_logits`` positions, [num_logits, vocab].

        ``parents`` makes the new positions a tree instead of a chain: row r follows
        row ``parents[r]`` (-1: the cached context; always an earlier row), sees only
        the context and its own ancestors, and sits at the position its depth gives
        (see :func:`tree_layout`). All rows are written to the cache in input order.
        """
        n = int(ids.shape[0])
        if n == 1 and parents is None and self._step is not None:
            past = cache.length
            cache.reserve(past + 1, self.max_context)
            cos, sin = self._rope(past, 1)
            x = self.hf.model.embed_tokens(ids)  # [1, hidden]
            try:
                x = self._step(x, cos, sin, past, cache.keys, cache.values)
            except Exception as exc:  # a compiler failure must not lose a request
                log.warning("compiled step failed; the eager pass is used from now on: %s", exc)
                self._step = None  # the eager pass rewrites the same cache positions
                x = self._layers(x, cos, sin, past, cache.keys, cache.values)
            cache.length = past + 1
            return self._head(x)
        return self.forward_batch([cache], [ids], [num_logits], [parents])[0]

    def forward_batch(
        self,
        caches: Sequence[LeanCache],
        ids: Sequence[torch.Tensor],  # per sequence [n_b]
        num_logits: Sequence[int],
        parents: Sequence[Sequence[int] | None],
    ) -> list[torch.Tensor]:  # per sequence [num_logits[b], vocab]
        """Several sequences in one pass, each against its own cache (ragged, unpadded).

        The rows of all sequences are packed one after another, so every linear layer
        (nearly all of a pass's work) runs once over all of them; only attention and
        RoPE go sequence by sequence, each at its own positions and with its own mask
        (or tree). Example: caches of 3 and 5 positions and 2 and 1 new tokens pack 3
        rows; rows 0-1 sit at positions 3-4 of the first cache, row 2 at position 5 of
        the second.
        """
        segments: list[_Segment] = []
        cos_parts, sin_parts = [], []
        start = 0
        for cache, seq_ids, tree_parents in zip(caches, ids, parents, strict=True):
            n = int(seq_ids.shape[0])
            past = cache.length
            cache.reserve(past + n, self.max_context)
            tree = None if tree_parents is None else self._tree(tree_parents, n, past)
            if tree is None:
                cos, sin = self._rope(past, n)  # [n, head_dim]
            else:
                cos, sin = self._rope(past, max(tree.depth) + 1)
                at = torch.tensor(tree.depth, device=self.device)
                cos, sin = cos[at], sin[at]  # [n, head_dim]: each row at its depth
            cos_parts.append(cos)
            sin_parts.append(sin)
            segments.append(_Segment(start, n, past, cache.keys, cache.values, tree))
            start += n
        packed = ids[0] if len(ids) == 1 else torch.cat(list(ids))  # [rows]
        x = self.hf.model.embed_tokens(packed)  # [rows, hidden]
        cos = cos_parts[0] if len(cos_parts) == 1 else torch.cat(cos_parts)
        sin = sin_parts[0] if len(sin_parts) == 1 else torch.cat(sin_parts)
        x = self._run_layers(x, cos, sin, segments)
        for cache, segment in zip(caches, segments, strict=True):
            cache.length = segment.past + segment.n
        if len(segments) == 1:
            return [self._head(x[segments[0].n - num_logits[0] :])]
        keep = [
            torch.arange(s.start + s.n - m, s.start + s.n)
            for s, m in zip(segments, num_logits, strict=True)
        ]
        logits = self._head(x[torch.cat(keep).to(self.device)])  # [sum num_logits, vocab]
        return list(torch.split(logits, list(num_logits)))

    def _head(self, x: torch.Tensor) -> torch.Tensor:  # [m, hidden] -> [m, vocab]
        return self.hf.get_output_embeddings()(self._rms_norm(self.hf.model.norm, x))

    def _tree(self, parents: Sequence[int], n: int, past: int) -> TreeMask:
        depth, rows = tree_layout(parents, n)
        mask = torch.ones(n, past + n, dtype=torch.bool, device=self.device)
        mask[:, past:] = False
        for r, seen in enumerate(rows):
            mask[r, [past + c for c in seen]] = True
        # Per row, the cached and new positions it attends to, for per-query attention:
        # None where that is one slice (a chain's prefix), else an index, built once
        # here rather than in every layer.
        gather = [
            None
            if seen == list(range(r + 1))
            else torch.cat([torch.arange(past), torch.tensor(seen) + past]).to(self.device)
            for r, seen in enumerate(rows)
        ]
        return TreeMask(mask=mask, gather=gather, depth=depth)

    def _layers(
        self,
        x: torch.Tensor,  # [n, hidden]: the new positions' embeddings
        cos: torch.Tensor,  # [n, head_dim]
        sin: torch.Tensor,
        past: int,  # positions already in the cache
        all_keys: list[torch.Tensor],  # per layer [kv_heads, capacity, head_dim]
        all_values: list[torch.Tensor],
    ) -> torch.Tensor:  # [n, hidden]: the last layer's output
        """One sequence's chain of new positions through the decoder layers (what
        ``torch.compile`` takes for a draft's one-position steps)."""
        segment = _Segment(0, int(x.shape[0]), past, all_keys, all_values, None)
        return self._run_layers(x, cos, sin, [segment])

    def _run_layers(
        self,
        x: torch.Tensor,  # [rows, hidden]: the new positions of every segment, packed
        cos: torch.Tensor,  # [rows, head_dim]
        sin: torch.Tensor,
        segments: Sequence[_Segment],
    ) -> torch.Tensor:  # [rows, hidden]: the last layer's output
        """The decoder layers; writes the new positions' keys and values into the cache
        tensors and touches no other state (so ``torch.compile`` can take it whole)."""
        rows = x.shape[0]
        masks = [self._mask(s) for s in segments]
        scale = self.head_dim**-0.5
        heads, kv_heads, head_dim, gqa = self.heads, self.kv_heads, self.head_dim, self.gqa
        for i, layer in enumerate(self.hf.model.layers):
            qkv_proj, gate_up_proj = self.fused[i]
            attn = layer.self_attn
            h = self._rms_norm(layer.input_layernorm, x)
            if qkv_proj is not None:  # int8 models: one call for q, k and v
                qkv = qkv_proj(h).view(rows, heads + 2 * kv_heads, head_dim).transpose(0, 1)
                qk = self._rotate(qkv[: heads + kv_heads], cos, sin)  # RoPE on q and k at once
                q, k, v = qk[:heads], qk[heads:], qkv[heads + kv_heads :]
            else:
                q = attn.q_proj(h).view(rows, heads, head_dim).transpose(0, 1)
                k = attn.k_proj(h).view(rows, kv_heads, head_dim).transpose(0, 1)
                v = attn.v_proj(h).view(rows, kv_heads, head_dim).transpose(0, 1)
                q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)  # [heads, rows, hd]
            outs = []
            for segment, mask in zip(segments, masks, strict=True):
                start, n, past = segment.start, segment.n, segment.past
                keys, values = segment.keys[i], segment.values[i]
                keys[:, past : past + n] = k[:, start : start + n]
                values[:, past : past + n] = v[:, start : start + n]
                seg_q = q[:, start : start + n]  # [heads, n, head_dim]
                if self.exact_rows and 1 < n <= EXACT_ROWS_MAX:
                    # the call a one-position pass makes, for each position
                    out = torch.cat(
                        [
                            F.scaled_dot_product_attention(
                                seg_q[None, :, j : j + 1].contiguous(),
                                *self._seen(keys, values, past, j, segment.tree),
                                scale=scale,
                                enable_gqa=gqa,
                            )
                            for j in range(n)
                        ],
                        dim=2,
                    )  # [1, heads, n, head_dim]
                else:
                    out = F.scaled_dot_product_attention(
                        seg_q[None],
                        keys[None, :, : past + n],
                        values[None, :, : past + n],
                        attn_mask=mask,
                        scale=scale,
                        enable_gqa=gqa,
                    )  # [1, heads, n, head_dim]
                outs.append(out[0])
            out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)  # [heads, rows, hd]
            out = out.transpose(0, 1).reshape(rows, heads * head_dim)
            x = x + attn.o_proj(out)
            mlp = layer.mlp
            h = self._rms_norm(layer.post_attention_layernorm, x)
            if gate_up_proj is not None:
                gate, up = gate_up_proj(h).chunk(2, dim=-1)
            else:
                gate, up = mlp.gate_proj(h), mlp.up_proj(h)
            x = x + mlp.down_proj(F.silu(gate) * up)
        return x

    def _mask(self, segment: _Segment) -> torch.Tensor | None:  # [n, past + n] or None
        if segment.tree is not None:
            return segment.tree.mask
        if segment.n == 1:
            return None
        past, n = segment.past, segment.n
        q_pos = torch.arange(past, past + n, device=self.device)[:, None]
        return torch.arange(past + n, device=self.device)[None, :] <= q_pos

    @staticmethod
    def _seen(
        keys: torch.Tensor,  # [kv_heads, capacity, head_dim]
        values: torch.Tensor,
        past: int,
        row: int,
        tree: TreeMask | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # 2 x [1, kv_heads, positions, head_dim]
        """The keys and values new row ``row`` attends to, in sequence order: what a
        one-position pass at its place in the sequence would see."""
        index = None if tree is None else tree.gather[row]
        if index is None:  # a chain: one slice
            return keys[None, :, : past + row + 1], values[None, :, : past + row + 1]
        return keys.index_select(1, index)[None], values.index_select(1, index)[None]


@dataclass(frozen=True)
class TreeMask:
    """A tree of new positions: ``mask`` [n, past + n] (True: attends) and, per row,
    the cache positions it attends to in sequence order (None: the first past + row + 1)."""

    mask: torch.Tensor
    gather: list[torch.Tensor | None]
    depth: list[int]  # each row's position past the context


class _Segment(NamedTuple):
    """One sequence's rows in a packed pass: rows ``start .. start + n - 1`` go to
    positions ``past ..`` of its cache tensors (per layer)."""

    start: int
    n: int
    past: int
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    tree: TreeMask | None


def tree_layout(parents: Sequence[int], n: int) -> tuple[list[int], list[list[int]]]:
    """Depth of each new row (its position past the context) and the rows it sees.

    Example: parents ``[-1, 0, 1, 0]`` is a chain of three rows and a fourth row
    that is an alternative to row 1: depths ``[0, 1, 2, 1]``; row 3 sees rows 0 and 3.
    """
    if len(parents) != n:
        raise ValueError(f"{len(parents)} parents for {n} rows")
    depth: list[int] = []
    rows: list[list[int]] = []
    for r, parent in enumerate(parents):
        if not -1 <= parent < r:
            raise ValueError(f"row {r}'s parent {parent} is not an earlier row or -1")
        depth.append(0 if parent < 0 else depth[parent] + 1)
        rows.append([*(rows[parent] if parent >= 0 else []), r])
    return depth, rows
