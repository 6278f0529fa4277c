"""Kernels and precisions chosen by measurement (verispec.models.tuning).

Choices are tested on fake measurements (so that they cannot depend on the machine
the tests run on); each kernel path is compared with the plain fp32 layer on tiny
models, with the tolerance its arithmetic allows.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from helpers import plain_greedy, tiny_llama
from torch import nn

from verispec.drafting import DraftModelDrafter
from verispec.errors import InvalidArgumentError
from verispec.generate import generate
from verispec.models import HFModel, kernels, tuning
from verispec.models.tuning import LinearTiming, PrecisionTrial, Timing

PROMPT = [5, 17, 99, 3, 5, 17, 42, 8, 5, 17]


def _timing(kernel: str, seconds: Sequence[float], exact_from: int | None) -> LinearTiming:
    return LinearTiming((64, 64), 3, kernel, tuple(seconds), exact_from)


def test_a_target_gets_the_fastest_row_exact_kernel_and_a_draft_the_fastest() -> None:
    table = [
        # default: fastest, but never scores rows alike across call sizes
        _timing("fp32/default", [1.0, 1.0, 1.0, 1.0, 1.0, 1.0], None),
        _timing("fp32/onednn", [3.0, 2.0, 2.0, 2.0, 2.0, 2.0], 2),
    ]
    target = tuning.choose_kernels(table, "fp32", exact=True, use_rows=tuning.TARGET_ROWS)
    assert target[(64, 64)] == tuning.KernelChoice("onednn", 2, True)  # padded to be exact
    draft = tuning.choose_kernels(table, "fp32", exact=False, use_rows=tuning.DRAFT_ROWS)
    assert draft[(64, 64)].kernel == "default"


def test_padding_is_chosen_only_where_it_pays() -> None:
    slow_one = _timing("bf16/onednn", [5.0, 1.0, 1.0, 1.0, 2.0, 4.0], 1)
    choice = tuning.choose_kernels([slow_one], "bf16", exact=True, use_rows=(1,))
    assert choice[(64, 64)].min_rows == 2  # one row padded to two: 1.0 instead of 5.0
    flat = _timing("bf16/onednn", [1.0, 0.95, 1.0, 1.0, 2.0, 4.0], 1)
    choice = tuning.choose_kernels([flat], "bf16", exact=True, use_rows=(1,))
    assert choice[(64, 64)].min_rows == 1  # 5% is within the noise: no padding


def test_no_exact_kernel_falls_back_to_the_fastest_and_says_so() -> None:
    table = [_timing("fp32/default", [1.0] * 6, None)]
    choice = tuning.choose_kernels(table, "fp32", exact=True, use_rows=tuning.TARGET_ROWS)
    assert choice[(64, 64)] == tuning.KernelChoice("default", 1, False)


def _kind(layer: nn.Module) -> str:
    if isinstance(layer, kernels.Int4Linear):
        return "int4"
    if isinstance(layer, kernels.Int8WeightOnlyLinear):
        return "int8w"
    if type(layer).__module__.startswith("torch.ao"):
        return "int8"
    if isinstance(layer, kernels.OneDNNLinear):
        return f"{layer.dtype}/onednn"
    return f"{layer.weight.dtype}/default"


def _fake_measure(calls: list[int], seconds: dict[str, float]) -> tuning.Measure:
    def measure(
        make: Callable[[nn.Linear], nn.Module], linears: Sequence[nn.Linear], dtype: torch.dtype
    ) -> Timing:
        calls.append(1)
        return Timing(seconds=tuple([seconds.get(_kind(make(linears[0])), 1.0)] * 6), exact_from=1)

    return measure


def test_the_table_is_cached_per_machine_and_never_reused_from_another(tmp_path: Path) -> None:
    model = tiny_llama(seed=0)
    calls: list[int] = []
    measure = _fake_measure(calls, {})
    first = tuning.linear_table(
        model.hf, ["fp32"], target=True, cache_dir=tmp_path, measure=measure
    )
    n = len(calls)
    assert n > 0
    again = tuning.linear_table(
        model.hf, ["fp32"], target=True, cache_dir=tmp_path, measure=measure
    )
    assert again == first and len(calls) == n  # read back, not measured
    # The same file, as another processor / torch version wrote it: measured again.
    (path,) = (tmp_path / "kernels").glob("*.json")
    for key, value in (("cpu", "Some Other CPU"), ("torch", "2.0.0")):
        data = json.loads(path.read_text())
        data["fingerprint"][key] = value
        path.write_text(json.dumps(data))
        tuning.linear_table(model.hf, ["fp32"], target=True, cache_dir=tmp_path, measure=measure)
        assert len(calls) > n
        n = len(calls)
    # A damaged file is measured again too.
    path.write_text("{not json")
    tuning.linear_table(model.hf, ["fp32"], target=True, cache_dir=tmp_path, measure=measure)
    assert len(calls) > n


def test_the_draft_precision_is_the_fastest_whole_step_preferring_int4_on_near_ties() -> None:
    assert tuning.pick_draft_precision({"int4": 20.0, "int8": 10.0, "bf16": 30.0}) == "int8"
    # within STEP_TIE of the fastest: the first of DRAFT_PRECISIONS
    assert tuning.pick_draft_precision({"int4": 10.5, "int8": 10.0, "bf16": 30.0}) == "int4"
    assert tuning.pick_draft_precision({"bf16": 9.0, "fp32": 9.1}) == "bf16"


def test_draft_steps_measure_each_precision_once_and_cache(tmp_path: Path) -> None:
    base = tiny_llama(seed=0)
    loaded: list[str] = []

    def load(precision: str) -> HFModel:
        loaded.append(precision)
        hf = copy.deepcopy(base.hf)
        applied = kernels.optimize(hf, device="cpu", precision=precision, batch_invariant=False)
        return HFModel(hf=hf, tokenizer=None, name=precision, fused=applied.fused)

    precisions = ["int8", "fp32"]
    steps = tuning.draft_steps("tiny", "id", load, cache_dir=tmp_path, precisions=precisions)
    assert loaded == precisions and set(steps) == set(precisions)
    assert all(s > 0 for s in steps.values())
    again = tuning.draft_steps("tiny", "id", load, cache_dir=tmp_path, precisions=precisions)
    assert again == steps and loaded == precisions  # read back, not measured


def test_the_linear_layer_steps_add_up_the_measured_shapes() -> None:
    model = tiny_llama(seed=0)
    seconds = {"int4": 3.0, "int8w": 1.0, "int8": 0.5}
    seconds |= {
        f"{dtype}/{kernel}": 2.0
        for dtype in (torch.float32, torch.bfloat16)
        for kernel in ("default", "onednn")
    }
    steps = tuning.draft_linear_steps(model.hf, cache_dir=None, measure=_fake_measure([], seconds))
    layers = sum(1 for m in model.hf.modules() if type(m) is nn.Linear)
    assert steps["int8"] == pytest.approx(0.5 * layers)
    assert steps["fp32"] == pytest.approx(2.0 * layers)


def test_auto_target_precision_keeps_to_the_agreement_threshold() -> None:
    fast_wrong = PrecisionTrial("int8", (0.1,) * 6, tuning.AGREEMENT - 0.01, "")
    slower_ok = PrecisionTrial("bf16", (0.3,) * 6, tuning.AGREEMENT + 0.1, "")
    reference = PrecisionTrial("fp32", (0.6,) * 6, 1.0, "")
    assert tuning.pick_precision([reference, fast_wrong, slower_ok]).precision == "bf16"
    assert tuning.pick_precision([reference, fast_wrong]).precision == "fp32"
    assert tuning.agreement([[1, 2, 3, 4]], [[1, 2, 9, 9]]) == 0.5
    assert tuning.agreement([[1, 2]], [[1, 2]]) == 1.0


def test_precision_trials_compare_each_precision_with_the_fp32_answers() -> None:
    base = tiny_llama(seed=3)
    vocab = base.vocab_size

    class Tokenizer:  # a chat template over a tiny vocabulary, for encode_prompt
        chat_template = "yes"

        def apply_chat_template(self, messages: list[dict[str, str]], **_: object) -> list[int]:
            return [ord(c) % (vocab - 1) for c in messages[0]["content"][:12]]

        def decode(self, ids: list[int], **_: object) -> str:
            return " ".join(map(str, ids))

    def load(precision: str) -> HFModel:
        hf = copy.deepcopy(base.hf)
        applied = kernels.optimize(hf, device="cpu", precision=precision, kernels="default")
        model = HFModel(hf=hf, tokenizer=Tokenizer(), name=precision, fused=applied.fused)
        model.kernels = applied.description
        return model

    trials = tuning.precision_trials(load, ["fp32", "int8w"])
    assert [t.precision for t in trials] == ["fp32", "int8w"]
    assert trials[0].agreement == 1.0
    assert 0.0 <= trials[1].agreement <= 1.0
    assert all(len(t.pass_seconds) == len(tuning.PASS_ROWS) for t in trials)
    assert all(s > 0 for t in trials for s in t.pass_seconds)


# Each kernel path against the plain fp32 layer (same weights), on random inputs.
# Tolerances: oneDNN fp32 is the same math in another order (1e-4); bf16 keeps 8 bits
# of mantissa (relative error ~2^-8 per product, summed over 64 inputs: 3e-2);
# int8 weights per output channel and bf16 activations ~1/127 relative (5e-2).
PATHS = {
    "fp32/onednn": (lambda lin: kernels.OneDNNLinear(lin, min_rows=2), torch.float32, 1e-4),
    "bf16/onednn": (
        lambda lin: kernels.OneDNNLinear(tuning._cast(lin, torch.bfloat16)),
        torch.bfloat16,
        3e-2,
    ),
    "bf16/default-padded": (
        lambda lin: kernels.PaddedLinear(tuning._cast(lin, torch.bfloat16), min_rows=2),
        torch.bfloat16,
        3e-2,
    ),
    "int8w": (kernels.Int8WeightOnlyLinear, torch.float32, 5e-2),
}


@pytest.mark.parametrize("path", sorted(PATHS))
def test_each_kernel_path_matches_the_fp32_layer(path: str) -> None:
    make, dtype, tol = PATHS[path]
    if "onednn" in path and not kernels.onednn_available():
        pytest.skip("PyTorch built without oneDNN")
    if path == "int8w" and not kernels.int8_weight_only_available():
        pytest.skip("torch without _weight_int8pack_mm")
    torch.manual_seed(0)
    linear = nn.Linear(64, 96)
    fast = make(linear)
    for rows in (1, 2, 5, 17):
        x = torch.randn(rows, 64)
        want = linear(x)
        got = fast(x.to(dtype)).float()
        assert got.shape == want.shape
        scale = want.abs().max()
        assert (got - want).abs().max() <= tol * scale, path


def test_int8w_and_bf16_targets_are_lossless_against_their_own_plain_decoding() -> None:
    """A reduced-precision target changes the output, to its own plain decoding's: the
    speculative tokens must equal that, token for token (rows scored exactly)."""
    for precision in ("int8w", "bf16"):
        if precision == "int8w" and not kernels.int8_weight_only_available():
            continue
        base = tiny_llama(seed=5)
        hf = base.hf.to(torch.bfloat16) if precision == "bf16" else base.hf
        applied = kernels.optimize(hf, device="cpu", precision=precision)
        target = HFModel(hf=hf, tokenizer=None, name="t", fused=applied.fused, exact=True)
        draft = tiny_llama(seed=5)  # the fp32 model: drafts mostly accepted, some not
        want = plain_greedy(target, PROMPT, 40)
        for k in (1, 4, 9):
            got = generate(
                target,
                DraftModelDrafter(draft, target=target),
                PROMPT,
                max_new_tokens=40,
                num_draft_tokens=k,
            )
            assert got.token_ids == want, (precision, k)
            assert got.stats.accepted > 0


def test_a_precision_this_machine_cannot_run_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from verispec.models import load_model

    monkeypatch.setattr(tuning, "runnable_precisions", lambda device, target: ["fp32"])
    with pytest.raises(InvalidArgumentError, match="cannot run on this machine"):
        load_model("smollm2-135m", precision="int8w", progress=False)
    with pytest.raises(InvalidArgumentError, match="unknown precision"):
        load_model("smollm2-135m", precision="int3", progress=False)


def test_verispec_kernels_prints_the_measured_tables(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from verispec.cli.main import main

    out_json = tmp_path / "kernels.json"
    code = main(
        [
            "kernels",
            "--target",
            "smollm2-135m",
            "--draft",
            "smollm2-135m",
            "--no-passes",
            "--json",
            str(out_json),
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "## Target smollm2-135m: linear layers" in text
    assert "fp32/" in text and "| yes" in text  # every shape has a chosen kernel
    data = json.loads(out_json.read_text())
    shapes = {tuple(t["shape"]) for t in data["target_linears"]}
    assert (49152, 576) in shapes  # SmolLM2's output head
    assert data["draft_precision"] in data["draft_steps"]
    assert all(s > 0 for s in data["draft_steps"].values())
    assert all(v is None or 0.0 <= v < 1.0 for v in data["draft_overhead_share"].values())
