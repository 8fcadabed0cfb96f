# Sourced by the GPU scripts: start the MPS daemon when there is one (and NO_MPS is unset), so processes
# sharing the GPU run their small kernels side by side (dropped when a CUDA call through it does not answer);
# $PY must be set. Exports MPS_STATE (on / off / not used).
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

