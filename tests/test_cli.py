"""The command line: bad input gives one clear line and exit code 2, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import byte_tokenizer, tiny_llama

from verispec.cli.main import main


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two tiny local model folders: one with the byte tokenizer, one whose vocab differs."""
    root = tmp_path_factory.mktemp("models")
    good, other = root / "tiny", root / "tiny-other"
    model = tiny_llama(seed=0, tokenizer=byte_tokenizer())
    model.hf.save_pretrained(good)
    model.tokenizer.save_pretrained(good)
    model.hf.save_pretrained(other)
    tok = byte_tokenizer()
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(other)
    return good, other


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
        (["--temperature", "-1"], "temperature must be >= 0"),
        (["--top-p", "0"], "top_p must be in (0, 1]"),
        (["--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["--top-k", "-2"], "top_k"),
        (["--num-draft-tokens", "0"], "num_draft_tokens must be between 1 and"),
        (["--num-draft-tokens", "100000"], "num_draft_tokens must be between 1 and"),
        (["--target", "no-such-preset"], "unknown"),
        (["--target", "/no/such/model.gguf"], "no/such/model.gguf"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(capsys, argv: list[str], message: str) -> None:
    code, _, err = _run(capsys, "generate", "hello", *argv)
    assert code == 2
    assert err.startswith("error: ") and message.lower() in err.lower()
    assert "Traceback" not in err


def test_empty_prompt(capsys) -> None:
    code, _, err = _run(capsys, "generate", "  ")
    assert code == 2 and "prompt is empty" in err


def test_non_gguf_file(capsys, tmp_path: Path) -> None:
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"not a gguf at all")
    code, _, err = _run(capsys, "generate", "hi", "--target", str(bogus))
    assert code == 2 and "not a GGUF file" in err


def test_incompatible_tokenizers_are_refused(capsys, model_dirs) -> None:
    good, other = model_dirs
    code, _, err = _run(capsys, "generate", "hi", "--target", str(good), "--draft", str(other))
    assert code == 2 and "tokenizers differ" in err and "vocabulary" in err


def test_prompt_longer_than_context(capsys, model_dirs) -> None:
    good, _ = model_dirs
    code, _, err = _run(
        capsys, "generate", "x" * 300, "--target", str(good), "--drafter", "none", "--no-chat"
    )
    assert code == 2 and "context window of 256" in err


def test_local_folder_generates_json(capsys, model_dirs) -> None:
    good, _ = model_dirs
    code, out, _ = _run(
        capsys,
        "generate",
        "hello",
        "--target",
        str(good),
        "--draft",
        str(good),
        "--no-chat",
        "--max-new-tokens",
        "12",
        "--json",
        "-k",
        "3",
        "--draft-precision",
        "fp32",
    )
    assert code == 0
    payload = json.loads(out)
    assert len(payload["token_ids"]) == 12
    assert payload["stats"]["acceptance_rate"] == 1.0  # the target drafting for itself
    by_length = payload["stats"]["passes_by_draft_length"]
    assert sum(by_length) == payload["stats"]["target_passes"] and by_length[3] >= 1
    assert payload["stats"]["free_drafted"] == 0  # a model drafted
    code, out, _ = _run(
        capsys,
        "generate",
        "hello",
        "--target",
        str(good),
        "--drafter",
        "none",
        "--no-chat",
        "--max-new-tokens",
        "12",
        "--json",
    )
    assert json.loads(out)["token_ids"] == payload["token_ids"]


def test_show_draft_marks_tokens(capsys, model_dirs) -> None:
    good, _ = model_dirs
    code, out, err = _run(
        capsys,
        "generate",
        "hello",
        "--target",
        str(good),
        "--draft",
        str(good),
        "--no-chat",
        "--max-new-tokens",
        "8",
        "--show-draft",
    )
    assert code == 0 and "\033[32m" in out and "tokens/s" in err


def test_console_script_entry_point() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "verispec.cli", "generate", "hi", "--max-new-tokens", "-1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: max_new_tokens must be >= 1, got -1"]
