"""OpenVINO GenAI as a benchmark peer: exporting models to OpenVINO IR, and running them.

**Export.** :func:`export_model` turns one of verispec's converted transformers folders
(:func:`verispec.models.presets.resolve_model_dir`) into the folder ``LLMPipeline`` reads,
``<cache>/openvino/<name>-<weights>/``:

================================ ===========================================================
``openvino_model.xml/.bin``      the decoder, traced with ``ov.convert_model`` from the
                                 transformers module (SDPA attention), made stateful the way
                                 optimum-intel does it (KV cache as internal variables, a
                                 ``beam_idx`` input that reorders it), weights compressed by
                                 NNCF: ``int8`` = int8 asymmetric per output channel, ``int4``
                                 = int4 asymmetric in groups of 128 (embedding and head int8),
                                 ``bf16`` = uncompressed bf16
``openvino_(de)tokenizer.xml``   the tokenizer and detokenizer, by ``openvino_tokenizers``
``config.json`` and friends      copied from the source folder
``verispec-openvino.json``       the marker, written last: what was exported from what
================================ ===========================================================

optimum-intel's ``optimum-cli export openvino`` does the same, but its only release pins
transformers below the one verispec runs and pulls in torchvision, so verispec does the
few steps itself. The module is loaded in bf16 and traced through OpenVINO's own 16-bit
patch (``openvino.frontend.pytorch.patch_model``): linear and embedding weights become bf16
constants followed by a conversion to float32, every other parameter becomes float32, so
the IR computes in float32 (until the CPU plugin picks its own precision) while the export
holds half the memory of a float32 load. The IR's constants share the module's memory, so
the module lives until the IR is saved. A folder without the marker is a half-written
export and is redone. ``python -m verispec.bench.openvino export`` exports the default pair.

**Peer.** :func:`open_peer` opens two ``openvino_genai.LLMPipeline`` on the CPU, one plain and
one with ``draft_model(...)``, both with ``INFERENCE_NUM_THREADS`` threads, kept until
:meth:`OpenVINOPeer.close`. Prompts go in as token ids (``TokenizedInputs``), tokens come
back as ids (``EncodedResults``); decoding is greedy, stops at ``max_new_tokens`` or at one
of the EOS ids (``stop_token_ids``). The CPU plugin runs with its defaults: on a CPU with
bf16 instructions that is bf16 arithmetic, activations of the int8 and int4 matmuls
quantized on the fly, and an 8-bit KV cache. :attr:`OpenVINOPeer.precision` says which.

Timing comes from a streamer: the pipeline calls ``write`` once per target pass with the
tokens that pass emitted (the prompt pass emits the first token; a speculative pass emits
the accepted draft tokens plus the target's own next token), so the time of each ``write``
is the end of one pass. The pipeline may call the streamer from a thread of its own, so
these are the times the tokens reached the streamer.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import shutil
import sys
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

from verispec.bench.peers import PeerRun, PeerUnavailableError
from verispec.errors import InvalidArgumentError, VerispecError
from verispec.models.presets import (
    DEFAULT_DRAFT,
    DEFAULT_TARGET,
    default_cache_dir,
    find_preset,
    resolve_model_dir,
)

ENGINE = "OpenVINO GenAI"
WEIGHTS = ("int8", "int4", "bf16")
TARGET_WEIGHTS = "int8"
DRAFT_WEIGHTS = "int4"
# The best of 2/4/8 in the sweep recorded in docs/tuning.md ("OpenVINO GenAI settings").
DEFAULT_NUM_ASSISTANT_TOKENS = 4
MARKER = "verispec-openvino.json"
INSTALL_COMMAND = "pip install 'verispec[openvino]' && python -m verispec.bench.openvino export"
_COPIED = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
)
_NNCF_MODES = {"int8": "INT8_ASYM", "int4": "INT4_ASYM"}


# --- where exports live ----------------------------------------------------------------------


def model_name(spec: str) -> str:
    """The short name of a model spec: its preset's name, else its folder or file name."""
    preset = find_preset(spec)
    if preset is not None:
        return preset.name
    path = Path(spec).expanduser()
    return path.stem if path.is_file() else path.name


def export_dir(spec: str, weights: str, cache_dir: Path | None = None) -> Path:
    """``<cache>/openvino/<name>-<weights>``, whether or not it has been exported."""
    _check_weights(weights)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return cache / "openvino" / f"{model_name(spec)}-{weights}"


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker of a finished export in ``folder``, or None (absent, unreadable)."""
    try:
        record = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _check_weights(weights: str) -> None:
    if weights not in WEIGHTS:
        raise InvalidArgumentError(f"weights must be one of {', '.join(WEIGHTS)}, not {weights!r}")


# --- export ----------------------------------------------------------------------------------


def export_model(
    spec: str,
    *,
    weights: str,
    cache_dir: Path | None = None,
    log: Callable[[str], Any] = print,
) -> Path:
    """Export ``spec`` to OpenVINO IR with ``weights`` ("int8", "int4", "bf16"); return the folder.

    A finished export (its marker present) is returned as it is; anything else in the
    folder is removed and exported again. Needs ``openvino``, ``openvino-tokenizers`` and,
    for int8/int4, ``nncf`` (the ``openvino`` extra).
    """
    out = export_dir(spec, weights, cache_dir)
    if read_marker(out) is not None:
        return out
    ov = _import("openvino")
    ov_tokenizers = _import("openvino_tokenizers")
    nncf = _import("nncf") if weights in _NNCF_MODES else None
    src = Path(resolve_model_dir(spec, cache_dir=cache_dir))
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    start = time.perf_counter()
    log(f"exporting {src.name} to OpenVINO IR ({weights} weights) into {out}")
    ov_model, torch_model = _trace(ov, src)
    log(f"  traced in {time.perf_counter() - start:.0f} s")
    _make_stateful(ov, ov_model)
    if nncf is not None:
        mode = getattr(nncf.CompressWeightsMode, _NNCF_MODES[weights])
        group = {"group_size": 128, "ratio": 1.0} if weights == "int4" else {}
        ov_model = nncf.compress_weights(ov_model, mode=mode, **group)
        log(f"  compressed in {time.perf_counter() - start:.0f} s")
    ov.save_model(ov_model, out / "openvino_model.xml", compress_to_fp16=False)
    del ov_model, torch_model
    _export_tokenizer(ov, ov_tokenizers, src, out)
    for name in _COPIED:
        if (src / name).exists():
            shutil.copy2(src / name, out / name)
    record = {
        "source": str(src),
        "source_record": _read_json(src / "verispec-source.json"),
        "weights": weights,
        "nncf_mode": _NNCF_MODES.get(weights),
        "int4_group_size": 128 if weights == "int4" else None,
        "openvino": ov.__version__,
        "nncf": getattr(nncf, "__version__", None),
        "seconds": round(time.perf_counter() - start, 1),
    }
    (out / MARKER).write_text(json.dumps(record, indent=2) + "\n")  # last: the export is whole
    log(f"  done in {record['seconds']:.0f} s")
    return out


def _trace(ov: Any, src: Path) -> tuple[Any, Any]:
    """The decoder of ``src`` as a stateless ``ov.Model`` (ids, mask, positions, past K/V in;
    logits and present K/V out, named as optimum-intel names them), and the transformers
    module whose bf16 weights the model's constants share: keep it until the IR is saved."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.cache_utils import DynamicCache, DynamicLayer
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            src, dtype=torch.bfloat16, attn_implementation="sdpa"
        )
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model.eval()
    if not all(type(layer) is DynamicLayer for layer in DynamicCache(config=model.config).layers):
        raise InvalidArgumentError(
            f"{src.name}: only decoders whose every layer has a full-attention cache are exported"
        )
    config = model.config
    n_layers = int(config.num_hidden_layers)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    head_dim = int(
        getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    )

    class Flat(torch.nn.Module):
        """The model with its cache as a flat tuple of tensors, for tracing."""

        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(
            self, input_ids: Any, attention_mask: Any, position_ids: Any, *past: Any
        ) -> Any:
            cache = DynamicCache(config=self.inner.config)
            layers: list[Any] = list(cache.layers)
            for i, layer in enumerate(layers):  # filled directly: no concat with an empty one
                layer.keys, layer.values = past[2 * i], past[2 * i + 1]
                layer.is_initialized = True
                layer.device, layer.dtype = past[0].device, past[0].dtype
            out = self.inner(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
                return_dict=True,
            )
            flat = [out.logits]
            for layer in out.past_key_values.layers:
                flat += [layer.keys, layer.values]
            return tuple(flat)

    batch, new, past_len = 2, 3, 5
    example = [
        torch.randint(0, 100, (batch, new)),  # [b, new]
        torch.ones(batch, past_len + new, dtype=torch.long),  # [b, past + new]
        torch.arange(past_len, past_len + new).expand(batch, new).contiguous(),  # [b, new]
    ]
    example += [torch.zeros(batch, kv_heads, past_len, head_dim) for _ in range(2 * n_layers)]
    shapes = [[-1, -1]] * 3 + [[-1, kv_heads, -1, head_dim]] * (2 * n_layers)
    in_names = ["input_ids", "attention_mask", "position_ids"]
    out_names = ["logits"]
    for i in range(n_layers):
        in_names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        out_names += [f"present.{i}.key", f"present.{i}.value"]
    patch = importlib.import_module("openvino.frontend.pytorch.patch_model")
    getattr(patch, "__make_16bit_traceable")(model)  # bf16 constants, float32 activations
    try:
        with torch.no_grad(), _quiet():
            ov_model = ov.convert_model(
                Flat(model),
                example_input=tuple(example),
                input=[ov.PartialShape(s) for s in shapes],
            )
    finally:
        patch.unpatch_model(model, "_openvino_module_extension_patch_orig_forward")
    for port, name in zip(ov_model.inputs, in_names, strict=True):
        port.get_tensor().set_names({name})
    for port, name in zip(ov_model.outputs, out_names, strict=True):
        port.get_tensor().set_names({name})
    return ov_model, model


def _make_stateful(ov: Any, ov_model: Any) -> None:
    """Hide the K/V inputs and outputs inside ``ov_model`` as variables, with a ``beam_idx``
    input that gathers the cache along the batch first (as optimum-intel's stateful export)."""
    import numpy as np
    from openvino import opset13
    from openvino._offline_transformations import apply_make_stateful_transformation

    kv_in = [p.get_any_name() for p in ov_model.inputs if "past_key_values" in p.get_any_name()]
    kv_out = [p.get_any_name() for p in ov_model.outputs if "present" in p.get_any_name()]
    batch = ov_model.input("input_ids").get_partial_shape()[0]
    beam_idx = opset13.parameter(name="beam_idx", dtype=ov.Type.i32, shape=ov.PartialShape([batch]))
    beam_idx.output(0).get_tensor().add_names({"beam_idx"})
    ov_model.add_parameters([beam_idx])
    for name in kv_in:
        port = ov_model.input(name)
        consumers = port.get_target_inputs()
        gather = opset13.gather(port, beam_idx, opset13.constant(0))
        for consumer in consumers:
            consumer.replace_source_output(gather.output(0))
    ov_model.validate_nodes_and_infer_types()
    apply_make_stateful_transformation(ov_model, dict(zip(kv_in, kv_out, strict=True)))
    # Each variable starts as zeros of shape [batch, heads, 0, head_dim], batch from input_ids.
    ids_shape = opset13.shape_of(ov_model.input("input_ids"), output_type="i64")
    batch_dim = opset13.gather(ids_shape, opset13.constant([0]), opset13.constant(0))
    for op in ov_model.get_ops():
        if op.get_type_name() != "ReadValue":
            continue
        dims: list[Any] = [d.min_length for d in op.get_output_partial_shape(0)]
        dims[0] = batch_dim
        parts = [
            opset13.constant(np.array([d], dtype=np.int64)) if isinstance(d, int) else d
            for d in dims
        ]
        zero = opset13.constant(0.0, dtype=op.get_output_element_type(0))
        op.set_arguments([opset13.broadcast(zero, opset13.concat(parts, axis=0))])
    ov_model.validate_nodes_and_infer_types()


def _export_tokenizer(ov: Any, ov_tokenizers: Any, src: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src)
    encoder, decoder = ov_tokenizers.convert_tokenizer(tokenizer, with_detokenizer=True)
    ov.save_model(encoder, out / "openvino_tokenizer.xml")
    ov.save_model(decoder, out / "openvino_detokenizer.xml")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the tracer's warnings about Python values it freezes into the graph."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _import(module: str) -> Any:
    """``import module``, or PeerUnavailableError naming the install command."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise PeerUnavailableError(
            f"OpenVINO GenAI peer: {module} is not installed ({exc}); run: {INSTALL_COMMAND}"
        ) from exc


# --- the peer --------------------------------------------------------------------------------


def open_peer(
    target: str,
    draft: str | None,
    *,
    threads: int = 2,
    cache_dir: Path | None = None,
    num_assistant_tokens: int | None = None,
    target_weights: str = TARGET_WEIGHTS,
    draft_weights: str = DRAFT_WEIGHTS,
) -> OpenVINOPeer:
    """The OpenVINO GenAI peer on the exports of ``target`` and ``draft`` (int8 and int4 unless
    ``target_weights`` / ``draft_weights`` say otherwise).

    Never exports: a missing export or a missing ``openvino_genai`` raises
    PeerUnavailableError with the one command that fixes it.
    """
    if threads < 1:
        raise InvalidArgumentError(f"threads must be at least 1, not {threads}")
    n_assist = (
        DEFAULT_NUM_ASSISTANT_TOKENS if num_assistant_tokens is None else num_assistant_tokens
    )
    if n_assist < 1:
        raise InvalidArgumentError(f"num_assistant_tokens must be at least 1, not {n_assist}")
    target_dir = _exported(target, target_weights, cache_dir)
    draft_dir = _exported(draft, draft_weights, cache_dir) if draft is not None else None
    genai = _import("openvino_genai")
    return OpenVINOPeer(
        genai,
        target_dir,
        draft_dir,
        threads=threads,
        num_assistant_tokens=n_assist,
    )


def _exported(spec: str, weights: str, cache_dir: Path | None) -> Path:
    folder = export_dir(spec, weights, cache_dir)
    if read_marker(folder) is None:
        name = model_name(spec)
        default = {
            (model_name(DEFAULT_TARGET), TARGET_WEIGHTS),
            (model_name(DEFAULT_DRAFT), DRAFT_WEIGHTS),
        }
        command = (
            INSTALL_COMMAND
            if (name, weights) in default
            else f"{INSTALL_COMMAND} --model {spec} --weights {weights}"
        )
        if cache_dir is not None:
            command += f" --cache-dir {cache_dir}"
        raise PeerUnavailableError(
            f"OpenVINO GenAI peer: {name} has no {weights} export in {folder}; run: {command}"
        )
    return folder


class OpenVINOPeer:
    """Two ``LLMPipeline`` on the CPU: one plain on the target, one with the draft model.

    ``num_assistant_tokens`` (draft tokens per speculative pass) is read at each speculative
    :meth:`generate`, so a sweep may change it between calls.
    """

    engine = ENGINE

    def __init__(
        self,
        genai: Any,
        target_dir: Path,
        draft_dir: Path | None,
        *,
        threads: int,
        num_assistant_tokens: int,
    ) -> None:
        self._genai = genai
        self.num_assistant_tokens = num_assistant_tokens
        props = {"INFERENCE_NUM_THREADS": threads}
        self._plain: Any = genai.LLMPipeline(str(target_dir), "CPU", **props)
        self._speculative: Any = None
        if draft_dir is not None:
            self._speculative = genai.LLMPipeline(
                str(target_dir),
                "CPU",
                draft_model=genai.draft_model(str(draft_dir), "CPU", **props),
                **props,
            )
        compute = _cpu_defaults()
        self.precision = _describe(target_dir, compute)
        self.draft_precision = _describe(draft_dir, compute) if draft_dir is not None else None
        spec = (
            f"draft_model, num_assistant_tokens={num_assistant_tokens}"
            if draft_dir is not None
            else "no draft"
        )
        self.build = (
            f"openvino-genai {_version(genai)} (PyPI wheel), CPU, {threads} threads, "
            f"IR exported by verispec (ov.convert_model + NNCF); speculative: {spec}"
        )

    def generate(
        self,
        prompt_ids: Sequence[int],
        *,
        max_new_tokens: int,
        speculative: bool,
        eos_token_ids: Collection[int],
    ) -> PeerRun:
        """Greedy decoding of ``prompt_ids``, plain or with the draft model."""
        import numpy as np
        import openvino as ov

        pipe = self._speculative if speculative else self._plain
        if pipe is None:
            raise InvalidArgumentError("this OpenVINO GenAI peer was opened without a draft")
        genai = self._genai
        ids = np.asarray([list(prompt_ids)], dtype=np.int64)  # [1, n]
        inputs = genai.TokenizedInputs(ov.Tensor(ids), ov.Tensor(np.ones_like(ids)))
        config = genai.GenerationConfig()
        config.max_new_tokens = max_new_tokens
        config.do_sample = False
        eos = sorted(int(t) for t in eos_token_ids)
        if eos:
            config.eos_token_id = eos[0]
            config.stop_token_ids = set(eos)
            config.ignore_eos = False
        else:  # nothing to stop on: run to max_new_tokens
            config.stop_token_ids = set()
            config.ignore_eos = True
        if speculative:
            config.num_assistant_tokens = self.num_assistant_tokens
        start = time.perf_counter()
        streamer = _pass_streamer(genai, start)
        result = pipe.generate(inputs, config, streamer)
        total = time.perf_counter() - start
        tokens = [int(t) for t in result.tokens[0]]
        ends, counts = _reconcile(streamer.ends, streamer.counts, len(tokens), total)
        drafted, accepted = _draft_counts(result) if speculative else (None, None)
        return PeerRun(
            token_ids=tokens,
            time_total=total,
            pass_ends=ends,
            pass_tokens=counts,
            drafted=drafted,
            accepted=accepted,
        )

    def close(self) -> None:
        """Drop both pipelines (their compiled models and KV caches)."""
        self._plain = None
        self._speculative = None


def _pass_streamer(genai: Any, start: float) -> Any:
    """A ``StreamerBase`` recording, per ``write`` (one target pass), its time and token count."""

    class PassStreamer(genai.StreamerBase):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.ends: list[float] = []
            self.counts: list[int] = []

        def write(self, token: int | Sequence[int]) -> Any:
            self.ends.append(time.perf_counter() - start)
            self.counts.append(1 if isinstance(token, int) else len(token))
            return genai.StreamingStatus.RUNNING

        def end(self) -> None:
            pass

    return PassStreamer()


def _reconcile(
    ends: list[float], counts: list[int], n_tokens: int, total: float
) -> tuple[list[float], list[int]]:
    """Passes whose token counts add up to ``n_tokens``: cut streamed counts past it, and put
    tokens the streamer never saw into a last pass ending at ``total``."""
    out_ends: list[float] = []
    out_counts: list[int] = []
    seen = 0
    for end, count in zip(ends, counts, strict=True):
        take = min(count, n_tokens - seen)
        if take <= 0:
            break
        out_ends.append(end)
        out_counts.append(take)
        seen += take
    if seen < n_tokens:
        out_ends.append(total)
        out_counts.append(n_tokens - seen)
    return out_ends, out_counts


def _draft_counts(result: Any) -> tuple[int | None, int | None]:
    """Draft tokens proposed and accepted, from the speculative pipeline's perf metrics."""
    metrics: Any = getattr(result, "extended_perf_metrics", None)
    try:
        return int(metrics.get_num_draft_tokens()), int(metrics.get_num_accepted_tokens())
    except (AttributeError, TypeError, RuntimeError):
        return None, None


def _cpu_defaults() -> dict[str, str]:
    """The CPU plugin's default arithmetic and KV cache precision on this machine."""
    import openvino as ov

    core = ov.Core()
    found: dict[str, str] = {}
    for key in ("INFERENCE_PRECISION_HINT", "KV_CACHE_PRECISION"):
        with contextlib.suppress(RuntimeError, TypeError):
            found[key] = str(core.get_property("CPU", key))
    return found


def _describe(folder: Path, compute: dict[str, str]) -> str:
    """E.g. ``int8 weights (NNCF INT8_ASYM), bf16 compute, u8 KV cache (CPU plugin defaults)``."""
    record = read_marker(folder) or {}
    weights = record.get("weights", "?")
    mode = record.get("nncf_mode")
    head = f"{weights} weights" + (f" (NNCF {mode}" if mode else "")
    if record.get("int4_group_size"):
        head += f", groups of {record['int4_group_size']}"
    head += ")" if mode else ""
    extra = []
    if "INFERENCE_PRECISION_HINT" in compute:
        extra.append(f"{_short_type(compute['INFERENCE_PRECISION_HINT'])} compute")
    if "KV_CACHE_PRECISION" in compute:
        extra.append(f"{_short_type(compute['KV_CACHE_PRECISION'])} KV cache")
    return head + (f", {', '.join(extra)} (CPU plugin defaults)" if extra else "")


def _short_type(name: str) -> str:
    """``<Type: 'bfloat16'>`` -> ``bf16``; ``uint8_t`` -> ``u8``."""
    text = name.split("'")[1] if "'" in name else name
    return {"bfloat16": "bf16", "uint8_t": "u8", "float32": "f32", "float16": "f16"}.get(text, text)


def _version(module: Any) -> str:
    version = getattr(module, "__version__", None) or getattr(module, "get_version", lambda: "?")()
    return str(version).split("-")[0]


# --- command line ----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m verispec.bench.openvino export``: export the default pair (or one model)."""
    parser = argparse.ArgumentParser(prog="python -m verispec.bench.openvino")
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="export models to OpenVINO IR for the bench's peer")
    export.add_argument("--target", default=DEFAULT_TARGET, help=f"default {DEFAULT_TARGET}")
    export.add_argument("--draft", default=DEFAULT_DRAFT, help=f"default {DEFAULT_DRAFT}")
    export.add_argument(
        "--model", help="export only this model (with --weights) instead of the pair"
    )
    export.add_argument("--weights", choices=WEIGHTS, default=TARGET_WEIGHTS)
    export.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    jobs = (
        [(args.model, args.weights)]
        if args.model
        else [(args.target, TARGET_WEIGHTS), (args.draft, DRAFT_WEIGHTS)]
    )
    try:
        for spec, weights in jobs:  # one at a time: each export holds one model in memory
            folder = export_model(spec, weights=weights, cache_dir=args.cache_dir)
            print(f"{model_name(spec)} {weights}: {folder}")
    except VerispecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
