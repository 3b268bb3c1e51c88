#!/usr/bin/env bash
# mamba-ssm's and causal-conv1d's own test files, unchanged, through m2restore_kernels.apply_to_mamba_ssm()
# on this machine's CPU (bench/upstream_cpu.py remaps their device="cuda"). Their tests are not in the
# packages' sdists, so they come from git checkouts of the two repositories (no network at run time):
#
#   bench/run_upstream_suites.sh MAMBA_REPO CAUSAL_CONV1D_REPO [MAMBA_REF] [CC_REF] [pytest args...]
#
# MAMBA_REF / CC_REF (default: the installed versions' tags v2.3.2.post1 and HEAD) pick the commit the
# test files are read from. Needs mamba-ssm and causal-conv1d installed without their CUDA builds
# (.ci/run). SUITES (default: all five file names below) picks files. Results: bench/RESULTS.md,
# "mamba-ssm and causal-conv1d test suites".
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
mamba_repo=$1 cc_repo=$2 mamba_ref=${3:-v2.3.2.post1} cc_ref=${4:-HEAD}
shift $(( $# < 4 ? $# : 4 ))
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git -C "$mamba_repo" show "$mamba_ref:tests/ops/test_selective_scan.py" > "$work/test_selective_scan.py"
git -C "$mamba_repo" show "$mamba_ref:tests/ops/triton/test_selective_state_update.py" > "$work/test_selective_state_update.py"
git -C "$mamba_repo" show "$mamba_ref:tests/ops/triton/test_layernorm_gated.py" > "$work/test_layernorm_gated.py"
# Mamba-2 generation (plain, varlen, varlen with padding). The one edit of an upstream file: decoding
# through CUDA graphs (cg=True) needs a GPU, so a CPU run decodes without them.
git -C "$mamba_repo" show "$mamba_ref:tests/test_generation.py" | {
    if python -c "import torch, sys; sys.exit(torch.cuda.is_available())"; then sed 's/cg=True/cg=False/'; else cat; fi
} > "$work/test_generation.py"
git -C "$cc_repo" show "$cc_ref:tests/test_causal_conv1d.py" > "$work/test_causal_conv1d.py"
cd "$work"  # outside the checkout: neither its conftest (the Triton interpreter) nor its pytest settings apply
PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" python -m pytest -p upstream_cpu -p no:cacheprovider -q -rfE \
    --tb=line "$@" ${SUITES:-test_selective_scan.py test_selective_state_update.py test_layernorm_gated.py test_generation.py test_causal_conv1d.py}
