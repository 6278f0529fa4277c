"""The lean forward pass gives transformers' logits (within 1e-4) with its own KV cache."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import plain_greedy, tiny_llama

from verispec.drafting import DraftModelDrafter
from verispec.errors import InvalidArgumentError
from verispec.generate import generate
from verispec.models import HFModel
from verispec.models.lean import LeanCache, compiler_missing, lean_unsupported

VOCAB = 300


def _qwen2(**overrides: Any) -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention
        max_position_embeddings=512,
        initializer_range=0.3,
        tie_word_embeddings=False,
        **overrides,
    )
    return Qwen2ForCausalLM(config).float().eval()  # q/k/v carry biases in Qwen2


def _llama(**overrides: Any) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,  # plain multi-head attention
        max_position_embeddings=512,
        initializer_range=0.3,
        tie_word_embeddings=True,
        **overrides,
    )
    return LlamaForCausalLM(config).float().eval()


@pytest.mark.parametrize("build", [_qwen2, _llama], ids=["qwen2", "llama"])
def test_lean_logits_match_transformers_through_appends_and_rollbacks(build: Any) -> None:
    hf = build()
    lean = HFModel(hf=hf, tokenizer=None, name="lean", runner="lean")
    ref = HFModel(hf=hf, tokenizer=None, name="ref", runner="hf")
    assert lean.runner == "lean" and ref.runner == "hf"
    tokens = torch.randint(0, VOCAB, (420,), generator=torch.Generator().manual_seed(2)).tolist()
    lean_cache, ref_cache = lean.new_cache(), ref.new_cache()
    assert isinstance(lean_cache.kv, LeanCache)
    # Prefill, one token, a verification-sized chunk, a rollback, and a long chunk
    # that outgrows the cache's first allocation (256 positions).
    steps: list[tuple[str, Any]] = [
        ("feed", tokens[:40]),
        ("feed", tokens[40:41]),
        ("feed", tokens[41:48]),
        ("crop", 43),
        ("feed", tokens[100:105]),
        ("feed", tokens[105:106]),
        ("crop", 10),
        ("feed", tokens[200:420]),
    ]
    for action, arg in steps:
        if action == "crop":
            lean_cache.crop(arg)
            ref_cache.crop(arg)
            assert lean_cache.length == ref_cache.length == arg
            continue
        for num_logits in (None, 1):
            if num_logits == 1:  # same positions again, asking for the last row only
                lean_cache.crop(lean_cache.length - len(arg))
                ref_cache.crop(ref_cache.length - len(arg))
            got = lean.forward(lean_cache, arg, num_logits=num_logits)
            want = ref.forward(ref_cache, arg, num_logits=num_logits)
            assert got.shape == want.shape == ((num_logits or len(arg)), VOCAB)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert lean_cache.length == 230 and lean_cache.kv.capacity >= 230


def _speculate_with_perturbed_draft(*, compile_draft: bool) -> None:
    """Greedy speculation on a Qwen2 target with a perturbed copy as the draft (often
    but not always right) equals plain greedy decoding."""
    target = HFModel(hf=_qwen2(), tokenizer=None, name="target")
    draft_hf = _qwen2()
    with torch.no_grad():
        for p in draft_hf.parameters():
            p.add_(0.02 * torch.randn_like(p))
    draft = HFModel(hf=draft_hf, tokenizer=None, name="draft")
    assert target.runner == draft.runner == "lean"  # auto picks lean for Qwen2
    if compile_draft:
        assert draft.lean is not None and draft.lean.compile_steps() is None
    prompt = [5, 17, 99, 3, 5, 17, 42, 8]
    result = generate(
        target, DraftModelDrafter(draft, target=target), prompt, max_new_tokens=40,
        num_draft_tokens=4,
    )  # fmt: skip
    assert result.token_ids == plain_greedy(target, prompt, 40)
    assert 0 < result.stats.accepted < result.stats.drafted  # both paths were exercised


def test_lean_speculative_greedy_equals_plain_greedy() -> None:
    _speculate_with_perturbed_draft(compile_draft=False)


def test_unsupported_models_fall_back_or_fail_clearly() -> None:
    scaled = _llama(rope_scaling={"rope_type": "linear", "factor": 2.0})
    assert lean_unsupported(scaled) == "RoPE scaling"
    assert HFModel(hf=scaled, tokenizer=None, name="scaled").runner == "hf"  # auto falls back
    with pytest.raises(InvalidArgumentError, match="no lean forward for RoPE scaling"):
        HFModel(hf=scaled, tokenizer=None, name="scaled", runner="lean")
    with pytest.raises(InvalidArgumentError, match="unknown runner 'fast'"):
        HFModel(hf=_llama(), tokenizer=None, name="x", runner="fast")
    sliding = _qwen2(use_sliding_window=True, sliding_window=16)
    assert lean_unsupported(sliding) == "sliding-window attention"


@pytest.mark.parametrize("build", [_qwen2, _llama], ids=["qwen2", "llama"])
def test_fused_projections_give_the_same_logits(build: Any) -> None:
    from verispec.models.kernels import fuse_projections

    hf = build()
    tokens = torch.randint(0, VOCAB, (48,), generator=torch.Generator().manual_seed(3)).tolist()
    ref = HFModel(hf=hf, tokenizer=None, name="ref", runner="hf")
    ref_cache = ref.new_cache()
    want = [ref.forward(ref_cache, chunk) for chunk in (tokens[:40], tokens[40:41], tokens[41:])]
    fused = []
    for layer in hf.model.layers:
        pair = fuse_projections(layer)
        assert pair is not None
        fused.append((pair["qkv"], pair["gate_up"]))
        assert not hasattr(layer.self_attn, "qkv")  # the HF modules are left as they were
        with torch.no_grad():  # the lean pass must now read only the fused copies
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.mlp.up_proj):
                proj.weight.fill_(float("nan"))
    lean = HFModel(hf=hf, tokenizer=None, name="lean", runner="lean", fused=tuple(fused))
    lean_cache = lean.new_cache()
    got = [lean.forward(lean_cache, chunk) for chunk in (tokens[:40], tokens[40:41], tokens[41:])]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("batch_invariant", [True, False])
def test_int8_models_get_quantized_fused_projections(batch_invariant: bool) -> None:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    from verispec.models.kernels import RowQuantizedLinear, optimize

    hf = _qwen2()
    full = HFModel(hf=_qwen2(), tokenizer=None, name="fp32")
    applied = optimize(hf, device="cpu", precision="int8", batch_invariant=batch_invariant)
    kind = RowQuantizedLinear if batch_invariant else DynamicLinear
    assert len(applied.fused) == len(hf.model.layers)
    for layer, pair in zip(hf.model.layers, applied.fused, strict=True):
        assert pair is not None
        assert isinstance(pair[0], kind) and isinstance(pair[1], kind)
        assert isinstance(layer.self_attn.q_proj, kind) and isinstance(layer.mlp.down_proj, kind)
    assert isinstance(hf.lm_head, kind)
    lean = HFModel(hf=hf, tokenizer=None, name="int8", runner="lean", fused=applied.fused)
    tokens = torch.randint(0, VOCAB, (64,), generator=torch.Generator().manual_seed(4)).tolist()
    got = lean.forward(lean.new_cache(), tokens)
    want = full.forward(full.new_cache(), tokens)
    unfused = HFModel(hf=hf, tokenizer=None, name="int8-hf", runner="hf")
    other = unfused.forward(unfused.new_cache(), tokens)
    # Fusing changes only which weights share a quantization scale, so the lean int8
    # pass is about as close to fp32 as transformers' pass over the separate int8
    # layers (0.38 against 0.36 mean absolute error here, logits std 2.4); a wrong
    # fusion (order, RoPE, split) would be off by the order of the logits' spread.
    err_fused = (got - want).abs().mean().item()
    err_separate = (other - want).abs().mean().item()
    assert err_fused < 1.5 * err_separate < 0.3 * want.std().item()


@pytest.mark.parametrize("model", [_qwen2, _llama])
def test_an_int8_target_scores_each_position_as_decoding_it_alone_does(model: Any) -> None:
    """Verification scores k + 1 positions in one pass. With an int8 target each must
    get, bit for bit, the logits that decoding it alone gives, or speculative decoding
    would not reproduce plain int8 decoding. fbgemm's own dynamic linear (one activation
    scale per call, used for drafts) fails this, which shows the check can fail; the
    per-row quantized layers and per-query attention of a target pass it."""
    from verispec.models.kernels import optimize

    tokens = torch.randint(0, VOCAB, (52,), generator=torch.Generator().manual_seed(5)).tolist()
    for batch_invariant in (True, False):
        hf = model()
        applied = optimize(hf, device="cpu", precision="int8", batch_invariant=batch_invariant)
        lean = HFModel(hf=hf, tokenizer=None, name="int8", runner="lean", fused=applied.fused)
        assert lean.lean is not None and lean.lean.exact_rows == batch_invariant
        cache = lean.new_cache()
        lean.forward(cache, tokens[:40])  # a prompt pass, as in both decoding modes
        for n in (2, 6, 12):
            together = lean.forward(cache, tokens[40 : 40 + n])  # [n, vocab]
            cache.crop(40)
            alone = torch.cat([lean.forward(cache, [t]) for t in tokens[40 : 40 + n]])
            cache.crop(40)
            assert torch.equal(together, alone) == batch_invariant, n


def test_speculative_decoding_with_an_int8_target_equals_plain_int8_decoding() -> None:
    from verispec.models.kernels import optimize

    hf = _qwen2()
    applied = optimize(hf, device="cpu", precision="int8")
    target = HFModel(hf=hf, tokenizer=None, name="int8", runner="lean", fused=applied.fused)
    draft_hf = _qwen2()
    with torch.no_grad():  # a draft close to the target: long accepted runs
        for p in draft_hf.parameters():
            p.add_(0.02 * torch.randn_like(p))
    applied = optimize(draft_hf, device="cpu", precision="int8", batch_invariant=False)
    draft = HFModel(hf=draft_hf, tokenizer=None, name="draft", runner="lean", fused=applied.fused)
    for seed in range(3):
        prompt = torch.randint(0, VOCAB, (30,), generator=torch.Generator().manual_seed(seed))
        plain = generate(target, None, prompt.tolist(), max_new_tokens=40)
        for k in (3, 8):
            spec = generate(
                target, DraftModelDrafter(draft, target=target), prompt.tolist(),
                max_new_tokens=40, num_draft_tokens=k,
            )  # fmt: skip
            assert spec.token_ids == plain.token_ids
            assert spec.stats.accepted > 0  # the drafts were really verified in groups


needs_compiler = pytest.mark.skipif(
    compiler_missing() is not None, reason="torch.compile needs a C++ compiler on a CPU"
)


@needs_compiler
def test_compiled_steps_match_eager_steps_without_recompiling() -> None:
    """One compiled graph serves every position and cache size: steps across the cache's
    growth (256 -> 512 positions) give the eager pass's logits, with no compile after
    the warm-up that compile_steps() does."""
    from torch._dynamo.utils import counters

    compiled = HFModel(hf=_qwen2(), tokenizer=None, name="compiled")
    eager = HFModel(hf=compiled.hf, tokenizer=None, name="eager")
    assert compiled.lean is not None and eager.lean is not None
    assert compiled.lean.compile_steps() is None
    graphs = counters["stats"]["unique_graphs"]
    prompt = [(7 * i) % VOCAB for i in range(200)]
    caches = [compiled.new_cache(), eager.new_cache()]
    for model, cache in zip((compiled, eager), caches, strict=True):
        model.forward(cache, prompt, num_logits=1)
    for i in range(100):  # positions 200..299: past the first capacity of 256
        token = [(13 * i) % VOCAB]
        got = compiled.forward(caches[0], token)
        want = eager.forward(caches[1], token)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        if i == 50:  # a rollback, as after a rejected draft
            for cache in caches:
                cache.crop(cache.length - 3)
    assert counters["stats"]["unique_graphs"] == graphs


@needs_compiler
def test_speculative_greedy_equals_plain_greedy_with_a_compiled_draft() -> None:
    _speculate_with_perturbed_draft(compile_draft=True)


def test_a_failing_compiled_step_falls_back_to_the_eager_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A compiled step that compiles (and warms up) but fails at run time: the step is
    scored by the eager pass, and the eager pass is used from then on."""
    from verispec.models import lean

    failing = {"armed": False, "calls": 0}

    def compile_that_breaks_later(fn: Any, **kwargs: Any) -> Any:
        def step(*args: Any) -> torch.Tensor:
            failing["calls"] += 1
            if failing["armed"]:
                raise RuntimeError("compiler crashed")
            return fn(*args)

        return step

    monkeypatch.setattr(torch, "compile", compile_that_breaks_later)
    monkeypatch.setattr(lean.shutil, "which", lambda name: f"/usr/bin/{name}")
    model = HFModel(hf=_llama(), tokenizer=None, name="m")
    reference = HFModel(hf=model.hf, tokenizer=None, name="ref")
    assert model.lean is not None and model.lean.compile_steps() is None
    failing["armed"] = True
    cache, ref_cache = model.new_cache(), reference.new_cache()
    model.forward(cache, [1, 2, 3])
    reference.forward(ref_cache, [1, 2, 3])
    calls = failing["calls"]
    torch.testing.assert_close(model.forward(cache, [4]), reference.forward(ref_cache, [4]))
    assert failing["calls"] == calls + 1  # the compiled step was tried, and failed
    torch.testing.assert_close(model.forward(cache, [5]), reference.forward(ref_cache, [5]))
    assert failing["calls"] == calls + 1  # and not tried again
    assert cache.length == ref_cache.length == 5


def test_compile_steps_choices_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    from verispec.models import _compile_steps, lean

    hf_runner = HFModel(hf=_llama(), tokenizer=None, name="m", runner="hf")
    with pytest.raises(InvalidArgumentError, match="no lean forward"):
        _compile_steps(hf_runner, True, "cpu")
    assert _compile_steps(hf_runner, "auto", "cpu") == ""  # auto: quietly not compiled
    with pytest.raises(InvalidArgumentError, match="CPU option"):
        _compile_steps(HFModel(hf=_llama(), tokenizer=None, name="m"), True, "cuda")
    with pytest.raises(InvalidArgumentError, match="compile_steps must be"):
        _compile_steps(hf_runner, "yes", "cpu")
    monkeypatch.setattr(lean.shutil, "which", lambda name: None)
    with pytest.raises(InvalidArgumentError, match="no C\\+\\+ compiler"):
        _compile_steps(HFModel(hf=_llama(), tokenizer=None, name="m"), True, "cpu")


def test_auto_compiles_int4_models_only() -> None:
    """auto leaves fp32 and int8 models eager (compiling did not pay for them) and never
    tries oneDNN layers, which torch.compile cannot trace."""
    from verispec.models import _compile_steps, kernels

    model = HFModel(hf=_llama(), tokenizer=None, name="m")
    assert _compile_steps(model, "auto", "cpu") == ""
    assert model.lean is not None and model.lean._step is None
    if kernels.onednn_available():
        kernels.use_onednn(model.hf)
        with pytest.raises(InvalidArgumentError, match="oneDNN"):
            _compile_steps(model, True, "cpu")


def test_forward_batch_scores_ragged_sequences_and_a_tree_as_each_alone() -> None:
    """One packed pass over three sequences with different cache lengths and numbers of
    new tokens (a one-token step, a prompt pass asking for its last two rows, and a
    token tree) gives each sequence the logits of its own pass (fp32, within 1e-4),
    and leaves each cache holding its own tokens at the right length."""
    model = tiny_llama(seed=0)
    assert model.lean is not None and model.supports_tree
    vocab = model.vocab_size
    contexts = [list(range(10, 22)), [], list(range(40, 70))]  # 12, 0 and 30 cached
    new = [[5], [3, 1, 4, 1, 5], [7, 40, 41, 42, 90, 91]]
    parents = [None, None, [-1, 0, 1, 2, 0, 2]]  # a chain of 4 and siblings of rows 1, 3
    paths = [[7], [7, 40], [7, 40, 41], [7, 40, 41, 42], [7, 90], [7, 40, 41, 91]]
    num_logits = [1, 2, 6]
    caches = []
    for context in contexts:
        cache = model.new_cache()
        if context:
            model.forward(cache, context)
        caches.append(cache)
    rows: list[int] = []
    hook = model.hf.model.embed_tokens.register_forward_hook(
        lambda module, args, out: rows.append(int(args[0].numel()))
    )
    try:
        got = model.forward_batch(caches, new, num_logits=num_logits, parents=parents)
    finally:
        hook.remove()
    assert rows == [sum(len(t) for t in new)]  # one pass over all 12 rows, packed
    assert [tuple(g.shape) for g in got] == [(m, vocab) for m in num_logits]
    for cache, context, tokens in zip(caches, contexts, new, strict=True):
        assert cache.length == cache.kv.length == len(context) + len(tokens)
    # Each chain as its own forward over the same cache.
    for b in (0, 1):
        alone = model.new_cache()
        if contexts[b]:
            model.forward(alone, contexts[b])
        want = model.forward(alone, new[b], num_logits=num_logits[b])
        torch.testing.assert_close(got[b], want, atol=1e-4, rtol=0)
    # Each tree row as the forward of its own path.
    for row, path in enumerate(paths):
        want = model.forward(model.new_cache(), contexts[2] + path)[-1]
        torch.testing.assert_close(got[2][row], want, atol=1e-4, rtol=0)
    # The caches hold each sequence's own keys and values: the next token of each
    # (the tree's cut back to its chain) scores as a fresh pass over its tokens does.
    caches[2].crop(len(contexts[2]) + 4)
    nxt = model.forward_batch(caches, [[9], [9], [9]], num_logits=[1, 1, 1])
    fed = [contexts[0] + new[0], contexts[1] + new[1], contexts[2] + new[2][:4]]
    for b, tokens in enumerate(fed):
        want = model.forward(model.new_cache(), [*tokens, 9], num_logits=1)
        torch.testing.assert_close(nxt[b], want, atol=1e-4, rtol=0)
        assert caches[b].length == len(tokens) + 1
