# Sourced by bench/gpu_*.sh (needs $PY): says what the machine is, then turns on NVIDIA's MPS daemon so several
# processes' small kernels share the GPU side by side; dropped when a CUDA call through it does not answer
# (or NO_MPS is set). Exports MPS_STATE (on / off / not used).
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
$PY -c "import torch, os, platform; print('torch', torch.__version__, 'cuda', torch.version.cuda,
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu', os.cpu_count(), 'cpus', platform.platform())"
MPS=$(command -v nvidia-cuda-mps-control || ls /usr/local/nvidia/bin/nvidia-cuda-mps-control 2>/dev/null)
if [ -n "$MPS" ] && [ -z "${NO_MPS:-}" ]; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
  mkdir -p /tmp/mps /tmp/mps-log
  if timeout 20 "$MPS" -d && timeout 40 $PY -c "import torch; print('MPS check', torch.ones(8, device='cuda').sum().item())"; then
    echo "MPS on ($MPS)"; export MPS_STATE=on
  else
    echo quit | timeout 10 "$MPS"; unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY; echo "MPS off"; export MPS_STATE=off
  fi
else
  echo "MPS not used"; export MPS_STATE="not used"
fi
