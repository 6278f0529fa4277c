"""Run every configuration on every prompt, interleaved, and record each run.

Measurement protocol:

1. Each configuration is warmed up once (a short generation on the first prompt).
2. Prompts are run one at a time; for each prompt every configuration runs,
   in an order rotated by one per prompt, so that machine drift (other load,
   heat, frequency) hits all configurations alike.
3. A multi-turn prompt (MT-bench) asks its second turn after the model's own
   first-turn answer: the plain configuration's greedy answer, reused for every
   configuration, so that all of them see identical token ids. With prefix
   caching (the default), each verispec configuration, plain included, has its
   own :class:`~verispec.PrefixCache`: its second turn reuses the caches its own
   first turn left, as a chat served by verispec would; the transformers peers
   score every prompt in full, as ``generate()`` does. The caches are emptied
   after the warm-up, so a first turn never reuses more than the chat
   template's opening that the previous conversation shared.
4. Under greedy decoding every output is compared token for token with the
   plain configuration's output on the same prompt; a difference in a verispec
   configuration is a bug (verispec is lossless), and is reported as such. Each
   speculative configuration is also compared with its own engine's plain one
   (``matches_own_plain``: hf-assisted with hf-plain, llamacpp-spec with
   llamacpp-plain, ov-spec with ov-plain); a peer's difference is reported, not
   an error.

External peers (llama.cpp, OpenVINO GenAI: :class:`~verispec.bench.peers.ExternalPeer`)
are opened lazily, once per engine per run, by their module's ``open_peer`` with
the bench's model specs, and closed when the run ends. An engine that is not
installed (or fails to open) is skipped with one note naming its install
command; they decode greedily only, so a sampled run skips them.

The harness uses only the public API (:func:`verispec.stream`, the drafters,
and ``model.hf`` for the transformers peers), so faster kernels or a better
draft-length policy show up here without changes.
"""

from __future__ import annotations

import dataclasses
import importlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from verispec.bench.datasets import BenchPrompt
from verispec.bench.peers import ExternalPeer, PeerUnavailableError, hf_generate
from verispec.drafting import Drafter, DraftModelDrafter, HybridDrafter, PromptLookupDrafter
from verispec.engine import DraftLength
from verispec.errors import InvalidArgumentError
from verispec.generate import encode_prompt, stream
from verispec.models import LanguageModel
from verispec.models.presets import default_cache_dir
from verispec.policy.costs import CostModel, costs_for
from verispec.prefix import PrefixCache
from verispec.sampling import SamplingParams

WARMUP_TOKENS = 8

# External peer engines: BenchConfig.engine -> (module with open_peer, install command).
PEER_ENGINES: dict[str, tuple[str, str]] = {
    "llama.cpp": ("verispec.bench.llamacpp", "python -m verispec.bench.llamacpp build"),
    "openvino": (
        "verispec.bench.openvino",
        "pip install -e '.[openvino]' && python -m verispec.bench.openvino export",
    ),
}
# Each engine's plain configuration, which its speculative ones must reproduce.
OWN_PLAIN = {
    "verispec": "plain",
    "transformers": "hf-plain",
    "llama.cpp": "llamacpp-plain",
    "openvino": "ov-plain",
}
PEER_CONFIGS = {
    "llamacpp-plain": "llama.cpp",
    "llamacpp-spec": "llama.cpp",
    "ov-plain": "openvino",
    "ov-spec": "openvino",
}
PeerOpener = Callable[..., ExternalPeer]


@dataclass(frozen=True)
class BenchConfig:
    """One way of decoding: verispec with a drafter, or a peer engine."""

    name: str  # "plain", "draft-k4", "draft-auto", "lookup", "hf-plain", "llamacpp-spec", ...
    engine: str  # "verispec", "transformers", "llama.cpp" or "openvino"
    drafter: str  # "none", "model", "hybrid" or "lookup" ("model" for a peer's own drafting)
    k: DraftLength = 0  # draft length: an integer, "auto", or 0 (no drafter / peer default)
    siblings: bool = True  # "auto" drafts may carry token-tree siblings (greedy only)

    @property
    def speculative(self) -> bool:
        return self.drafter != "none"

    @property
    def external(self) -> bool:
        """Run by another engine through :class:`~verispec.bench.peers.ExternalPeer`."""
        return self.engine in PEER_ENGINES

    @property
    def own_plain(self) -> str | None:
        """The plain configuration of this one's engine, for a speculative one."""
        return OWN_PLAIN.get(self.engine) if self.speculative else None


def parse_configs(text: str | None, *, ks: Sequence[int], lookup_k: int) -> list[BenchConfig]:
    """Configurations named in ``text`` (comma-separated; None = all), ``plain`` always first.

    ``draft-k{K}`` may name any K; the default list has one per entry of ``ks``.
    """
    for k in [*ks, lookup_k]:
        if not 1 <= k <= 64:
            raise InvalidArgumentError(f"draft lengths must be between 1 and 64, got {k}")
    default = ["plain", *(f"draft-k{k}" for k in ks), "draft-auto", "hybrid-auto", "lookup"]
    default += ["hf-plain", "hf-assisted", "hf-lookup", "hf-default"]
    default += ["llamacpp-plain", "llamacpp-spec", "ov-plain", "ov-spec"]
    names = default if text is None else [s.strip() for s in text.split(",") if s.strip()]
    configs: list[BenchConfig] = []
    for name in dict.fromkeys(["plain", *names]):
        if name == "plain":
            configs.append(BenchConfig(name, "verispec", "none"))
        elif name.startswith("draft-k") and name[7:].isdigit() and 1 <= int(name[7:]) <= 64:
            configs.append(BenchConfig(name, "verispec", "model", int(name[7:])))
        elif name == "draft-auto":
            configs.append(BenchConfig(name, "verispec", "model", "auto"))
        elif name == "draft-auto-chain":  # draft-auto verifying chains only (no siblings)
            configs.append(BenchConfig(name, "verispec", "model", "auto", siblings=False))
        elif name == "hybrid-auto":
            configs.append(BenchConfig(name, "verispec", "hybrid", "auto"))
        elif name == "lookup":
            configs.append(BenchConfig(name, "verispec", "lookup", lookup_k))
        elif name == "hf-plain":
            configs.append(BenchConfig(name, "transformers", "none"))
        elif name == "hf-assisted":
            configs.append(BenchConfig(name, "transformers", "model"))
        elif name == "hf-lookup":
            configs.append(BenchConfig(name, "transformers", "lookup", lookup_k))
        elif name == "hf-default":  # plain generate() on PyTorch's default kernels
            configs.append(BenchConfig(name, "transformers", "none"))
        elif name in PEER_CONFIGS:  # another engine; "-spec": its own speculative decoding
            drafter = "model" if name.endswith("-spec") else "none"
            configs.append(BenchConfig(name, PEER_CONFIGS[name], drafter))
        else:
            raise InvalidArgumentError(
                f"unknown configuration {name!r}; choose from plain, draft-k<K> (K in 1..64), "
                "draft-auto, draft-auto-chain, hybrid-auto, lookup, hf-plain, hf-assisted, "
                "hf-lookup, hf-default, llamacpp-plain, llamacpp-spec, ov-plain, ov-spec"
            )
    return configs


@dataclass(frozen=True)
class RunRecord:
    """One generation: one configuration on one turn of one prompt."""

    config: str
    set_name: str
    prompt_id: str
    category: str
    turn: int  # 1-based
    seed: int | None
    prompt_tokens: int
    token_ids: tuple[int, ...]
    time_total: float  # wall seconds, prompt pass included
    pass_ends: tuple[float, ...]  # seconds from the start to the end of each target pass
    pass_tokens: tuple[int, ...]  # tokens emitted by each target pass
    drafted: int | None = None  # None where not known (transformers peers, some others)
    accepted: int | None = None
    drafted_by_position: tuple[int, ...] = ()
    accepted_by_position: tuple[int, ...] = ()
    passes_by_draft_length: tuple[int, ...] = ()  # [j]: target passes that verified j drafts
    free_drafted: int | None = None  # drafted tokens that cost nothing (prompt lookup)
    hinted_drafted: int | None = None  # read off one draft pass over a lookup hint
    siblings: int | None = None  # runner-up tokens verified beside the drafts (token trees)
    siblings_kept: int | None = None  # of those, kept in place of a rejected draft token
    time_prefill: float | None = None
    cached_prompt_tokens: int | None = None  # reused from a prefix cache (verispec only)
    time_draft: float | None = None
    time_verify: float | None = None
    time_overhead: float | None = None
    time_forward: float | None = None  # inside target and draft forward passes (verispec only)
    matches_plain: bool | None = None  # greedy only: the same tokens as verispec plain
    first_mismatch: int | None = None  # index of the first differing token
    # greedy, speculative configurations only: the same tokens as its own engine's plain one
    matches_own_plain: bool | None = None

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.time_total if self.time_total > 0 else 0.0

    @property
    def time_to_first_token(self) -> float:
        return self.pass_ends[0] if self.pass_ends else self.time_total

    @property
    def decode_tokens(self) -> int:
        """Tokens after the first pass (0 when there was only one pass)."""
        return self.new_tokens - self.pass_tokens[0] if len(self.pass_ends) > 1 else 0

    @property
    def decode_seconds(self) -> float:
        """Wall time after the first pass (0 when there was only one pass)."""
        return self.time_total - self.pass_ends[0] if len(self.pass_ends) > 1 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens after the first pass over the time after it: the rate once the prompt is in."""
        seconds = self.decode_seconds
        return self.decode_tokens / seconds if seconds > 0 else 0.0

    def token_latencies(self) -> list[float]:
        """Seconds per token after the first pass: each pass's latency / its tokens, per token."""
        out: list[float] = []
        for i in range(1, len(self.pass_ends)):
            n = self.pass_tokens[i]
            if n:
                out.extend([(self.pass_ends[i] - self.pass_ends[i - 1]) / n] * n)
        return out


@dataclass(frozen=True)
class BenchRun:
    records: list[RunRecord]
    configs: list[BenchConfig]  # the ones that ran
    notes: list[str]  # configurations skipped and why
    # per external engine (BenchConfig.engine): its name, precision, draft_precision, build
    peers: dict[str, dict[str, str | None]] = field(default_factory=dict)


@dataclass(frozen=True)
class _Unit:
    """One turn of one prompt, as the token ids every configuration is given."""

    prompt: BenchPrompt
    turn: int
    prompt_ids: list[int]
    seed: int | None


class _TimedModel:
    """A model whose passes add up their wall time in ``seconds`` (LanguageModel)."""

    def __init__(self, model: LanguageModel) -> None:
        self.model = model
        self.seconds = 0.0
        self.name = model.name
        self.vocab_size = model.vocab_size
        self.max_context = model.max_context
        self.eos_token_ids = model.eos_token_ids
        self.tokenizer = model.tokenizer
        self.supports_tree = model.supports_tree

    def new_cache(self) -> Any:
        return self.model.new_cache()

    def forward(self, cache: Any, tokens: list[int], *, num_logits: int | None = None) -> Any:
        return self.forward_batch([cache], [tokens], num_logits=[num_logits or len(tokens)])[0]

    def forward_batch(
        self,
        caches: Sequence[Any],
        tokens: Sequence[list[int]],
        *,
        num_logits: Sequence[int] | None = None,
        parents: Sequence[list[int] | None] | None = None,
    ) -> list[torch.Tensor]:
        start = time.perf_counter()
        try:
            return self.model.forward_batch(caches, tokens, num_logits=num_logits, parents=parents)
        finally:
            self.seconds += time.perf_counter() - start


class Runner:
    """Runs configurations on units; holds the models and the drafters built from them.

    verispec runs go through :class:`_TimedModel` wrappers, so that the time
    spent outside model forward passes (the loop's own overhead) is measured.
    """

    def __init__(
        self,
        target: LanguageModel,
        draft: LanguageModel | None,
        *,
        max_new_tokens: int,
        params: SamplingParams,
        default_target: LanguageModel | None = None,
        prefix_cache: bool = False,
        target_spec: str | None = None,
        draft_spec: str | None = None,
        cache_dir: Path | None = None,
        peer_openers: Mapping[str, PeerOpener] | None = None,
    ) -> None:
        self.target = target
        self.default_target = default_target  # the target on default kernels, for hf-default
        self.draft = draft
        self.max_new_tokens = max_new_tokens
        self.params = params
        self._timed_target = _TimedModel(target)
        self._timed_draft = _TimedModel(draft) if draft is not None else None
        self._drafter = (
            DraftModelDrafter(self._timed_draft, target=self._timed_target)
            if self._timed_draft is not None
            else None
        )
        self.prefix_cache = prefix_cache
        self._prefix: dict[str, PrefixCache] = {}  # per configuration: its own last turn
        self._costs: dict[bool, CostModel] = {}  # with / without the draft model
        # External peers: opened on first use, once per engine; a failure is kept too.
        self.target_spec = target_spec or target.name
        self.draft_spec = draft_spec if draft_spec is not None else getattr(draft, "name", None)
        self.cache_dir = cache_dir
        self._peer_openers = dict(peer_openers or {})
        self._peers: dict[str, ExternalPeer | PeerUnavailableError] = {}

    def peer(self, engine: str) -> ExternalPeer:
        """The engine's peer, opened on the first call; PeerUnavailableError (one line,
        with the install command) when it cannot be imported or opened."""
        if engine not in self._peers:
            self._peers[engine] = self._open_peer(engine)
        peer = self._peers[engine]
        if isinstance(peer, PeerUnavailableError):
            raise peer
        return peer

    def _open_peer(self, engine: str) -> ExternalPeer | PeerUnavailableError:
        module_name, install = PEER_ENGINES[engine]
        opener = self._peer_openers.get(engine)
        try:
            if opener is None:
                opener = importlib.import_module(module_name).open_peer
            return opener(
                self.target_spec,
                self.draft_spec,
                threads=torch.get_num_threads(),
                cache_dir=self.cache_dir,
            )
        except PeerUnavailableError as exc:
            return exc
        except ImportError as exc:
            why = f"{module_name} cannot be imported ({_one_line(exc)})"
        except Exception as exc:  # an engine that fails to start must not end the bench
            why = f"{engine} failed to open ({type(exc).__name__}: {_one_line(exc)})"
        return PeerUnavailableError(f"{why}; install it with: {install} (or make peers)")

    def peer_info(self) -> dict[str, dict[str, str | None]]:
        """Name, precision, draft precision and build of each peer opened."""
        return {
            engine: {
                "engine": str(getattr(peer, "engine", engine)),
                "precision": getattr(peer, "precision", None),
                "draft_precision": getattr(peer, "draft_precision", None),
                "build": getattr(peer, "build", None),
            }
            for engine, peer in self._peers.items()
            if not isinstance(peer, PeerUnavailableError)
        }

    def close(self) -> list[str]:
        """Close every peer opened (each, whatever the others do); the errors, as lines."""
        errors = []
        for engine, peer in self._peers.items():
            if not isinstance(peer, PeerUnavailableError):
                try:
                    peer.close()
                except Exception as exc:
                    errors.append(f"closing {engine} failed: {type(exc).__name__}: {exc}")
        return errors

    def costs(self, *, with_draft: bool) -> CostModel:
        """The cost model ``-k auto`` uses (the library's, cached per machine), measured
        on the models themselves rather than their timing wrappers."""
        if with_draft not in self._costs:
            draft = self.draft if with_draft else None
            self._costs[with_draft] = costs_for(self.target, draft, cache_dir=default_cache_dir())
        return self._costs[with_draft]

    def clear_prefix_caches(self) -> None:
        self._prefix.clear()

    def _forward_seconds(self) -> float:
        draft = self._timed_draft.seconds if self._timed_draft is not None else 0.0
        return self._timed_target.seconds + draft

    def _drafter_for(self, config: BenchConfig) -> Drafter[Any] | None:
        if config.drafter == "lookup":
            return PromptLookupDrafter()
        if config.drafter in ("model", "hybrid"):
            if self._drafter is None:
                raise InvalidArgumentError(f"configuration {config.name} needs a draft model")
            if config.drafter == "hybrid":
                return HybridDrafter(self._drafter)
            return self._drafter
        return None

    def run(self, config: BenchConfig, unit: _Unit, *, max_new_tokens: int) -> RunRecord:
        params = dataclasses.replace(self.params, seed=unit.seed)
        common: dict[str, Any] = {
            "config": config.name,
            "set_name": unit.prompt.set_name,
            "prompt_id": unit.prompt.prompt_id,
            "category": unit.prompt.category,
            "turn": unit.turn,
            "seed": unit.seed,
            "prompt_tokens": len(unit.prompt_ids),
        }
        if config.external:
            if not params.greedy:
                raise InvalidArgumentError(
                    f"{config.engine} runs greedy decoding only (this run samples)"
                )
            out = self.peer(config.engine).generate(
                list(unit.prompt_ids),
                max_new_tokens=max_new_tokens,
                speculative=config.speculative,
                eos_token_ids=self.target.eos_token_ids,
            )
            return RunRecord(
                **common,
                token_ids=tuple(int(t) for t in out.token_ids),
                time_total=out.time_total,
                pass_ends=tuple(out.pass_ends),
                pass_tokens=tuple(out.pass_tokens),
                drafted=out.drafted,
                accepted=out.accepted,
            )
        if config.engine == "transformers":
            model = self.default_target if config.name == "hf-default" else self.target
            if model is None:
                raise InvalidArgumentError("hf-default needs the target loaded on default kernels")
            peer = hf_generate(
                model,
                unit.prompt_ids,
                max_new_tokens=max_new_tokens,
                params=params,
                assistant=self.draft if config.drafter == "model" else None,
                prompt_lookup_num_tokens=int(config.k) if config.drafter == "lookup" else None,
            )
            return RunRecord(
                **common,
                token_ids=tuple(peer.token_ids),
                time_total=peer.time_total,
                pass_ends=tuple(peer.pass_ends),
                pass_tokens=tuple(peer.pass_tokens),
            )
        drafter = self._drafter_for(config)
        costs = None
        if config.k == "auto" and drafter is not None:
            costs = self.costs(with_draft=drafter.draft_model is not None)
        forward_before = self._forward_seconds()
        start = time.perf_counter()
        generation = stream(
            self._timed_target,
            drafter,
            list(unit.prompt_ids),
            max_new_tokens=max_new_tokens,
            temperature=params.temperature,
            top_k=params.top_k,
            top_p=params.top_p,
            seed=params.seed,
            num_draft_tokens=config.k if config.speculative and config.k else 1,
            prefix_cache=(
                self._prefix.setdefault(config.name, PrefixCache()) if self.prefix_cache else None
            ),
            siblings=config.siblings,
            costs=costs,
        )
        ends: list[float] = []
        counts: list[int] = []
        for event in generation:
            ends.append(time.perf_counter() - start)
            counts.append(len(event.tokens))
        total = time.perf_counter() - start
        stats = generation.stats
        return RunRecord(
            **common,
            token_ids=tuple(generation.token_ids),
            time_total=total,
            pass_ends=tuple(ends),
            pass_tokens=tuple(counts),
            drafted=stats.drafted,
            accepted=stats.accepted,
            drafted_by_position=tuple(stats.drafted_by_position),
            accepted_by_position=tuple(stats.accepted_by_position),
            passes_by_draft_length=tuple(stats.passes_by_draft_length),
            free_drafted=stats.free_drafted,
            hinted_drafted=stats.hinted_drafted,
            siblings=stats.siblings,
            siblings_kept=stats.siblings_kept,
            time_prefill=stats.time_prefill,
            cached_prompt_tokens=stats.cached_prompt_tokens,
            time_draft=stats.time_draft,
            time_verify=stats.time_verify,
            time_overhead=max(
                0.0, total - stats.time_prefill - stats.time_draft - stats.time_verify
            ),
            time_forward=self._forward_seconds() - forward_before,
        )

    def answer_greedily(self, unit: _Unit) -> list[int]:
        """The plain configuration's greedy answer (for the next turn of a conversation)."""
        greedy = Runner(
            self.target, None, max_new_tokens=self.max_new_tokens, params=SamplingParams()
        )
        plain = BenchConfig("plain", "verispec", "none")
        return list(greedy.run(plain, unit, max_new_tokens=self.max_new_tokens).token_ids)


def _messages(prompt: BenchPrompt, answers: list[str], turn: int) -> list[dict[str, str]]:
    messages: list[dict[str, str]] = []
    for i in range(turn - 1):
        messages += [
            {"role": "user", "content": prompt.turns[i]},
            {"role": "assistant", "content": answers[i]},
        ]
    messages.append({"role": "user", "content": prompt.turns[turn - 1]})
    return messages


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _check_against_plain(
    records: list[RunRecord], configs: Sequence[BenchConfig] = ()
) -> list[RunRecord]:
    """Each record compared with verispec plain's on the same turn and, for the
    speculative ``configs``, with its own engine's plain one (where that ran)."""
    by_name = {r.config: r for r in records}
    plain = by_name["plain"]
    own = {c.name: c.own_plain for c in configs}
    out = []
    for r in records:
        same = r.token_ids == plain.token_ids
        first = None
        if not same:
            n = min(len(r.token_ids), len(plain.token_ids))
            first = next((i for i in range(n) if r.token_ids[i] != plain.token_ids[i]), n)
        own_plain = by_name.get(own.get(r.config) or "")
        out.append(
            dataclasses.replace(
                r,
                matches_plain=same,
                first_mismatch=first,
                matches_own_plain=None if own_plain is None else r.token_ids == own_plain.token_ids,
            )
        )
    return out


def run_bench(
    target: LanguageModel,
    draft: LanguageModel | None,
    prompts: Sequence[BenchPrompt],
    configs: Sequence[BenchConfig],
    *,
    max_new_tokens: int,
    params: SamplingParams,
    progress: bool = True,
    log: Callable[[str], None] = print,
    default_target: LanguageModel | None = None,
    prefix_cache: bool = True,
    target_spec: str | None = None,
    draft_spec: str | None = None,
    cache_dir: Path | None = None,
    peer_openers: Mapping[str, PeerOpener] | None = None,
) -> BenchRun:
    """Run ``configs`` on every turn of every prompt (see the module docstring).

    ``target_spec`` / ``draft_spec`` (default: the models' names) are what external
    peers are opened with; ``peer_openers`` replaces an engine's ``open_peer``.
    """
    runner = Runner(
        target,
        draft,
        max_new_tokens=max_new_tokens,
        params=params,
        default_target=default_target,
        prefix_cache=prefix_cache,
        target_spec=target_spec,
        draft_spec=draft_spec,
        cache_dir=cache_dir,
        peer_openers=peer_openers,
    )
    try:
        return _run_all(runner, prompts, configs, progress=progress, log=log)
    finally:
        for line in runner.close():
            log(f"note: {line}")


def _run_all(
    runner: Runner,
    prompts: Sequence[BenchPrompt],
    configs: Sequence[BenchConfig],
    *,
    progress: bool,
    log: Callable[[str], None],
) -> BenchRun:
    from tqdm.auto import tqdm

    target, params, max_new_tokens = runner.target, runner.params, runner.max_new_tokens
    base_seed = params.seed if params.seed is not None else 0
    notes: list[str] = []
    if not prompts:
        raise InvalidArgumentError("no prompts to run")

    # 1. Warm up each configuration once; drop the ones this verispec cannot run.
    first = prompts[0]
    ids = encode_prompt(target.tokenizer, _messages(first, [], 1))
    warm = _Unit(first, 1, ids, None if params.greedy else base_seed)
    active: list[BenchConfig] = []
    skipped: set[str] = set()

    def skip(names: list[str], why: str) -> None:
        skipped.update(names)
        notes.append(f"{', '.join(names)} skipped: {why}")
        log(f"note: {notes[-1]}")

    for config in configs:
        if config.name in skipped:
            continue
        if config.external:  # one note for all of an engine's configurations
            engine = [c.name for c in configs if c.engine == config.engine]
            if not params.greedy:
                skip(engine, f"{config.engine} peers decode greedily only (this run samples)")
                continue
            try:
                runner.peer(config.engine)
            except PeerUnavailableError as exc:
                skip(engine, _one_line(exc))
                continue
        try:
            runner.run(config, warm, max_new_tokens=min(WARMUP_TOKENS, max_new_tokens))
            active.append(config)
        except InvalidArgumentError as exc:
            if config.name == "plain":
                raise
            skip([config.name], _one_line(exc) if config.external else str(exc))
        except Exception as exc:  # another engine failing here must not end the bench
            if not config.external:
                raise
            skip([config.name], f"{config.engine} failed ({type(exc).__name__}: {_one_line(exc)})")
    runner.clear_prefix_caches()  # the first prompt must not reuse its warm-up

    # 2. Every turn of every prompt, all configurations, rotating their order.
    total = sum(len(p.turns) for p in prompts) * len(active)
    bar = tqdm(total=total, desc="bench", unit="run", disable=not progress, leave=False)
    records: list[RunRecord] = []
    index = 0
    for prompt in prompts:
        answers: list[str] = []
        for turn in range(1, len(prompt.turns) + 1):
            ids = encode_prompt(target.tokenizer, _messages(prompt, answers, turn))
            unit = _Unit(prompt, turn, ids, None if params.greedy else base_seed + index)
            shift = index % len(active)
            results = []
            for config in active[shift:] + active[:shift]:
                bar.set_postfix_str(f"{prompt.prompt_id} t{turn} {config.name}")
                results.append(runner.run(config, unit, max_new_tokens=max_new_tokens))
                bar.update(1)
            results.sort(key=lambda r: [c.name for c in active].index(r.config))
            if params.greedy:
                results = _check_against_plain(results, active)
            records.extend(results)
            # 3. The next turn follows the plain greedy answer, the same for every configuration.
            if turn < len(prompt.turns):
                answer = results[0].token_ids if params.greedy else runner.answer_greedily(unit)
                answers.append(target.tokenizer.decode(list(answer), skip_special_tokens=True))
            index += 1
    bar.close()
    return BenchRun(records=records, configs=active, notes=notes, peers=runner.peer_info())
