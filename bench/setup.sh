#!/usr/bin/env bash
# Install the peer tools of the benchmark, each in its own place:
#   R + glmGamPoi + DESeq2     Debian packages (needs root; skipped otherwise)
#   bench/.venvs/pydeseq2      PyDESeq2 0.5.4
#   bench/.venvs/delnx         delnx 0.3.0 (JAX)
#   bench/.venvs/diffxpy       diffxpy 0.7.4 + batchglm 0.7.4 with 2020-era pins (below)
# nbfit itself and statsmodels run in the Python that runs bench/run.py
# (pip install -e ".[test,plot]").
#
# Usage: bench/setup.sh [all|r|pydeseq2|delnx|diffxpy]...   (default: all)
# Environment: PYTHON (default python3.11, then python3) makes the virtualenvs.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venvs="$here/.venvs"
mkdir -p "$venvs"
py="${PYTHON:-$(command -v python3.11 || command -v python3)}"
targets=("${@:-all}")

want() { for t in "${targets[@]}"; do [[ "$t" == all || "$t" == "$1" ]] && return 0; done; return 1; }

mkvenv() {  # name, pip arguments...
  local name="$1"; shift
  echo "== $name: $*"
  "$py" -m venv "$venvs/$name"
  "$venvs/$name/bin/python" -m pip install --quiet --upgrade pip
  "$venvs/$name/bin/python" -m pip install --quiet "$@"
}

if want r; then
  if command -v Rscript >/dev/null && EDITOR="${EDITOR:-vi}" Rscript -e 'library(glmGamPoi); library(DESeq2)' >/dev/null 2>&1; then
    echo "== R, glmGamPoi and DESeq2 already installed"
  elif [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
    echo "== R: apt-get install r-base-core r-bioc-glmgampoi r-bioc-deseq2"
    export DEBIAN_FRONTEND=noninteractive EDITOR="${EDITOR:-vi}"   # R needs a non-empty EDITOR
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends r-base-core r-bioc-glmgampoi r-bioc-deseq2
  else
    echo "== R: not root or no apt-get; install r-base-core r-bioc-glmgampoi r-bioc-deseq2 yourself (skipped)"
  fi
fi

want pydeseq2 && mkvenv pydeseq2 "pydeseq2==0.5.4"
want delnx && mkvenv delnx "delnx==0.3.0"

if want diffxpy; then
  # diffxpy 0.7.4 / batchglm 0.7.4 (March 2020) on Python 3.11:
  # - numpy 1.23.5: last numpy with np.float/np.int-era behaviour they need that has
  #   cp311 wheels; scipy 1.9.3, pandas 1.5.3, statsmodels 0.13.5, anndata 0.8.0 go with it
  # - dask 2.12.0 (the release of March 2020): newer dask returns read-only arrays from
  #   zeros_like(...).compute() and batchglm's IRLS step fails with
  #   "ValueError: assignment destination is read-only" (estimator.py, iwls_step)
  # - sparse 0.14.0 / numba 0.57.1: the first numba with Python 3.11 support
  mkvenv diffxpy "numpy==1.23.5" "scipy==1.9.3" "pandas==1.5.3" "dask[array]==2.12.0" \
    "anndata==0.8.0" "patsy==0.5.3" "statsmodels==0.13.5" "sparse==0.14.0" "numba==0.57.1" \
    "toolz" "batchglm==0.7.4" "diffxpy==0.7.4"
fi

for name in pydeseq2 delnx diffxpy; do
  want "$name" || continue
  case $name in
    pydeseq2) mod=pydeseq2 ;; delnx) mod=delnx ;; diffxpy) mod=diffxpy.api ;;
  esac
  "$venvs/$name/bin/python" -c "import $mod" && echo "== $name: import ok"
done
