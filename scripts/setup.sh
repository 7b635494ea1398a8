#!/usr/bin/env bash
# Installs what a fresh machine lacks to build and test multidb: libclang, which the bindgen
# build of sqlite-loadable needs, and moto_server, the S3 server of the S3 tests. Safe to run
# again; does nothing when everything is there.
set -euo pipefail

have_libclang() {
  [ -n "${LIBCLANG_PATH:-}" ] && return 0
  ldconfig -p 2>/dev/null | grep -q 'libclang[-.0-9]*\.so' && return 0
  ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1
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

# moto_server: the real S3 server (PyPI `moto[server]`) that the S3 tests start on 127.0.0.1.
# pip first; where the system Python refuses (PEP 668, Debian's python3), a private venv whose
# moto_server is linked into a directory on PATH.
MOTO_SPEC="moto[server]>=5.2,<6"

install_moto() {
  if ! command -v python3 >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >/dev/null
    else
      echo "setup: python3 missing; install it, then: pip install \"$MOTO_SPEC\"" >&2
      return 1
    fi
  fi
  if python3 -m pip install --quiet "$MOTO_SPEC" >/dev/null 2>&1; then
    # pyenv puts new scripts on PATH only through its shims.
    if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
    command -v moto_server >/dev/null 2>&1 && return 0
  fi
  local venv bin_dir
  if [ "$(id -u)" = 0 ]; then
    venv="${MULTIDB_MOTO_VENV:-/opt/multidb-moto}"
    bin_dir="${MULTIDB_BIN_DIR:-/usr/local/bin}"
  else
    venv="${MULTIDB_MOTO_VENV:-$HOME/.local/share/multidb-moto}"
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
  "$venv/bin/pip" install --quiet "$MOTO_SPEC"
  mkdir -p "$bin_dir"
  ln -sf "$venv/bin/moto_server" "$bin_dir/moto_server"
  if ! command -v moto_server >/dev/null 2>&1; then
    echo "setup: moto_server is in $bin_dir, which is not on PATH; add it, or set MOTO_SERVER=$bin_dir/moto_server" >&2
    return 1
  fi
}

if ! command -v moto_server >/dev/null 2>&1; then
  echo "setup: installing $MOTO_SPEC (the S3 server of the S3 tests)" >&2
  install_moto
fi
