"""CPU kernels for linear layers, and the precisions they run.

Which kernel is fastest, and whether it scores each row of a call the same
whatever else is in the call, depends on the processor (on some, PyTorch's
default fp32 ``F.linear`` takes a slower GEMM path for 2-16 rows; on others bf16
through oneDNN costs about the same for 32 rows as for one): so
:mod:`verispec.models.tuning` measures the candidates and :func:`optimize` applies
its choice. The layers:

``OneDNNLinear``
    fp32 or bf16 weights reordered once into oneDNN's blocked layout
    (``torch.ops.mkldnn._reorder_linear_weight``) and run with
    ``_linear_pointwise`` (fp32: same math, logits within 1e-4 of the default
    path); short calls padded with zero rows where measured to pay or to make rows
    exact (``PaddedLinear`` does the same for the default kernel).
``int8``
    dynamic int8 quantization (fbgemm): int8 weights and activations
    (:class:`RowQuantizedLinear` for targets, whose rows must not depend on each other).
``int8w``
    int8 weights, bf16 activations (:class:`Int8WeightOnlyLinear`).
``int4`` (draft models)
    4-bit weights in groups of 32 inputs, each group with its own scale and
    zero point, run by torch's CPU int4 kernel with bf16 activations
    (:class:`Int4Linear`): half the weight bytes of int8 per decode step.

Reduced precisions change a target's output (to that precision's own plain
decoding, which speculation then reproduces); a draft's never changes it. Plain
and speculative decoding always run on the same kernels.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from verispec.errors import InvalidArgumentError

KERNELS = ("auto", "default", "onednn")
PRECISIONS = ("fp32", "bf16", "fp16", "int8", "int8w", "int4")
INT4_GROUP_SIZE = 32
# torch's CPU int4 kernel is a matrix-vector kernel: for more rows than this, an int4
# draft's passes run on an fbgemm int8 copy of the weights instead (Int4Linear; the
# kernel table of `verispec kernels` times both sides of the crossover on a machine).
INT4_MAX_ROWS = 4


class OneDNNLinear(nn.Module):
    """``nn.Linear`` (fp32 or bf16) with its weight prepacked for oneDNN; same math.

    Inputs with fewer than ``min_rows`` rows are padded with zero rows and the
    padding is dropped from the output (rows are independent, so padding never
    changes a result). The padding is chosen by measurement
    (:mod:`verispec.models.tuning`): where a one-row call takes another code path,
    padding it makes every call score its rows alike, and where short calls are
    slower than longer ones, padding makes them cheaper.
    """

    def __init__(self, linear: nn.Linear, *, min_rows: int = 1) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        dtype = linear.weight.dtype if linear.weight.dtype == torch.bfloat16 else torch.float32
        weight = linear.weight.detach().to(dtype).contiguous()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        self.bias = None if linear.bias is None else linear.bias.detach().to(dtype).contiguous()
        self.dtype = dtype
        self.min_rows = min_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        shape = x.shape
        flat = x.reshape(-1, self.in_features).to(self.dtype)  # [M, in]
        rows = flat.shape[0]
        if rows < self.min_rows:
            flat = torch.cat([flat, flat.new_zeros(self.min_rows - rows, self.in_features)])
        out = torch.ops.mkldnn._linear_pointwise(
            flat.contiguous(), self.packed, self.bias, "none", [], ""
        )  # [max(M, min_rows), out]
        return out[:rows].reshape(*shape[:-1], self.out_features).to(x.dtype)


class Int8WeightOnlyLinear(nn.Module):
    """``nn.Linear`` with int8 weights (one scale per output channel) and bf16
    activations, run by torch's ``_weight_int8pack_mm``: a quarter of fp32's weight
    bytes, with no quantization of the activations; the result is cast back to the
    input's dtype."""

    weight_int8: torch.Tensor  # [out, in] int8
    scale: torch.Tensor  # [out] bf16

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach().float()
        scale = (weight.abs().amax(dim=1) / 127).clamp_min(1e-12)  # [out]
        self.register_buffer(
            "weight_int8", torch.round(weight / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        )
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.bias = None if linear.bias is None else linear.bias.detach().float().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        out = torch._weight_int8pack_mm(flat, self.weight_int8, self.scale).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)


def int8_weight_only_available() -> bool:
    return hasattr(torch, "_weight_int8pack_mm")


def onednn_available() -> bool:
    return bool(torch.backends.mkldnn.is_available())


def use_onednn(model: nn.Module, *, min_rows: int = 2) -> int:
    """Replace every fp32 or bf16 ``nn.Linear`` in ``model`` by :class:`OneDNNLinear`
    (padding to ``min_rows``); returns the count."""
    count = 0
    for name, child in list(model.named_children()):
        if type(child) is nn.Linear and child.weight.dtype in (torch.float32, torch.bfloat16):
            setattr(model, name, OneDNNLinear(child, min_rows=min_rows))
            count += 1
        else:
            count += use_onednn(child, min_rows=min_rows)
    return count


@dataclass(frozen=True)
class Kernels:
    """What :func:`optimize` applied: a description, and the fused projections (per
    decoder layer: q|k|v and gate|up, or None where a layer has only its own ones)
    that the lean forward runs in place of the separate ones."""

    description: str
    fused: tuple[tuple[nn.Module, nn.Module] | None, ...] = ()


def _fuse(parts: Sequence[nn.Module]) -> nn.Linear | None:
    """One fp32 ``nn.Linear`` whose output is the outputs of ``parts`` side by side."""
    linears = [p for p in parts if type(p) is nn.Linear]
    if len(linears) != len(parts):  # already quantized, or another kind of layer
        return None
    biased = [p.bias is not None for p in linears]
    if any(biased) and not all(biased):
        return None
    weight = torch.cat([p.weight.detach() for p in linears])
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=biased[0])
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if biased[0]:
        fused.bias = nn.Parameter(
            torch.cat([p.bias.detach() for p in linears if p.bias is not None]),
            requires_grad=False,
        )
    return fused


def fuse_projections(layer: nn.Module) -> nn.ModuleDict | None:
    """One q|k|v and one gate|up projection for a Llama/Qwen2 decoder layer
    (``{"qkv": ..., "gate_up": ...}``), or None when the layer does not have that layout.

    For quantized models: a small model's decode step is dominated by per-call costs
    (fbgemm quantizes the activation on every call), so one call instead of three
    (attention) and two (MLP) saves 3 of 7 calls per layer. The layer keeps its
    separate projections for transformers' own forward; the fused ones belong to
    whoever asked (:class:`Kernels`, then :class:`verispec.models.HFModel`).
    """
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    try:
        qkv = _fuse([attn.q_proj, attn.k_proj, attn.v_proj])  # type: ignore[union-attr]
        gate_up = _fuse([mlp.gate_proj, mlp.up_proj])  # type: ignore[union-attr]
    except AttributeError:
        return None
    if qkv is None or gate_up is None:
        return None
    return nn.ModuleDict({"qkv": qkv, "gate_up": gate_up})


class RowQuantizedLinear(nn.Module):
    """Dynamic int8 linear layer whose activations are quantized row by row (per token).

    fbgemm's dynamic int8 linear quantizes its whole input with one scale and
    zero point, taken from the input's min and max, so a row's result depends on
    the other rows of the call: a position verified together with k drafts gets
    other logits than when it is decoded alone, and speculative decoding with an
    int8 target would not reproduce plain int8 decoding. Here each row is divided
    by its largest magnitude and two constant columns (+1 and -1, whose weights are
    zero) give every row the same range [-1, 1], so every call quantizes with the
    same parameters; int8 products accumulate exactly in int32, so row i's output
    is bit for bit the same whatever else is in the call. Weights are quantized per
    output channel (so a fused projection equals its parts). Costs two small
    element-wise passes over the input per call.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        padded = nn.Linear(self.in_features + 2, self.out_features, bias=False)
        with torch.no_grad():
            padded.weight[:, : self.in_features].copy_(linear.weight.detach().float())
            padded.weight[:, self.in_features :] = 0.0
        self.inner = _int8_per_channel(padded)
        self.bias = None if linear.bias is None else linear.bias.detach().float().clone()
        self.ends = torch.tensor([[1.0, -1.0]])  # [1, 2]: every row's range

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        shape, size = x.shape, self.in_features
        flat = x.reshape(-1, size)  # [M, in]
        scale = torch.linalg.vector_norm(flat, ord=float("inf"), dim=1, keepdim=True)  # [M, 1]
        scale.clamp_min_(torch.finfo(flat.dtype).tiny)
        padded = flat.new_empty(flat.shape[0], size + 2)
        torch.div(flat, scale, out=padded[:, :size])
        padded[:, size:] = self.ends
        out = self.inner(padded).mul_(scale)  # [M, out]
        if self.bias is not None:
            out.add_(self.bias)
        return out.reshape(*shape[:-1], self.out_features)


def int8_draft_linear(linear: nn.Linear) -> nn.Module:
    """fbgemm's dynamic int8 linear of ``linear`` as a draft gets it (one activation
    scale per call, weights per tensor)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the torch.ao API is deprecated but works in torch 2.x
        from torch.ao.quantization import quantize_dynamic

        quantized = quantize_dynamic(nn.Sequential(linear), {nn.Linear}, dtype=torch.qint8)
    return quantized[0]  # type: ignore[no-any-return]


def _int8_per_channel(linear: nn.Linear) -> nn.Module:
    """fbgemm's dynamic int8 linear of ``linear``, weights quantized per output channel."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the torch.ao API is deprecated but works in torch 2.x
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        quantized = quantize_dynamic(
            nn.Sequential(linear), {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8
        )
    return quantized[0]  # type: ignore[no-any-return]


def quantize_int8(
    model: nn.Module, *, per_row: bool = True
) -> tuple[tuple[nn.Module, nn.Module] | None, ...]:
    """Dynamic int8 quantization of every ``nn.Linear`` (weights int8, activations fp32).

    ``per_row`` (for a target): :class:`RowQuantizedLinear` layers, whose rows do
    not depend on one another, so that verifying k drafts in one pass scores each
    position exactly as decoding it alone would. Without it (for a draft, whose
    output never changes the result): fbgemm's own dynamic linear, which
    quantizes each call's input as a whole and is a little cheaper per call.
    Decoder layers also get fused q|k|v and gate|up projections
    (:func:`fuse_projections`), quantized layer by layer so that the fp32
    copies never pile up. Returns the fused projections per decoder layer.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the torch.ao API is deprecated but works in torch 2.x
        from torch.ao.quantization import quantize_dynamic

        def quantize(module: nn.Module) -> None:
            if not per_row:
                quantize_dynamic(module, {nn.Linear}, dtype=torch.qint8, inplace=True)
            else:
                _replace_linears(module, RowQuantizedLinear)

        return _quantize_layer_by_layer(model, quantize)


def _replace_linears(
    module: nn.Module, make: Callable[[nn.Linear], nn.Module], *, group: int = 1
) -> None:
    """Swap every plain ``nn.Linear`` under ``module`` (input width a multiple of
    ``group``) for ``make(linear)``."""
    for name, child in list(module.named_modules()):
        if type(child) is nn.Linear and child.in_features % group == 0:
            parent_name, _, attr = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, attr, make(child))


def _quantize_layer_by_layer(
    model: nn.Module, quantize: Callable[[nn.Module], None]
) -> tuple[tuple[nn.Module, nn.Module] | None, ...]:
    """Fuse each decoder layer's projections and quantize the layer and its fused ones,
    so that fp32 copies never pile up; then the rest of the model. Returns the fused
    projections per decoder layer."""
    fused: list[tuple[nn.Module, nn.Module] | None] = []
    for layer in getattr(getattr(model, "model", None), "layers", None) or []:
        pair = fuse_projections(layer)
        if pair is not None:
            quantize(pair)
            quantize(layer)
            fused.append((pair["qkv"], pair["gate_up"]))
        else:
            fused.append(None)
    # The output head is tied to the input embedding in some models; quantizing it
    # copies the weight, leaving the embedding untouched.
    quantize(model)
    return tuple(fused)


def int4_available() -> bool:
    """Whether this torch has the CPU int4 kernels :class:`Int4Linear` runs on."""
    ops = torch.ops.aten
    return hasattr(ops, "_convert_weight_to_int4pack_for_cpu") and hasattr(
        ops, "_weight_int4pack_mm_for_cpu"
    )


class Int4Linear(nn.Module):
    """``nn.Linear`` with 4-bit weights: for draft models, whose precision never changes the output.

    Each output row's weights are split into groups of ``group_size`` inputs;
    a group is stored as 4-bit levels 0..15 on the grid ``lo + level * scale``
    spanning the group's min and max. (The bundled GGUF models are Q4_K, whose
    blocks of 32 are such grids already, so their weights survive nearly
    unchanged.) Activations are cast to bf16 for torch's CPU int4 kernel
    (``_weight_int4pack_mm_for_cpu``) and the result back to the input's dtype: half
    the weight bytes of int8 per decode step. That kernel is slow for many rows, so
    calls of more than ``INT4_MAX_ROWS`` rows
    (the draft's pass over a prompt) run on an fbgemm int8 copy of the grid's
    weights (per output channel).
    """

    def __init__(self, linear: nn.Linear, *, group_size: int = INT4_GROUP_SIZE) -> None:
        super().__init__()
        out_features, in_features = linear.weight.shape
        if in_features % group_size:
            raise ValueError(
                f"int4: input width {in_features} is not a multiple of the group size {group_size}"
            )
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        # The kernel packs output rows 16 at a time: zero rows pad the weight, and
        # forward() drops their outputs.
        rows = -(-out_features // 16) * 16
        weight = torch.zeros(rows, in_features)
        weight[:out_features] = linear.weight.detach().float()
        groups = weight.reshape(rows, in_features // group_size, group_size)
        lo = groups.amin(-1, keepdim=True)
        scale = ((groups.amax(-1, keepdim=True) - lo) / 15).clamp_min(1e-12)
        levels = ((groups - lo) / scale).round_().clamp_(0, 15).to(torch.int32)
        # The kernel computes (level - 8) * scale + zero, so zero is the grid's level 8.
        zero = lo + 8 * scale
        scales_zeros = torch.stack([scale.flatten(1), zero.flatten(1)], dim=-1)  # [rows, groups, 2]
        self.register_buffer(
            "packed",
            torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                levels.reshape(rows, in_features), 1
            ),
        )
        self.register_buffer(
            "scales_zeros", scales_zeros.transpose(0, 1).contiguous().to(torch.bfloat16)
        )
        self.bias = None if linear.bias is None else linear.bias.detach().float().clone()
        # The wide copy holds the int4 grid's own weights, int8 per output channel, so
        # that a prompt pass sees (nearly) the weights the decode steps use.
        grid = (levels.float() * scale + lo).reshape(rows, in_features)[:out_features]
        copy = nn.Linear(in_features, out_features, bias=linear.bias is not None)
        with torch.no_grad():
            copy.weight.copy_(grid)
            if linear.bias is not None:
                copy.bias.copy_(linear.bias.detach().float())
        self.wide = _int8_per_channel(copy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] > INT4_MAX_ROWS:
            return self.wide(x)  # type: ignore[no-any-return]
        flat = flat.to(torch.bfloat16)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            flat, self.packed, self.group_size, self.scales_zeros
        )[:, : self.out_features].to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


def quantize_int4(model: nn.Module) -> tuple[tuple[nn.Module, nn.Module] | None, ...]:
    """Replace every ``nn.Linear`` of a draft model by an :class:`Int4Linear`.

    Decoder layers get fused q|k|v and gate|up projections first
    (:func:`fuse_projections`), converted layer by layer. Layers whose input
    width is not a multiple of the group size (only in tiny test models) stay
    fp32. Returns the fused projections per decoder layer.
    """
    if not int4_available():
        raise InvalidArgumentError(
            f"int4 precision needs torch's CPU int4 kernels, missing in torch {torch.__version__}"
        )

    def quantize(module: nn.Module) -> None:
        _replace_linears(module, Int4Linear, group=INT4_GROUP_SIZE)

    return _quantize_layer_by_layer(model, quantize)


def check_choice(kernels: str, precision: str) -> None:
    if kernels not in KERNELS:
        raise InvalidArgumentError(f"unknown kernels {kernels!r}; choose one of {list(KERNELS)}")
    if precision not in PRECISIONS:
        raise InvalidArgumentError(
            f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}"
        )


class PaddedLinear(nn.Module):
    """A plain ``nn.Linear`` whose calls of fewer than ``min_rows`` rows are padded with
    zero rows (see :class:`OneDNNLinear`)."""

    def __init__(self, linear: nn.Linear, *, min_rows: int) -> None:
        super().__init__()
        self.inner = linear
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.min_rows = min_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        flat = x.reshape(-1, self.in_features)
        rows = flat.shape[0]
        if rows < self.min_rows:
            flat = torch.cat([flat, flat.new_zeros(self.min_rows - rows, self.in_features)])
        out = self.inner(flat)[:rows]
        return out.reshape(*x.shape[:-1], self.out_features)  # type: ignore[no-any-return]


def apply_choices(model: nn.Module, choices: Mapping[tuple[int, int], Any]) -> dict[str, int]:
    """Swap each ``nn.Linear`` for the kernel chosen for its shape
    (:func:`verispec.models.tuning.choose_kernels`); returns layers per kernel."""
    counts: dict[str, int] = {}
    for name, child in list(model.named_modules()):
        if type(child) is not nn.Linear:
            continue
        choice = choices.get((child.out_features, child.in_features))
        if choice is None:
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if choice.kernel == "onednn":
            setattr(parent, attr, OneDNNLinear(child, min_rows=choice.min_rows))
        elif choice.min_rows > 1:
            setattr(parent, attr, PaddedLinear(child, min_rows=choice.min_rows))
        key = (
            f"{choice.kernel} (rows padded to {choice.min_rows})"
            if choice.min_rows > 1
            else choice.kernel
        )
        counts[key] = counts.get(key, 0) + 1
    return counts


def optimize(
    model: Any,
    *,
    device: str,
    kernels: str = "auto",
    precision: str = "fp32",
    batch_invariant: bool = True,
    cache_dir: Path | None = None,
) -> Kernels:
    """Apply the chosen kernels / precision to a loaded HF model in place.

    fp32 and bf16 on a CPU: each linear-layer shape gets the kernel measured fastest
    on this machine (:mod:`verispec.models.tuning`, cached in ``cache_dir``; for a
    target, ``batch_invariant``, only kernels that score each row alike in calls of
    any size). ``batch_invariant=False`` (drafts): int8 layers may let the rows of
    one call influence each other (cheaper per call; see :func:`quantize_int8`).
    Returns a short description of what was applied (for statistics and logs).
    """
    check_choice(kernels, precision)
    if precision in ("int4", "int8", "int8w") and device != "cpu":
        raise InvalidArgumentError(f"{precision} precision is a CPU option; use bf16 on a GPU")
    if precision == "int4":
        if batch_invariant:
            raise InvalidArgumentError(
                "int4 precision is for draft models only (load_model(..., batch_invariant=False), "
                "as --draft-precision does): a target's precision sets the output, and int4 is "
                "coarser than the bundled Q4_K_M weights' 6-bit tensors"
            )
        fused = quantize_int4(model)
        n = sum(f is not None for f in fused)
        groups = f"groups of {INT4_GROUP_SIZE}"
        return Kernels(f"int4 weights ({groups}; q|k|v and gate|up fused in {n} layers)", fused)
    if precision == "int8":
        fused = quantize_int8(model, per_row=batch_invariant)
        n = sum(f is not None for f in fused)
        how = "fbgemm, per-row activations and per-channel weights" if batch_invariant else "fbgemm"
        return Kernels(
            f"int8 dynamic quantization ({how}; q|k|v and gate|up fused in {n} layers)", fused
        )
    if precision == "int8w":
        if not int8_weight_only_available():
            raise InvalidArgumentError(
                f"int8w precision needs torch._weight_int8pack_mm, missing in torch "
                f"{torch.__version__}"
            )
        fused = _quantize_layer_by_layer(
            model, lambda module: _replace_linears(module, Int8WeightOnlyLinear)
        )
        n = sum(f is not None for f in fused)
        return Kernels(
            f"int8 weights, bf16 activations (weight-only; q|k|v and gate|up fused in {n} layers)",
            fused,
        )
    if device != "cpu" or precision == "fp16":
        return Kernels(f"default {precision} kernels")
    if kernels == "default" or not onednn_available():
        return Kernels(f"default {precision} kernels")
    from verispec.models import tuning

    table = tuning.linear_table(model, [precision], target=batch_invariant, cache_dir=cache_dir)
    choices = tuning.choose_kernels(
        table,
        precision,
        exact=batch_invariant,
        use_rows=tuning.TARGET_ROWS if batch_invariant else tuning.DRAFT_ROWS,
        only="onednn" if kernels == "onednn" else None,
    )
    counts = apply_choices(model, choices)
    names = {"onednn": "oneDNN prepacked", "default": "default"}
    parts = ", ".join(f"{names.get(k, k)} in {n}" for k, n in sorted(counts.items()))
    inexact = batch_invariant and not all(c.exact for c in choices.values())
    note = "; rows NOT exact across pass sizes" if inexact else ""
    return Kernels(f"{precision} by measurement: {parts} linear layers{note}")
