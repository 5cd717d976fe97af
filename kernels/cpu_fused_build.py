"""Builds and loads the fused CPU extension (`kernels/csrc/`): paged attention and the decoder layers' fused
elementwise ops, one library.

    python -m kernels.cpu_fused_build            # what `make setup` runs: compile once, cached
    python -m kernels.cpu_fused_build --variant scalar

The library is compiled with `torch.utils.cpp_extension` into `build/torch_extensions/<name>` (git-ignored), for the
machine that builds it (`-march=native`: AVX2/AVX-512 are chosen at compile time, with a portable scalar path for
the rest). A stamp next to it records a fingerprint of the source, the flags, torch's version and this CPU's flags;
`load_ops(compile_if_missing=False)` only loads a build whose stamp matches, so a stale or foreign binary is never
loaded and nothing compiles behind the caller's back.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kernels.cpu_features import cpu_flags

logger = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = (CSRC / "paged_attention_cpu.cpp", CSRC / "elementwise_cpu.cpp")
HEADERS = (CSRC / "cpu_vec.h",)
BUILD_ROOT = Path(__file__).resolve().parent.parent / "build" / "torch_extensions"


class CpuFusedBuildError(RuntimeError):
    """The extension is not built for this machine (or failed to build or load); the message says what to run."""


@dataclass(frozen=True)
class Variant:
    """One build of the source: its library name, op namespace and compiler flags."""

    name: str
    namespace: str
    cflags: tuple[str, ...]


VARIANTS = {
    # The one the backend uses: vectorised for this CPU.
    "native": Variant("paged_attention_cpu", "paged_cpu", ("-O3", "-march=native", "-fopenmp")),
    # The AVX2 path on a machine that also has AVX-512 (where "native" compiles the AVX-512 one), built by the tests.
    "avx2": Variant("paged_attention_cpu_avx2", "paged_cpu_avx2", ("-O3", "-march=native", "-mno-avx512f", "-fopenmp")),
    # The portable path (no intrinsics, baseline ISA), built by the tests to check it agrees.
    "scalar": Variant(
        "paged_attention_cpu_scalar", "paged_cpu_scalar", ("-O3", "-fopenmp", "-DPAGED_CPU_FORCE_SCALAR")
    ),
}

_lock = threading.Lock()
_loaded: set[str] = set()


def _cflags(variant: Variant) -> list[str]:
    return [*variant.cflags, f"-DPAGED_CPU_LIBRARY={variant.namespace}"]


def _cpu_flags() -> str:
    """This CPU's feature flags: a build made with -march=native elsewhere may not run here."""
    flags = cpu_flags()
    if flags:
        return " ".join(flags)
    import platform

    return platform.processor() or platform.machine()


def fingerprint(variant: Variant) -> str:
    digest = hashlib.sha256()
    for path in (*SOURCES, *HEADERS):
        digest.update(path.read_bytes())
    digest.update(json.dumps([_cflags(variant), torch.__version__, _cpu_flags()]).encode())
    return digest.hexdigest()


def build_dir(variant: Variant) -> Path:
    return BUILD_ROOT / variant.name


def _library_path(variant: Variant) -> Path:
    return build_dir(variant) / f"{variant.name}.so"


def _stamp_path(variant: Variant) -> Path:
    return build_dir(variant) / "stamp.json"


def is_built(variant: str = "native") -> bool:
    """Whether a build for this source, these flags, this torch and this CPU is on disk."""
    spec = VARIANTS[variant]
    try:
        stamp = json.loads(_stamp_path(spec).read_text())
    except (OSError, ValueError):
        return False
    return stamp.get("fingerprint") == fingerprint(spec) and _library_path(spec).exists()


def build(variant: str = "native", verbose: bool = False) -> Path:
    """Compile (or reuse, if ninja finds it up to date) and load the library; returns its path."""
    from torch.utils import cpp_extension

    spec = VARIANTS[variant]
    directory = build_dir(spec)
    directory.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with _lock:
        if spec.namespace in _loaded:  # another thread built it meanwhile
            return _library_path(spec)
        try:
            cpp_extension.load(
                name=spec.name,
                sources=[str(path) for path in SOURCES],
                extra_cflags=_cflags(spec),
                extra_ldflags=["-fopenmp"],
                build_directory=str(directory),
                is_python_module=False,
                verbose=verbose,
            )
        except Exception as error:  # compiler missing, compile error, linker error...
            raise CpuFusedBuildError(f"building {CSRC}/ ({variant}) failed: {error}") from error
        _loaded.add(spec.namespace)
        _stamp_path(spec).write_text(json.dumps({"fingerprint": fingerprint(spec), "torch": torch.__version__}))
    logger.info("built %s (%s) in %.1f s", spec.name, variant, time.perf_counter() - start)
    return _library_path(spec)


def load_ops(variant: str = "native", compile_if_missing: bool = False):
    """The extension's op namespace (`torch.ops.paged_cpu`), loading the cached build, or compiling it first when
    `compile_if_missing` (about 20-40 s of g++). Raises `CpuFusedBuildError` when it is not available."""
    spec = VARIANTS[variant]
    with _lock:
        if spec.namespace in _loaded:
            return getattr(torch.ops, spec.namespace)
    if not is_built(variant):
        if not compile_if_missing:
            raise CpuFusedBuildError(
                f"the fused CPU attention kernel is not built for this machine ({build_dir(spec)} has no matching "
                "build): run `make setup` or `python -m kernels.cpu_fused_build`"
            )
        logger.warning("compiling the fused CPU attention kernel (%s) on first use; `make setup` does it ahead", variant)
        build(variant)
    else:
        with _lock:
            if spec.namespace not in _loaded:
                try:
                    torch.ops.load_library(str(_library_path(spec)))
                except OSError as error:
                    raise CpuFusedBuildError(f"loading {_library_path(spec)} failed: {error}") from error
                _loaded.add(spec.namespace)
    return getattr(torch.ops, spec.namespace)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="native")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if is_built(args.variant):
        print(f"{VARIANTS[args.variant].name}: up to date in {build_dir(VARIANTS[args.variant])}")
        return 0
    try:
        path = build(args.variant, verbose=args.verbose)
    except CpuFusedBuildError as error:
        # NOTE: not fatal for `make setup`: attention_backend=auto then falls back to the PyTorch backend.
        print(f"warning: {error}\nattention_backend=auto will use the PyTorch backend on CPU")
        return 0
    ops = getattr(torch.ops, VARIANTS[args.variant].namespace)
    print(f"built {path} (SIMD path: {ops.simd_path()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
