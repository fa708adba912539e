#!/usr/bin/env bash
# Install slimllm for development and testing into the active Python environment (a virtualenv
# is assumed): the project with its test, docs and serve extras, then the MPI stack. mpi4jax
# builds from source against the MPI that the mpich wheel provides, so mpich (and its mpicc)
# must be installed first and on PATH; where CUDA headers are only half present, CUDA_PATH must
# name the toolkit root that really holds include/cuda_runtime.h, or mpi4jax's CUDA bridge fails
# to build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -e '.[test,docs,serve]'
python -m pip install mpi4py mpich
PATH="$(python -c 'import os, sys; print(os.path.dirname(sys.executable))'):$PATH"
export PATH
for root in /usr/local/cuda /usr/local/cuda-*; do
  if [ -f "$root/include/cuda_runtime.h" ]; then export CUDA_PATH="$root"; break; fi
done
python -m pip install mpi4jax
