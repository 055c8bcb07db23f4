#!/usr/bin/env bash
# Prepare a lent GPU box (no internet) for llama-rig GPU proofs. Expects, in the repo root,
# the ignored folder .device/ (carried): whl/ (Python wheels for cp312: fabric, invoke, paramiko,
# huggingface-hub, jinja2, rich, PyYAML, packaging and their deps; for the bench/tune proofs also
# numpy, gguf, matplotlib and theirs), debs/ (ccache + libs, Debian 12), llama.cpp.bundle (git
# bundle of the test upstream tree, tests/fixtures/llama_upstream.py).
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .device/whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
mkdir -p /tmp/ccache-root
for f in .device/debs/*.deb; do dpkg -x "$f" /tmp/ccache-root; done
mkdir -p /opt/upstream
if [ ! -d /opt/upstream/llama.cpp/.git ]; then
  git clone -q .device/llama.cpp.bundle /opt/upstream/llama.cpp
  git -C /opt/upstream/llama.cpp checkout -q -B master
fi
cat > /tmp/rig-env.sh <<EOT
export PYTHONPATH=/tmp/site:$PWD
export PATH=/tmp/site/bin:/tmp/ccache-root/usr/bin:/usr/local/cuda/bin:\$PATH
export LD_LIBRARY_PATH=/tmp/ccache-root/usr/lib/x86_64-linux-gnu:\${LD_LIBRARY_PATH:-}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
EOT
. /tmp/rig-env.sh
echo "== machine"; nproc; free -g | head -2; cat /etc/os-release | head -2; nvidia-smi -L; nvcc --version | tail -2; cmake --version | head -1; ninja --version; gcc --version | head -1
ccache --version | head -1 || echo "ccache: FAILED to run"
python3 -c "import fabric, invoke, huggingface_hub, rich, jinja2, yaml; print('python deps ok', huggingface_hub.__version__)"
# the bench/tune proofs also write models (numpy, gguf) and PNG charts (matplotlib)
python3 -c "
import importlib.util
missing = [m for m in ('numpy', 'gguf', 'matplotlib') if importlib.util.find_spec(m) is None]
print('bench deps ok' if not missing else 'bench deps MISSING: ' + ', '.join(missing))"
