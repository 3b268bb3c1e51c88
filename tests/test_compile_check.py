"""bench/compile_check.py: every Triton kernel compiles for an H100 (sm_90) without a GPU, at the
launch configurations the launchers choose, within the shared memory the card has."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
SCRIPT = Path(__file__).parents[1] / "bench" / "compile_check.py"
KERNELS = ("_moe_mlp_fwd_kernel", "_moe_mlp_bwd_dx_kernel", "_moe_mlp_bwd_dw_kernel",
           "_moe_combine_fwd_kernel", "_moe_combine_bwd_kernel", "_topk_softmax_fwd_kernel",
           "_topk_softmax_bwd_kernel", "_plan_count_kernel", "_plan_scan_kernel", "_plan_scatter_kernel",
           "_selective_scan_fwd_kernel", "_selective_scan_bwd_kernel", "_gated_fusion_fwd_kernel",
           "_gated_fusion_bwd_gate_kernel", "_gated_fusion_bwd_input_kernel")


@pytest.mark.skipif(not PTXAS.exists(), reason="this Triton build carries no ptxas")
def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = [line.split() for line in run.stdout.splitlines()]
    compiled = {r[1] for r in rows if len(r) > 8 and r[-1] in ("ok", "spills")}
    assert compiled >= set(KERNELS), sorted(set(KERNELS) - compiled)
    assert run.stdout.rstrip().endswith("0 case(s) failed")
