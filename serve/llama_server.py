"""llama.cpp's `llama-server`: built once from a PyPI source distribution, found, launched.

`llm-serve --engine llama-cpp` runs it behind our HTTP layer (`serve/engine/llama_cpp.py`); `make
bench` measures it as the CPU peer (`serve/bench/peers.py`).

Run as:
    python -m serve.llama_server build     # `make llama-cpp`: download, configure, build (cached)
    python -m serve.llama_server path      # print the server binary, or why there is none (exit 1)

The sources are the llama.cpp tree vendored in PyPI's `llama-cpp-python` sdist (`VERSION`), so the
build needs only the package registry, CMake and a C++ compiler. Only the `llama-server` target is
built: Release, `-march=native` (GGML_NATIVE), static, without TLS, the web UI or anything that
downloads at build time. The binary and `build.json` (version, flags, compiler, seconds) land in
`$LLM_SERVE_HOME/llama.cpp/<VERSION>/`, renamed into place only when complete, so a second `make
llama-cpp` returns at once. `$LLAMA_SERVER` points at another llama-server binary instead.
A cold build takes ~8 minutes on 2 cores (longer when the machine is busy), too long for CI's budget:
tests that need it skip, naming this command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

VERSION = "0.3.36"  # llama-cpp-python on PyPI; its vendor/llama.cpp is what gets built
BUILD_COMMAND = "make llama-cpp"
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_CCACHE=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # would download the web UI at build time
    "-DLLAMA_OPENSSL=OFF",
    # -march=native turns on ggml's AMX kernels on Xeons that have AMX; there its q8_0 matmul crashed
    # (SIGSEGV in ggml_backend_amx_mul_mat at warm-up). Explicit -mno-* flags win over -march's set.
    "-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16",
    "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16",
)


class LlamaCppError(RuntimeError):
    """The llama.cpp build failed or its server cannot be found."""


def install_dir(version: str = VERSION) -> Path:
    from serve.models.registry import llm_serve_home

    return llm_serve_home() / "llama.cpp" / version


def server_binary(version: str = VERSION) -> Path | None:
    """The llama-server to use: `$LLAMA_SERVER`, else the cached build of `version`, else None."""
    override = os.environ.get("LLAMA_SERVER")
    if override:
        return Path(override) if os.access(override, os.X_OK) else None
    root = install_dir(version)
    exe = root / "bin" / "llama-server"
    # build.json is written last: without it the directory is not a finished build.
    return exe if (root / "build.json").is_file() and os.access(exe, os.X_OK) else None


def missing_reason(version: str = VERSION) -> str | None:
    """Why there is no llama-server (None when there is one), with the command that builds it."""
    if server_binary(version) is not None:
        return None
    override = os.environ.get("LLAMA_SERVER")
    if override:
        return f"$LLAMA_SERVER={override} is not an executable file"
    return (
        f"llama.cpp's llama-server is not built (no finished build in {install_dir(version)}); "
        f"`{BUILD_COMMAND}` builds it from the llama-cpp-python {version} sdist (~8 min on 2 cores)"
    )


def server_command(
    binary: Path,
    gguf: Path,
    port: int,
    *,
    parallel: int,
    ctx_per_seq: int,
    alias: str,
    threads: int | None = None,
) -> list[str]:
    """llama-server serving `gguf` with `parallel` slots of `ctx_per_seq` tokens each, on 127.0.0.1, with
    `threads` compute threads (default: every core this process may run on)."""
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return [
        str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
        "-t", str(threads), "-tb", str(threads), "-np", str(parallel), "-c", str(ctx_per_seq * parallel),
        "--alias", alias, "--no-webui",
    ]  # fmt: skip


def gguf_for(model_dir: Path, qtype: str, cache_dir: Path) -> Path:
    """`model_dir` as a `qtype` GGUF written by llm-export's writer, reused while the weights are older."""
    from serve.atomic import atomic_path
    from train.export.gguf_writer import write_gguf

    weights = sorted(model_dir.glob("*.safetensors"))
    newest = max((w.stat().st_mtime for w in weights), default=0.0)
    out = cache_dir / f"{model_dir.name}-{qtype}.gguf"
    if out.is_file() and out.stat().st_mtime >= newest:
        return out
    print(f"llama-cpp: writing {out}", flush=True)
    with atomic_path(out) as tmp:
        write_gguf(model_dir, tmp, qtype, name=model_dir.name)
    return out


def build(version: str = VERSION, jobs: int | None = None, force: bool = False) -> Path:
    """Build llama-server from the sdist into `install_dir(version)`; return the binary."""
    root = install_dir(version)
    done = root / "bin" / "llama-server"
    if not force and (root / "build.json").is_file() and done.exists():
        print(f"llama-cpp: cached build {done}", flush=True)
        return done
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise LlamaCppError(f"{tool} is not installed; `apt-get install cmake g++` and run again")
    jobs = jobs or os.cpu_count() or 2
    root.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f".{version}.", dir=root.parent) as tmp_dir:
        tmp = Path(tmp_dir)
        src = _fetch_sources(version, tmp)
        build_dir = tmp / "build"
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        _run(["cmake", "-S", str(src), "-B", str(build_dir), *generator, *CMAKE_FLAGS], "configure")
        _run(["cmake", "--build", str(build_dir), "--target", "llama-server", "-j", str(jobs)], "build")
        stage = tmp / "install"
        (stage / "bin").mkdir(parents=True)
        shutil.copy2(build_dir / "bin" / "llama-server", stage / "bin" / "llama-server")
        info = {
            "version": version,
            "source": f"llama-cpp-python=={version} sdist (vendor/llama.cpp)",
            "cmake_flags": list(CMAKE_FLAGS),
            "compiler": _first_line(["c++", "--version"]),
            "machine": platform.machine(),
            "jobs": jobs,
            "build_seconds": round(time.monotonic() - started, 1),
        }
        (stage / "build.json").write_text(json.dumps(info, indent=2) + "\n")
        if root.exists():
            shutil.rmtree(root)
        os.replace(stage, root)
    print(f"llama-cpp: built {done} in {info['build_seconds']:.0f} s", flush=True)
    return done


def _fetch_sources(version: str, tmp: Path) -> Path:
    """Download the sdist with pip (the registry is all we may reach) and unpack its llama.cpp tree."""
    dl = tmp / "sdist"
    print(f"llama-cpp: downloading the llama-cpp-python {version} sdist", flush=True)
    _run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--dest", str(dl),
         f"llama-cpp-python=={version}"],
        "download",
    )  # fmt: skip
    (archive,) = dl.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        tar.extractall(tmp / "src", filter="data")
    (src,) = (tmp / "src").glob("*/vendor/llama.cpp")
    if not (src / "tools" / "server").is_dir():
        raise LlamaCppError(f"the llama-cpp-python {version} sdist has no tools/server in vendor/llama.cpp")
    return src


def _run(cmd: list[str], what: str) -> None:
    print(f"llama-cpp: {what}: {' '.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise LlamaCppError(f"{what} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}")


def _first_line(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True).stdout.splitlines()[0]
    except (OSError, IndexError):
        return "?"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve.llama_server", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build llama-server (cached)")
    b.add_argument("--version", default=VERSION, help="llama-cpp-python sdist version")
    b.add_argument("--jobs", type=int, help="parallel compile jobs (default: all cores)")
    b.add_argument("--force", action="store_true", help="rebuild even when a build is cached")
    sub.add_parser("path", help="print the llama-server binary, or why there is none")
    args = p.parse_args(argv)
    if args.cmd == "path":
        exe = server_binary()
        if exe is None:
            print(missing_reason(), file=sys.stderr)
            return 1
        print(exe)
        return 0
    try:
        build(args.version, args.jobs, args.force)
    except (LlamaCppError, OSError, ValueError) as exc:
        print(f"llama-cpp: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
