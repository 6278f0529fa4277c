"""Model backends: load a causal LM and score several new positions against a KV cache.

A model here is anything with the small :class:`LanguageModel` interface: it
makes per-sequence caches and ``forward(cache, tokens)`` appends ``tokens`` to
the cache and returns logits for (the last ``num_logits`` of) them. Rolling
back is :meth:`ModelCache.crop`. The engine and the drafters use nothing else,
so tests can plug in a tiny table model and the server can batch sequences.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from verispec.errors import (
    IncompatibleTokenizersError,
    InvalidArgumentError,
    ModelFormatError,
    ModelNotFoundError,
    VerispecError,
)
from verispec.models import kernels as kernels_module

RUNNERS = ("auto", "lean", "hf")


class ModelCache(Protocol):
    """Per-sequence state of a model: the positions it has seen."""

    @property
    def length(self) -> int: ...

    def crop(self, length: int) -> None:
        """Forget every position from ``length`` on."""
        ...


class LanguageModel(Protocol):
    """What the engine needs from a model.

    ``forward_batch`` scores new tokens for several sequences at once (each its own
    cache, ragged lengths); a model without a batched pass runs them one by one
    (:func:`forward_each`). ``supports_tree``: ``forward_batch`` takes ``parents``
    (token trees) and the model's caches can ``move`` a position (:class:`TreeCache`).
    """

    name: str
    vocab_size: int  # width of the logits
    max_context: int
    eos_token_ids: frozenset[int]
    tokenizer: Any  # a transformers tokenizer, or None for id-only models
    supports_tree: bool

    def new_cache(self) -> Any: ...

    def forward(
        self, cache: Any, tokens: list[int], *, num_logits: int | None = None
    ) -> torch.Tensor:  # [num_logits or len(tokens), vocab] float32
        ...

    def forward_batch(
        self,
        caches: Sequence[Any],
        tokens: Sequence[list[int]],
        *,
        num_logits: Sequence[int] | None = None,
        parents: Sequence[list[int] | None] | None = None,
    ) -> list[torch.Tensor]:  # per sequence [num_logits[b] or len(tokens[b]), vocab] float32
        ...


class TreeCache(ModelCache, Protocol):
    """A cache that can copy one position over another (a verified tree's kept branch)."""

    def move(self, source: int, destination: int) -> None: ...


def forward_each(
    model: LanguageModel,
    caches: Sequence[Any],
    tokens: Sequence[list[int]],
    *,
    num_logits: Sequence[int] | None = None,
) -> list[torch.Tensor]:
    """``forward_batch`` for a model that has no batched pass: one sequence at a time."""
    counts = num_logits if num_logits is not None else [len(t) for t in tokens]
    return [
        model.forward(c, t, num_logits=m) for c, t, m in zip(caches, tokens, counts, strict=True)
    ]


@dataclass
class HFCache:
    """A transformers ``DynamicCache`` or a lean runner's ``LeanCache``, and its length."""

    kv: Any
    length: int = 0

    def crop(self, length: int) -> None:
        if length < 0:
            raise ValueError(f"cannot crop a cache to {length} positions")
        if length < self.length:
            self.kv.crop(length - self.length)  # transformers 5: a negative count drops positions
            self.length = length

    def move(self, source: int, destination: int) -> None:
        """Copy position ``source``'s keys and values over ``destination``'s (lean caches)."""
        self.kv.move(source, destination)


@dataclass
class HFModel:
    """A Hugging Face transformers causal LM behind the :class:`LanguageModel` interface."""

    hf: Any  # transformers PreTrainedModel
    tokenizer: Any
    name: str
    eos_token_ids: frozenset[int] = field(default_factory=frozenset)
    runner: str = "auto"  # "lean": verispec's direct loop over the modules; "hf": transformers'
    # Fused projections per decoder layer (kernels.Kernels.fused), which the lean runner
    # uses in place of the separate ones; this model owns them.
    fused: tuple[tuple[Any, Any] | None, ...] = ()
    # Score each position of a short pass exactly as a pass of its own would (reduced-
    # precision targets, whose rounding turns last-bit differences into visible ones).
    exact: bool = False

    def __post_init__(self) -> None:
        from verispec.models.lean import LeanRunner, lean_unsupported

        if self.runner not in RUNNERS:
            raise InvalidArgumentError(
                f"unknown runner {self.runner!r}; choose one of {list(RUNNERS)}"
            )
        self.lean: LeanRunner | None = None
        if self.runner != "hf":
            reason = lean_unsupported(self.hf)
            if reason is None:
                self.lean = LeanRunner(self.hf, self.fused, exact=self.exact)
            elif self.runner == "lean":
                raise InvalidArgumentError(f"{self.name}: no lean forward for {reason}")
        self.runner = "lean" if self.lean is not None else "hf"
        self.hf.eval()
        config = self.hf.config
        self.vocab_size: int = int(self.hf.get_output_embeddings().out_features)
        self.max_context: int = int(getattr(config, "max_position_embeddings", 0) or 2048)
        self.device: torch.device = next(self.hf.parameters()).device
        self.kernels: str = "default"  # what verispec.models.kernels.optimize applied
        self.precision: str = _dtype_name(next(self.hf.parameters()).dtype)
        # forward_batch takes token trees and caches move positions: the lean runner's
        self.supports_tree: bool = self.lean is not None

    def new_cache(self) -> HFCache:
        if self.lean is not None:
            return HFCache(kv=self.lean.new_cache())
        from transformers import DynamicCache

        # Full (non-sliding) layers for every model, so that rolling back never needs a
        # position a sliding-window layer already discarded.
        return HFCache(kv=DynamicCache())

    def forward(
        self, cache: HFCache, tokens: list[int], *, num_logits: int | None = None
    ) -> torch.Tensor:  # [num_logits or len(tokens), vocab] float32 on CPU
        """Append ``tokens`` to ``cache`` and score (the last ``num_logits`` of) them."""
        return self.forward_batch([cache], [tokens], num_logits=[num_logits or len(tokens)])[0]

    @torch.inference_mode()
    def forward_batch(
        self,
        caches: Sequence[HFCache],
        tokens: Sequence[list[int]],
        *,
        num_logits: Sequence[int] | None = None,
        parents: Sequence[list[int] | None] | None = None,
    ) -> list[torch.Tensor]:  # per sequence [num_logits[b] or len(tokens[b]), vocab]
        """Append ``tokens[b]`` to ``caches[b]`` for every b and score them, in one pass
        with the lean runner (:meth:`verispec.models.lean.LeanRunner.forward_batch`), one by one
        with transformers' forward. ``parents[b]`` (lean runner only) makes sequence b's
        tokens a tree."""
        if len(caches) != len(tokens) or not caches:
            raise ValueError("forward_batch needs one token list per cache, and at least one")
        counts = list(num_logits) if num_logits is not None else [len(t) for t in tokens]
        trees = list(parents) if parents is not None else [None] * len(tokens)
        for cache, toks, count in zip(caches, tokens, counts, strict=True):
            if not toks:
                raise ValueError("forward() needs at least one token")
            if not 1 <= count <= len(toks):
                raise ValueError(f"num_logits={count} for {len(toks)} tokens")
            if cache.length + len(toks) > self.max_context:
                raise VerispecError(
                    f"{self.name}: {cache.length + len(toks)} positions exceed the context "
                    f"window of {self.max_context}"
                )
        if self.lean is not None:
            ids = [torch.tensor(t, dtype=torch.long, device=self.device) for t in tokens]
            if len(caches) == 1 and trees[0] is None:
                out = [self.lean.forward(caches[0].kv, ids[0], counts[0])]
            else:
                out = self.lean.forward_batch([c.kv for c in caches], ids, counts, trees)
            for cache, toks in zip(caches, tokens, strict=True):
                cache.length += len(toks)
            return [logits.float().cpu() for logits in out]
        if any(tree is not None for tree in trees):
            raise InvalidArgumentError(f"{self.name}: token trees need the lean runner")
        results = []
        for cache, toks, count in zip(caches, tokens, counts, strict=True):
            ids2 = torch.tensor([toks], dtype=torch.long, device=self.device)  # [1, n]
            out2 = self.hf(input_ids=ids2, cache=cache.kv, use_cache=True, logits_to_keep=count)
            cache.length += len(toks)
            results.append(out2.logits[0, -count:].float().cpu())  # [count, vocab]
        return results


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def exact_rows_limit(model: LanguageModel) -> int | None:
    """The longest draft whose verification scores each position exactly as a pass of
    its own would (an int8 target's per-query attention), or None when any is."""
    if isinstance(model, HFModel) and model.lean is not None and model.lean.exact_rows:
        from verispec.models.lean import EXACT_ROWS_MAX

        return EXACT_ROWS_MAX - 1
    return None


def kernel_description(model: LanguageModel) -> str:
    """What runs ``model`` (runner, kernels, device), for keys of measured costs."""
    if isinstance(model, HFModel):
        return f"{model.runner}|{model.kernels}|{model.device}"
    return type(model).__name__


def _eos_ids(hf: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    gen_eos = getattr(getattr(hf, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, getattr(hf.config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_draft_precision(device: str) -> str | None:
    """A draft model's precision unless the user picks one: on a CPU, ``auto`` (the
    precision whose step is measured cheapest here, :func:`verispec.models.tuning.
    pick_draft_precision`), the device's default elsewhere. A draft's precision
    never changes the output, only how often its tokens are accepted."""
    if device != "cpu":
        return None
    return "auto"


def load_model(
    spec: str,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    device: str | None = None,
    precision: str | None = None,
    kernels: str = "auto",
    runner: str = "auto",
    batch_invariant: bool = True,
    compile_steps: bool | str = False,
    progress: bool = True,
) -> HFModel:
    """Load a model by preset name, local folder, GGUF file or hub id.

    Presets and GGUF files are converted once into the cache folder (see
    :mod:`verispec.models.presets`); later loads read safetensors and take seconds.
    ``precision`` defaults to fp32 on CPU (the bundled weights exactly as dequantized)
    and bf16 on CUDA; ``bf16`` runs bf16 weights and activations; ``int8`` (CPU)
    quantizes the linear layers' weights and activations, ``int8w`` their weights only;
    ``int4`` (CPU, draft models only: needs ``batch_invariant=False``) stores them in 4
    bits; ``auto``: for a target the fastest precision on this machine whose greedy
    answers agree with fp32's, for a draft the one with the cheapest step
    (:mod:`verispec.models.tuning`, measured once and cached). A precision this machine
    cannot run is refused. ``kernels`` picks the CPU matmul kernels
    (:mod:`verispec.models.kernels`; ``auto``: per layer shape, by measurement).
    ``runner`` picks the forward pass: ``lean`` (:mod:`verispec.models.lean`, Llama
    and Qwen2), ``hf`` (transformers') or ``auto`` (lean where supported).
    ``batch_invariant=False`` lets an int8 model's rows of one pass influence each
    other (fbgemm's per-call activation scale): a little faster, for draft models
    only, since a target's positions must score the same verified together or alone.
    ``compile_steps`` runs one-position passes through ``torch.compile``
    (:meth:`verispec.models.lean.LeanRunner.compile_steps`; CPU and the lean runner only):
    for draft models, whose decoding steps it makes about a fifth cheaper here and
    whose scores never change the output. ``"auto"`` compiles int4 models where it can
    (the one case measured to gain).
    """

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from verispec.models import presets

    source = presets.resolve_model_dir(
        spec, cache_dir=Path(cache_dir) if cache_dir else None, progress=progress
    )
    device = device or default_device()
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise InvalidArgumentError(f"unknown device {device!r}; use cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidArgumentError("--device cuda was asked for but no CUDA GPU is available")
    from verispec.models import tuning

    precision = precision or ("bf16" if device.startswith("cuda") else "fp32")
    if precision == "auto" and device != "cpu":
        precision = "bf16"
    tuning_dir = Path(cache_dir) if cache_dir else presets.default_cache_dir()
    chosen = ""
    if precision == "auto" and batch_invariant:  # a target: by speed and greedy agreement
        precision, chosen = _auto_target_precision(
            spec, source, tuning_dir, device=device, kernels=kernels, runner=runner
        )
    elif precision == "auto":  # a draft: the cheapest whole step, loaded as it will run
        precision, chosen = _auto_draft_precision(
            spec, source, tuning_dir, kernels=kernels, runner=runner, compile_steps=compile_steps
        )
    if precision != "auto":
        kernels_module.check_choice(kernels, precision)
        runnable = tuning.runnable_precisions(device, target=batch_invariant)
        if precision not in runnable and precision != "int4":
            raise InvalidArgumentError(
                f"precision {precision!r} cannot run on this machine ({device}, torch "
                f"{torch.__version__}); it can run {runnable}"
            )
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a warm load takes seconds; its bar is noise
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        hf = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    except OSError as exc:  # transformers reports missing files / unknown hub ids as OSError
        raise ModelNotFoundError(f"cannot load model {spec!r}: {exc}") from exc
    except (ValueError, KeyError) as exc:
        raise ModelFormatError(f"cannot load model {spec!r}: {exc}") from exc
    hf = hf.to(device)  # type: ignore[arg-type]
    hf.eval()
    applied = kernels_module.optimize(
        hf,
        device=device,
        kernels=kernels,
        precision=precision,
        batch_invariant=batch_invariant,
        cache_dir=tuning_dir,
    )
    name = os.path.basename(spec.rstrip("/")) or spec
    model = HFModel(
        hf=hf,
        tokenizer=tokenizer,
        name=name,
        eos_token_ids=_eos_ids(hf, tokenizer),
        runner=runner,
        fused=applied.fused,
        exact=batch_invariant and precision != "fp32",
    )
    model.precision = precision
    model.kernels = applied.description + chosen + _compile_steps(model, compile_steps, device)
    return model


def _config_identity(spec: str, source: str) -> str:
    import json

    config = Path(source) / "config.json"
    return json.dumps(json.loads(config.read_text()), sort_keys=True) if config.exists() else spec


def _auto_draft_precision(
    spec: str, source: str, cache_dir: Path, *, kernels: str, runner: str, compile_steps: bool | str
) -> tuple[str, str]:
    """A CPU draft's precision: its whole one-position step measured at each candidate
    (:func:`verispec.models.tuning.pick_draft_precision`); returns it and a note."""
    from verispec.models import tuning

    runnable = tuning.runnable_precisions("cpu", target=False)
    candidates = [p for p in tuning.DRAFT_PRECISIONS if p in runnable]

    def load(precision: str) -> HFModel:
        return load_model(
            source,
            device="cpu",
            precision=precision,
            kernels=kernels,
            runner=runner,
            batch_invariant=False,
            compile_steps=compile_steps,
            cache_dir=cache_dir,
            progress=False,
        )

    steps = tuning.draft_steps(
        spec,
        _config_identity(spec, source),
        load,
        cache_dir=cache_dir,
        precisions=candidates,
        log=lambda line: print(line, file=sys.stderr),
    )
    best = tuning.pick_draft_precision(steps)
    listed = ", ".join(f"{p} {s * 1e3:.1f} ms" for p, s in steps.items())
    return best, f"; precision chosen by measurement (step: {listed})"


def _auto_target_precision(
    spec: str, source: str, cache_dir: Path, *, device: str, kernels: str, runner: str
) -> tuple[str, str]:
    """``--precision auto`` for a target: the fastest precision whose greedy answers agree
    with fp32's (:func:`verispec.models.tuning.pick_precision`); returns it and a note."""
    import json

    from verispec.models import tuning

    config = Path(source) / "config.json"
    identity = (
        json.dumps(json.loads(config.read_text()), sort_keys=True) if config.exists() else spec
    )
    runnable = tuning.runnable_precisions(device, target=True)
    candidates = [p for p in tuning.TARGET_PRECISIONS if p in runnable]

    def load(precision: str) -> HFModel:
        return load_model(
            source,
            device=device,
            precision=precision,
            kernels=kernels,
            runner=runner,
            cache_dir=cache_dir,
            progress=False,
        )

    trials = tuning.cached_trials(
        spec,
        identity,
        load,
        cache_dir=cache_dir,
        precisions=candidates,
        log=lambda line: print(line, file=sys.stderr),
    )
    best = tuning.pick_precision(trials)
    listed = ", ".join(
        f"{t.precision} {t.pass_seconds[0] * 1e3:.0f} ms/{t.agreement:.0%}" for t in trials
    )
    return best.precision, f"; precision auto (pass time / greedy agreement with fp32: {listed})"


def _compile_steps(model: HFModel, choice: bool | str, device: str) -> str:
    """Apply ``load_model(compile_steps=...)``; returns what to add to ``model.kernels``."""
    from verispec.models.lean import compiler_missing

    if choice not in (True, False, "auto"):
        raise InvalidArgumentError(f"compile_steps must be True, False or 'auto', got {choice!r}")
    if choice is False:
        return ""
    if device != "cpu":
        why_not: str | None = f"device {device} (compiled steps are a CPU option)"
    elif model.lean is None:
        why_not = f"it has no lean forward (runner {model.runner})"
    elif any(isinstance(m, kernels_module.OneDNNLinear) for m in model.hf.modules()):
        why_not = "torch.compile cannot trace oneDNN prepacked layers (--kernels default can be)"
    else:
        why_not = compiler_missing()
    # int8 steps do not gain (fbgemm's quantized ops split the graph) and oneDNN layers
    # cannot be traced; so auto compiles int4 models only (docs/tuning.md has the timings).
    int4 = any(isinstance(m, kernels_module.Int4Linear) for m in model.hf.modules())
    if choice == "auto" and (why_not is not None or not int4):
        return ""
    if why_not is not None:
        raise InvalidArgumentError(f"cannot compile {model.name}'s steps: {why_not}")
    assert model.lean is not None
    failure = model.lean.compile_steps()
    if failure is not None:
        warnings.warn(f"{model.name}: steps not compiled: {failure}", stacklevel=3)
        return f"; steps not compiled ({failure})"
    return "; one-position steps compiled (torch.compile)"


def check_tokenizers_compatible(target: Any, draft: Any) -> None:
    """Refuse a draft whose tokenizer differs from the target's.

    Draft tokens are fed to the target by id, so the two vocabularies must map
    every id to the same string and agree on the special tokens.
    """
    if target is None or draft is None:
        return
    t_vocab, d_vocab = target.get_vocab(), draft.get_vocab()
    if len(t_vocab) != len(d_vocab):
        raise IncompatibleTokenizersError(
            f"tokenizers differ: target vocabulary has {len(t_vocab)} tokens, "
            f"draft has {len(d_vocab)}"
        )
    if t_vocab != d_vocab:
        t_by_id = {i: s for s, i in t_vocab.items()}
        d_by_id = {i: s for s, i in d_vocab.items()}
        first = min(i for i in set(t_by_id) | set(d_by_id) if t_by_id.get(i) != d_by_id.get(i))
        raise IncompatibleTokenizersError(
            f"tokenizers differ: token id {first} is {t_by_id.get(first)!r} in the target "
            f"but {d_by_id.get(first)!r} in the draft"
        )
    for attr in ("bos_token_id", "eos_token_id", "unk_token_id"):
        t_id, d_id = getattr(target, attr, None), getattr(draft, attr, None)
        if t_id != d_id and t_id is not None and d_id is not None:
            raise IncompatibleTokenizersError(
                f"tokenizers differ: {attr} is {t_id} in the target but {d_id} in the draft"
            )
