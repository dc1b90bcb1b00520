"""Runtime CPU dispatch (csrc/cpu/dispatch.h): one build carries the CPU
kernels for every capability; the best one this CPU allows is chosen at import
and MSDA_CPU_CAPABILITY forces a lower one.

* Every allowed path other than the one this run uses gets the kernel
  correctness suite (float64 truth, gradcheck, edge cases, determinism) in a
  subprocess with MSDA_CPU_CAPABILITY set, so no path ships untested.
* The built library holds no AVX-512 instruction outside the AVX-512 path:
  forcing avx2 on an AVX-512 machine would not notice one (it runs anyway),
  a CPU without AVX-512 would crash on it.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from collections import defaultdict

import pytest

from msda import _extension

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = _extension.CPU_CAPABILITY_ENV
KERNEL_SUITE = [
    "tests/test_op_vs_reference.py",
    "tests/test_gradcheck.py",
    "tests/test_edge_cases.py",
    "tests/test_determinism.py",
    "tests/test_v2_op.py",  # the v2 discrete kernels have a vector path per capability
    "tests/test_v2_edge_cases.py",
]
EXT = _extension.EXTENSION
ALLOWED: list[str] = list(EXT.cpu_capabilities_allowed()) if EXT is not None else []
IS_X86 = platform.machine().lower() in ("x86_64", "amd64")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (ENV, "MSDA_CPU_CAPABILITIES")}
    env.update(extra)
    return env


def _chosen_in_subprocess(value: str | None) -> subprocess.CompletedProcess:
    code = "import msda._extension as e; print(e.EXTENSION.cpu_capability())"
    env = _env() if value is None else _env(**{ENV: value})
    return subprocess.run([sys.executable, "-W", "always", "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)


def test_compiled_and_allowed_paths():
    compiled = list(EXT.cpu_capabilities_compiled())
    assert compiled[-1] == "default"
    if IS_X86 and _extension.BUILD_INFO.CPU_CAPABILITIES == ["default", "avx2", "avx512"]:
        assert compiled == ["avx512", "avx2", "default"]
    assert ALLOWED and set(ALLOWED) <= set(compiled) and ALLOWED[-1] == "default"


def test_unset_variable_chooses_the_best_allowed_path():
    result = _chosen_in_subprocess(None)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ALLOWED[0]
    assert ENV not in result.stderr


@pytest.mark.parametrize("value", ALLOWED)
def test_variable_selects_each_allowed_path(value):
    result = _chosen_in_subprocess(value)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == value
    assert ENV not in result.stderr  # no warning for an honoured value


@pytest.mark.parametrize("value", [v.upper() for v in ALLOWED] + [v.capitalize() for v in ALLOWED])
def test_variable_accepts_any_case(value):
    result = _chosen_in_subprocess(value)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == value.lower()
    assert ENV not in result.stderr


def test_build_variable_at_run_time_warns():
    # MSDA_CPU_CAPABILITIES (plural) is setup.py's: at run time it changes nothing, and says so.
    code = "import msda._extension as e; print(e.EXTENSION.cpu_capability())"
    result = subprocess.run([sys.executable, "-W", "always", "-c", code], env=_env(MSDA_CPU_CAPABILITIES="default"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ALLOWED[0]
    assert "MSDA_CPU_CAPABILITIES is read only when msda is built" in result.stderr
    assert f"set {ENV}" in result.stderr
    assert "MSDA_CPU_CAPABILITIES" not in _chosen_in_subprocess(None).stderr


@pytest.mark.parametrize("value", ["sse9", "AVX2 ", "native"])
def test_refused_value_warns_and_uses_the_best_path(value):
    result = _chosen_in_subprocess(value)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ALLOWED[0]
    assert f"{ENV}={value} is not a known value" in result.stderr
    assert f"this CPU allows: {', '.join(ALLOWED)}" in result.stderr


@pytest.mark.skipif("avx512" in ALLOWED, reason="this CPU runs AVX-512, so asking for it is honoured")
def test_path_the_cpu_lacks_is_refused():
    result = _chosen_in_subprocess("avx512")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ALLOWED[0]
    assert f"{ENV}=avx512 is not supported by this CPU" in result.stderr or "was not compiled" in result.stderr


# The path this run uses is covered by the suite itself; the others here.
OTHER_PATHS = [c for c in ALLOWED if c != (EXT.cpu_capability() if EXT is not None else None)]


@pytest.mark.slow
@pytest.mark.parametrize("value", OTHER_PATHS)
def test_kernel_suite_on_other_path(value):
    env = _env(**{ENV: value, "MSDA_REQUIRE_EXTENSION": "1", "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")})
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *KERNEL_SUITE],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    tail = result.stdout[-3000:] + result.stderr[-2000:]
    assert result.returncode == 0, tail
    assert re.search(r"\d+ passed", result.stdout), tail


# --- no AVX-512 instruction outside the AVX-512 path --------------------------

# AVX-512 is EVEX-encoded (first opcode byte 0x62 after any legacy prefixes;
# 0x62 is no valid instruction in 64-bit mode otherwise), or touches zmm or
# opmask (k0-k7) registers, whose instructions are VEX-encoded.
LEGACY_PREFIXES = {"66", "67", "f2", "f3", "f0", "2e", "36", "3e", "26", "64", "65"}
INSN = re.compile(r"^\s*[0-9a-f]+:\t((?:[0-9a-f]{2} )+)\s*\t(\S+)\s*(.*)$")
FUNCTION = re.compile(r"^([0-9a-f]+) <(.*)>:$")
TARGET = re.compile(r"^([0-9a-f]+) <")


def _is_avx512(raw: str, mnemonic: str, operands: str) -> bool:
    first = next((b for b in raw.split() if b not in LEGACY_PREFIXES), "")
    if first == "62":
        return True
    return "zmm" in operands or bool(re.search(r"%k[0-7]\b", operands)) or mnemonic.startswith("k")


def _namespaced_avx512(name: str) -> bool:
    # msda::cpu::AVX512::..., at::vec::AVX512::..., and instances of templates
    # (at::parallel_for's callbacks) whose arguments are such types. The
    # bodies GCC outlines for OpenMP keep their mangled names (objdump cannot
    # demangle `_Z...._omp_fn.0`), where the namespace reads `6AVX512`; they
    # are entered through libgomp, never by a direct call, so the call graph
    # cannot place them.
    return "AVX512::" in name or "6AVX512" in name


def avx512_leaks(objdump_text: str) -> list[str]:
    """Functions with AVX-512 instructions that code outside the AVX-512 path can run.

    The AVX-512 path is the functions in an AVX512 namespace, plus every
    function called only from the path (the compiler's local clones such as
    `f [clone .constprop.0]`, and inline functions of other libraries that the
    AVX-512 kernels alone instantiate): a fixed point over the direct calls and
    tail jumps of the disassembly.
    """
    names: dict[int, str] = {}
    avx512: dict[int, int] = defaultdict(int)
    callers: dict[int, set[int]] = defaultdict(set)
    current = -1
    for line in objdump_text.splitlines():
        m = FUNCTION.match(line)
        if m:
            current = int(m.group(1), 16)
            names[current] = m.group(2)
            continue
        m = INSN.match(line)
        if not m or current < 0:
            continue
        raw, mnemonic, operands = m.groups()
        if _is_avx512(raw, mnemonic, operands):
            avx512[current] += 1
        t = TARGET.match(operands)
        if t and (mnemonic.startswith("call") or mnemonic.startswith("jmp")):
            callers[int(t.group(1), 16)].add(current)
    path = {a for a, n in names.items() if _namespaced_avx512(n)}
    grew = True
    while grew:
        grew = False
        for a in names:
            if a not in path and callers.get(a) and callers[a] - {a} <= path:
                path.add(a)
                grew = True
    return sorted(f"{names[a]} ({n} instructions)" for a, n in avx512.items() if a not in path)


SAMPLE = """\
0000000000001000 <msda::cpu::AVX512::kernel()>:
    1000:\t62 f1 7c 48 10 07    \tvmovups (%rdi),%zmm0
    1006:\te8 f5 0f 00 00       \tcall   2000 <helper() [clone .constprop.0]>
0000000000002000 <helper() [clone .constprop.0]>:
    2000:\t62 e1 7c 28 10 0f    \tvmovups (%rdi),%ymm17
    2006:\tc3                   \tret
0000000000003000 <shared()>:
    3000:\tc5 fc 10 07          \tvmovups (%rdi),%ymm0
    3004:\tc5 f8 92 c8          \tkmovw  %eax,%k1
0000000000004000 <msda::cpu::DEFAULT::kernel()>:
    4000:\te8 fb ef ff ff       \tcall   3000 <shared()>
"""


def test_avx512_detector_finds_leaks_and_follows_calls():
    # A helper only the AVX-512 kernel calls belongs to it; `shared` is reachable from the
    # default path and holds an opmask instruction: exactly that one is reported.
    assert avx512_leaks(SAMPLE) == ["shared() (1 instructions)"]
    # Called from the default path as well, the helper's EVEX instruction is a leak too.
    both = SAMPLE + "    4005:\te8 f6 df ff ff       \tcall   2000 <helper() [clone .constprop.0]>\n"
    assert avx512_leaks(both) == ["helper() [clone .constprop.0] (1 instructions)", "shared() (1 instructions)"]
    # An OpenMP body of an AVX-512 kernel, named only in mangled form, is on the path, and so
    # is what only it calls; the same body of the default kernel is not.
    omp = """\
0000000000005000 <_ZN2at8internal15invoke_parallelIZN4msda3cpu6AVX5126kernelEv._omp_fn.0>:
    5000:\t62 f1 7c 48 10 07    \tvmovups (%rdi),%zmm0
    5006:\te8 f5 0f 00 00       \tcall   6000 <std::vector<float>::vector() [clone .constprop.0]>
0000000000006000 <std::vector<float>::vector() [clone .constprop.0]>:
    6000:\t62 e1 7c 28 10 0f    \tvmovups (%rdi),%ymm17
0000000000007000 <_ZN2at8internal15invoke_parallelIZN4msda3cpu7DEFAULT6kernelEv._omp_fn.0>:
    7000:\t62 f1 7c 48 10 07    \tvmovups (%rdi),%zmm0
"""
    assert avx512_leaks(omp) == ["_ZN2at8internal15invoke_parallelIZN4msda3cpu7DEFAULT6kernelEv._omp_fn.0 (1 instructions)"]


TIED_TO_A_MACHINE = any(f.startswith(("-march", "-mavx", "-mcpu")) for f in
                        (getattr(_extension.BUILD_INFO, "CPU_FLAGS", "") or "").split())


@pytest.mark.skipif(not IS_X86, reason="AVX-512 exists on x86-64 only")
@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils)")
@pytest.mark.skipif(TIED_TO_A_MACHINE, reason="built with MSDA_CPU_FLAGS that target one machine's instructions")
def test_no_avx512_outside_the_avx512_path():
    text = subprocess.run(["objdump", "-d", "-C", "-w", EXT.LIBRARY], capture_output=True, text=True,
                          check=True).stdout
    if "avx512" in EXT.cpu_capabilities_compiled():
        assert "AVX512::" in text and "zmm" in text, "no AVX-512 kernels in the library: is the check blind?"
    leaks = avx512_leaks(text)
    assert not leaks, f"AVX-512 instructions reachable outside the AVX-512 path: {leaks[:20]}"
