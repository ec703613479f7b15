"""Build script for pyfinetune's compiled extension, ``pyfinetune._C``.

CPU kernels are always built. CUDA kernels are built whenever torch is a CUDA
build and nvcc is found; a GPU is not needed to compile them.

Environment variables:
  PYFINETUNE_FORCE_CUDA=1   fail the build if the CUDA kernels cannot be built
  PYFINETUNE_FORCE_CPU=1    skip the CUDA kernels even when they could be built
  TORCH_CUDA_ARCH_LIST      GPU architectures, default "8.0;9.0+PTX"
  MAX_JOBS                  parallel compile jobs (ninja)
  PYFINETUNE_DEBUG_INFO=1   keep the debug information in pyfinetune/_C (stripped by default:
                            Python's own -g makes the library ~18x larger)
"""

import glob
import os
import platform
import re
import shutil
import subprocess
import sys

import setuptools
from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0+PTX"


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _fix_cuda_home():
    # torch derives CUDA_HOME from the nvcc on PATH (/usr/local/bin/nvcc -> /usr/local),
    # which breaks linking; prefer the real toolkit folder when it exists.
    if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
        if os.path.exists("/usr/local/cuda/bin/nvcc"):
            os.environ["CUDA_HOME"] = "/usr/local/cuda"


def _cpu_isa_flags():
    flags = []
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        for isa in ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "neon", "asimd"):
            if f" {isa}" in info:
                flags.append(isa)
    except OSError:
        pass
    return flags or [platform.machine()]


def _cpu_isa_choice():
    """The CPU vector ISA the kernels are compiled for: "avx512", "avx2" or "generic".

    The default, auto, picks what the building machine has and torch itself dispatches to: AVX-512
    (F, BW, VL, DQ) when torch's own CPU capability is AVX512 (or better), else AVX2+FMA (x86-64
    only), else portable code. PYFINETUNE_CPU_ISA=avx2 or generic builds a binary for machines
    older than the building one; the import check refuses a CPU that lacks the compiled ISA.
    """
    choice = os.environ.get("PYFINETUNE_CPU_ISA", "auto").strip().lower()
    if choice not in ("auto", "avx512", "avx2", "generic"):
        raise RuntimeError(f"PYFINETUNE_CPU_ISA must be auto, avx512, avx2 or generic, got {choice!r}")
    if choice == "auto":
        isa = _cpu_isa_flags()
        on_x86 = platform.machine().lower() in ("x86_64", "amd64")
        import torch

        torch_cap = torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else ""
        if on_x86 and all(f in isa for f in ("avx512f", "avx512bw", "avx512vl", "avx512dq", "fma")) and (
            torch_cap.startswith("AVX512") or torch_cap == "AMX"
        ):
            choice = "avx512"
        elif on_x86 and "avx2" in isa and "fma" in isa:
            choice = "avx2"
        else:
            choice = "generic"
    return choice


def _gcc_major():
    """The major version of the C++ compiler when it is GCC (None for clang or when unknown)."""
    cxx = os.environ.get("CXX", "c++")
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
        if "clang" in out.lower():
            return None
        version = subprocess.run([cxx, "-dumpversion"], capture_output=True, text=True, timeout=30).stdout
        return int(version.strip().split(".")[0])
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def _nvidia_pip_include_dirs():
    # cusparse.h, cublas_v2.h ... (which torch's CUDA headers include) ship with torch's pip
    # dependencies, not always with the toolkit.
    dirs = []
    for site in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cu12/include"):
            d = os.path.join(site, sub)
            if os.path.isdir(d) and d not in dirs:
                dirs.append(d)
        for lib in ("cusparse", "cublas", "cuda_runtime"):  # the per-library layout of CUDA 12 wheels
            d = os.path.join(site, "nvidia", lib, "include")
            if os.path.isdir(d) and d not in dirs:
                dirs.append(d)
    return dirs


def _link_missing_headers(sources, toolkit_include, folder):
    """Fill ``folder`` with links to the entries of ``sources`` that ``toolkit_include`` lacks;
    return the names linked. The pip wheels also carry the CUDA runtime's own headers, of their
    CUDA release: put ahead of the toolkit's on the include path they break nvcc whenever the
    releases differ (torch 2.15.0+cu132 beside nvcc 13.0: "CUDA compiler and CUDA toolkit headers
    are incompatible"), so the build sees only the headers the toolkit does not have."""
    have = set(os.listdir(toolkit_include)) if os.path.isdir(toolkit_include) else set()
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    linked = []
    for d in sources:
        for name in sorted(os.listdir(d)):
            if name in have or name in linked:
                continue
            src, dst = os.path.join(d, name), os.path.join(folder, name)
            try:
                os.symlink(src, dst)
            except OSError:  # no symlinks (Windows without the privilege): copy
                if os.path.isdir(src):
                    shutil.copytree(src, dst)
                else:
                    shutil.copy2(src, dst)
            linked.append(name)
    return linked


def _nvidia_pip_includes(cuda_home):
    sources = _nvidia_pip_include_dirs()
    if not sources:
        return []
    folder = os.path.join(ROOT, "build", "pip_cuda_include")
    linked = _link_missing_headers(sources, os.path.join(cuda_home, "include"), folder)
    return [folder] if linked else []


def _write_build_info(torch, with_cuda, archs, cuda_version, cpu_isa, mta_arg_bytes):
    path = os.path.join(ROOT, "pyfinetune", "_build_info.py")
    with open(path, "w") as f:
        f.write("# Written by setup.py at build time; do not edit.\n")
        f.write(f"TORCH_VERSION = {torch.__version__!r}\n")
        f.write(f"TORCH_CUDA_VERSION = {torch.version.cuda!r}\n")
        f.write(f"WITH_CUDA = {with_cuda!r}\n")
        f.write(f"CUDA_VERSION = {cuda_version!r}\n")
        f.write(f"CUDA_ARCHS = {archs!r}\n")
        f.write(f"CPU_ISA = {cpu_isa!r}\n")
        f.write(f"MTA_ARG_BYTES = {mta_arg_bytes!r}\n")
        f.write(f"PYTHON_VERSION = {platform.python_version()!r}\n")


def _nvcc_version(cuda_home):
    try:
        out = subprocess.check_output([os.path.join(cuda_home, "bin", "nvcc"), "--version"], text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    for token in out.replace(",", " ").split():
        if token.startswith("V") and token[1:2].isdigit():
            return token[1:]
    return None


def _cuda_major_mismatch(nvcc_version, torch_cuda, cuda_home, torch_version):
    """Why nvcc cannot build for this torch, or None. torch's BuildExtension refuses a toolkit
    whose major version differs from torch's CUDA (and only warns about the minor version), but
    only once the build is under way, as a traceback; deciding here lets a plain build fall back
    to the CPU kernels with the reason, and PYFINETUNE_FORCE_CUDA=1 fail with it."""
    def major(version):
        head = str(version or "").split(".")[0]
        return int(head) if head.isdigit() else None

    if nvcc_version is None:
        return f"nvcc at {cuda_home} did not report its version (nvcc --version)"
    nvcc_major, torch_major = major(nvcc_version), major(torch_cuda)
    if nvcc_major is None or torch_major is None or nvcc_major == torch_major:
        return None
    return (f"nvcc {nvcc_version} (CUDA {nvcc_major}, at {cuda_home}) cannot build for torch {torch_version}, "
            f"which was built with CUDA {torch_cuda}: the major versions must match (set CUDA_HOME to a "
            f"CUDA {torch_major}.x toolkit, or install a torch built for CUDA {nvcc_major})")


def _arch_major(arch):
    digits = arch.split("+")[0].split(".")[0]
    return int(digits) if digits.isdigit() else None


def _mta_arg_bytes(cuda_version, archs):
    """Kernel-argument bytes of the multi-tensor optimizer launches (multi_tensor_apply.cuh).

    32764 (one launch for up to ~3600 chunks of 65536 elements) where CUDA allows it: nvcc 12.1+
    and every arch sm_70 or newer; else the classic 4096 (several launches for big lists).
    PYFINETUNE_MTA_ARG_BYTES overrides it (4096 for a driver older than CUDA 12.1)."""
    env = os.environ.get("PYFINETUNE_MTA_ARG_BYTES")
    if env:
        if not env.isdigit() or not 4096 <= int(env) <= 32764:
            raise RuntimeError(f"PYFINETUNE_MTA_ARG_BYTES must be an integer in [4096, 32764], got {env!r}")
        return int(env)
    try:
        nvcc = tuple(int(v) for v in (cuda_version or "").split(".")[:2])
    except ValueError:
        nvcc = ()
    majors = [_arch_major(a) for a in archs]
    if len(nvcc) == 2 and nvcc >= (12, 1) and all(m is not None and m >= 7 for m in majors):
        return 32764
    return 4096


# pyproject.toml's [project] table needs setuptools 61 (PEP 621), editable installs 64 (PEP 660).
MIN_SETUPTOOLS = 64


def _setuptools_too_old(version):
    """The message for a setuptools release older than MIN_SETUPTOOLS, else None.

    An older one ignores pyproject.toml's [project] table without a word and builds a package named
    UNKNOWN 0.0.0 with no dependencies and no `pyfinetune` command. pip's --no-build-isolation (how
    pyfinetune is built, against the installed torch) uses the installed setuptools, and a new
    Python 3.9 virtual environment comes with setuptools 58.
    """
    major = re.match(r"\d+", str(version))
    if major and int(major.group()) >= MIN_SETUPTOOLS:
        return None
    return (f"pyfinetune needs setuptools>={MIN_SETUPTOOLS} to build, and this Python ({sys.executable}) has "
            f"setuptools {version}, which would install it as a package named UNKNOWN without its "
            f"dependencies or the pyfinetune command. Upgrade it, then install again: "
            f"pip install -U \"setuptools>={MIN_SETUPTOOLS}\"")


def _import_torch():
    try:
        import torch
    except ImportError as e:
        raise RuntimeError(
            "pyfinetune compiles its kernels against the installed torch, and torch is not installed in "
            f"{sys.executable}: install torch first (pip install torch numpy ninja), then build with "
            "pip install --no-build-isolation ."
        ) from e
    return torch


def _environment_torch():
    """(version, path) of the torch this Python's own environment imports, or None when it has none:
    what `python -E` imports, which leaves out PYTHONPATH and with it the torch that pip's isolated
    build environment puts first."""
    import tempfile

    code = "import os, torch; print(torch.__version__); print(os.path.realpath(torch.__file__))"
    with tempfile.TemporaryDirectory() as cwd:  # no ./torch to shadow the installed one
        try:
            out = subprocess.run([sys.executable, "-E", "-c", code], cwd=cwd, capture_output=True, text=True,
                                 timeout=600)
        except (OSError, subprocess.SubprocessError):
            return None
    lines = out.stdout.strip().splitlines()
    return (lines[0], lines[1]) if out.returncode == 0 and len(lines) >= 2 else None


def _isolated_build_conflict(build_version, build_path, env_torch):
    """The message when pyfinetune would be compiled against another torch than the one installed
    (pip's default isolated build: a torch from the package index in a temporary environment), else
    None. The package then requires the torch it was built against, so pip would replace the
    installed one (a CUDA build by the index's, for one); --no-build-isolation builds against the
    installed torch. None when the environment has no torch (a fresh install: the build's torch is
    the one pip installs) or has the same release."""
    if env_torch is None or os.environ.get("PYFINETUNE_ALLOW_ISOLATED_BUILD", "") == "1":
        return None
    env_version, env_path = env_torch
    if env_version == build_version or os.path.realpath(env_path) == os.path.realpath(build_path):
        return None
    return (f"pyfinetune compiles its kernels against one torch release and requires it at run time. This "
            f"build sees torch {build_version} (at {os.path.dirname(build_path)}, pip's isolated build "
            f"environment), but {sys.executable} has torch {env_version}: installing would replace your "
            f"torch {env_version} by {build_version}. Build against the torch you have instead: "
            f"pip install --no-build-isolation <this package> (with ninja, numpy and \"setuptools>=64\" "
            f"installed first), or set PYFINETUNE_ALLOW_ISOLATED_BUILD=1 to build against "
            f"{build_version} anyway.")


def build_extension():
    _fix_cuda_home()
    torch = _import_torch()
    # pip's isolated build environment (a temporary pip-build-env-* folder on PYTHONPATH; not
    # --no-build-isolation): compare with the environment's own torch (a second interpreter).
    if "pip-build-env-" in os.path.realpath(torch.__file__):
        conflict = _isolated_build_conflict(torch.__version__, torch.__file__, _environment_torch())
        if conflict:
            raise SystemExit("error: " + conflict)
    from torch.utils import cpp_extension

    force_cuda = _flag("PYFINETUNE_FORCE_CUDA")
    force_cpu = _flag("PYFINETUNE_FORCE_CPU")
    if force_cuda and force_cpu:
        raise RuntimeError("PYFINETUNE_FORCE_CUDA and PYFINETUNE_FORCE_CPU are both set; choose one")

    cuda_home = cpp_extension.CUDA_HOME
    nvcc_found = cuda_home is not None and os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))
    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is not a CUDA build")
    if not nvcc_found:
        reasons.append("nvcc not found (set CUDA_HOME)")
    if force_cpu:
        reasons.append("PYFINETUNE_FORCE_CPU=1")
    nvcc_version = _nvcc_version(cuda_home) if nvcc_found else None
    if not reasons:
        mismatch = _cuda_major_mismatch(nvcc_version, torch.version.cuda, cuda_home, torch.__version__)
        if mismatch:
            reasons.append(mismatch)
    with_cuda = not reasons
    if force_cuda and not with_cuda:
        raise RuntimeError("PYFINETUNE_FORCE_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(reasons))

    sources = [os.path.join("csrc", "pyfinetune.cpp")]
    sources += sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    sources = sorted(set(sources))
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    cxx_flags = ["-O3", "-fno-math-errno", "-Wno-unknown-pragmas", "-fdiagnostics-color=always"]
    cpu_isa = _cpu_isa_choice()
    # at::vec::Vectorized picks its implementation from CPU_CAPABILITY_<ISA>. The import check
    # refuses to load a build on a CPU without its ISA instead of crashing.
    if cpu_isa == "avx2":
        cxx_flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    elif cpu_isa == "avx512":
        cxx_flags += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                      "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"]
        gcc = _gcc_major()
        if gcc is not None and gcc <= 12:
            # GCC 12's AVX-512 intrinsics (the half-float conversions that at::vec inlines into
            # every kernel) build on deliberately undefined vectors and then warn about them,
            # hundreds of times per file (GCC bug 105593, fixed in GCC 13).
            cxx_flags += ["-Wno-maybe-uninitialized", "-Wno-uninitialized"]
    if sys.platform != "win32":
        cxx_flags += ["-fopenmp"]
    extra_link = ["-fopenmp"] if sys.platform != "win32" else []
    if sys.platform.startswith("linux") and not _flag("PYFINETUNE_DEBUG_INFO"):
        # Python's CFLAGS compile with -g: without this the library carries ~27 MB of DWARF.
        extra_link += ["-Wl,--strip-debug"]
    define_macros = []

    archs = []
    cuda_version = None
    mta_arg_bytes = None
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
        archs = [a for a in os.environ["TORCH_CUDA_ARCH_LIST"].replace(",", ";").replace(" ", ";").split(";") if a]
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        include_dirs += _nvidia_pip_includes(cuda_home)
        define_macros.append(("PYFINETUNE_WITH_CUDA", "1"))
        cuda_version = nvcc_version
        ext_cls = cpp_extension.CUDAExtension
        extra = {
            "cxx": cxx_flags + ["-DPYFINETUNE_WITH_CUDA=1"],
            "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr",
                     "-DPYFINETUNE_WITH_CUDA=1"],
        }
        mta_arg_bytes = _mta_arg_bytes(cuda_version, archs)
        extra["nvcc"].append(f"-DPF_MTA_ARG_BYTES={mta_arg_bytes}")
    else:
        ext_cls = cpp_extension.CppExtension
        extra = {"cxx": cxx_flags}

    _write_build_info(torch, with_cuda, archs, cuda_version, cpu_isa, mta_arg_bytes)
    print(
        f"pyfinetune build: cpu={cpu_isa} cuda={'yes' if with_cuda else 'no'}"
        + (f" (nvcc {cuda_version}, archs {';'.join(archs)}, optimizer launch arguments {mta_arg_bytes} B)" if with_cuda else f" ({'; '.join(reasons)})")
        + f" torch={torch.__version__}",
        flush=True,
    )
    ext = ext_cls(
        name="pyfinetune._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args=extra,
        extra_link_args=extra_link,
        py_limited_api=False,
    )
    return ext, cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None or _has_ninja_module())


def _has_ninja_module():
    try:
        import ninja  # noqa: F401
        return True
    except ImportError:
        return False


def _torch_requirement():
    # The library is tied to the torch release it was compiled against (pyfinetune/__init__.py
    # refuses any other at import): say so in the metadata, so that pip warns before replacing it.
    import torch

    return f"torch=={torch.__version__.split('+')[0]}"


_too_old = _setuptools_too_old(setuptools.__version__)
if _too_old:
    raise SystemExit("error: " + _too_old)
ext, build_cls = build_extension()
setup(ext_modules=[ext], cmdclass={"build_ext": build_cls}, install_requires=[_torch_requirement(), "numpy"])
