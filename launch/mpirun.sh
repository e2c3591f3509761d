#!/usr/bin/env bash
# Data-parallel training on one machine: N MPI ranks, one BLAS thread each.
#
#   launch/mpirun.sh 4 --model cnn --epochs 10        # 4 ranks; the rest are `distbp train` options
#   HOSTFILE=launch/hostfile.example launch/mpirun.sh 8 ...   # ranks spread over the hosts listed there
#
# HOSTFILE is for MPICH's launcher (hydra: `mpiexec -f FILE`, lines `host:N`). Open MPI's mpirun takes
# `--hostfile FILE` with lines `host slots=N`: with Open MPI run it yourself,
#   mpirun --hostfile FILE -n 8 -x OMP_NUM_THREADS=1 python3 -m distbp train --backend mpi ...
# mpiexec comes with the mpich wheel that `pip install -e .` installs. When the Python that runs the ranks
# (PYTHON, default python3) is a virtual environment's, the mpiexec beside it is used (it need not be on
# PATH); else the first on PATH (a cluster's own mpiexec).
set -euo pipefail
# arrays that may be empty expand as ${a[@]+"${a[@]}"}: under set -u, bash before 4.4 (macOS's 3.2) stops at
# an empty "${a[@]}" as an unbound variable
usage="usage: launch/mpirun.sh RANKS [distbp train options...]"
ranks=${1:-}
# mpiexec reads "abc" or "0" as one rank and "2.5" as two: refuse them here
if ! [[ $ranks =~ ^[1-9][0-9]*$ ]]; then
  echo "launch/mpirun.sh: RANKS must be a positive integer, not '$ranks'" >&2
  echo "$usage" >&2
  exit 2
fi
# mpiexec reads a count past its integer as another (99999999999999999999 ranks ran 2): bound it
if [ ${#ranks} -gt 6 ]; then
  echo "launch/mpirun.sh: RANKS must be at most 999999, not '$ranks'" >&2
  exit 2
fi
shift
hosts=()
if [ -n "${HOSTFILE:-}" ]; then
  # checked here: mpiexec says it in lines of its own internals
  if ! [ -f "$HOSTFILE" ] || ! [ -r "$HOSTFILE" ]; then
    echo "launch/mpirun.sh: HOSTFILE '$HOSTFILE' is not a readable file" >&2
    exit 2
  fi
  hosts=(-f "$HOSTFILE")
fi
# one BLAS thread per rank, so that ranks do not fight over the cores
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
python=${PYTHON:-python3}
# checked here: mpiexec would say it once per rank, among lines of its own
if ! python_path=$(command -v "$python"); then
  echo "launch/mpirun.sh: PYTHON '$python' is not a command here (not on PATH, or not an executable file)" >&2
  exit 2
fi
mpiexec=mpiexec
# a virtual environment's own (beside a system Python may be the system's MPI, not the wheel's)
if [ -x "$(dirname "$python_path")/mpiexec" ] && [ -f "$(dirname "$(dirname "$python_path")")/pyvenv.cfg" ]; then
  mpiexec=$(dirname "$python_path")/mpiexec
fi
exec "$mpiexec" ${hosts[@]+"${hosts[@]}"} -n "$ranks" "$python" -m distbp train --backend mpi "$@"
