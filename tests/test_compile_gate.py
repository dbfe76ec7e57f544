"""Compile gate: every Triton kernel builds for sm_80 and sm_90 with the launcher's block
configs, without register spills and within the target's shared-memory limit.

Runs without a GPU (triton.compile + the cuobjdump bundled with triton). Needs triton:
if it is missing, this module fails at import (it is in the ``test`` extra).
"""
import inspect

import pytest

from r1reward.kernels import compile_gate as cg


def _report(rows):
    return "\n".join(f"{r.kernel} sm_{r.cc}: REG={r.regs} SHARED={r.shared_static}+"
                     f"{r.shared_dynamic} LOCAL={r.local} STACK={r.stack} {r.problems}"
                     for r in rows)


@pytest.mark.parametrize("cc", cg.TARGETS)
def test_all_kernels_compile_without_spills(cc):
    rows = cg.run_gate((cc,), ("bf16", "fp16", "fp32"))
    bad = [r for r in rows if r.problems]
    assert not bad, "kernels over the resource limits:\n" + _report(bad)
    names = {r.kernel for r in rows}
    # Every variant the launchers start is in the gate (forward, forward-only, epilogue, bwd).
    for must in ("forward[bf16]", "forward-plain[bf16]", "combine-forward-only",
                 "combine-fused-epilogue", "combine-logprobs", "backward[bf16]",
                 "backward-filtered[bf16]", "forward[fp32]", "backward[fp32]",
                 "forward[fp32-tf32]", "backward[fp32-tf32]", "backward[fp16]",
                 "rows[bf16]", "rows[fp32]", "rows-plain[bf16]"):
        assert must in names, f"{must} missing from the gate: {sorted(names)}"
    assert all(0 < r.regs <= cg.MAX_REGS for r in rows), _report(rows)


def test_gate_covers_every_triton_kernel():
    # A kernel added to the modules without a gate case would ship unchecked.
    gated = {c.fn.__name__ for c in cg.cases(90, ("bf16",))}
    for modname in ("triton_fwd", "triton_bwd", "triton_rows"):
        mod = cg.load_kernel_module(modname)
        kernels = {name for name, obj in inspect.getmembers(mod)
                   if name.endswith("_kernel") and hasattr(obj, "arg_names")}
        assert kernels, f"no kernels found in {modname}"
        assert kernels <= gated, f"{modname}: not gated: {sorted(kernels - gated)}"


def test_gate_detects_spills():
    # 64×64×64 fp32 tiles on sm_80 are known to spill (cuobjdump STACK > 0): the gate
    # must say so, otherwise a passing gate proves nothing.
    case = next(c for c in cg.cases(80, ("fp32",)) if c.name == "forward[fp32]")
    case.constexprs.update(BLOCK_N=64, BLOCK_V=64, BLOCK_H=64)
    k = cg.compile_case(case, 80)
    use = cg.resource_usage(k.asm["cubin"])
    row = cg.GateRow(case.name, 80, use["REG"], use["SHARED"], int(k.metadata.shared),
                     use["LOCAL"], use["STACK"], case.num_warps, case.num_stages)
    assert any("spills" in p for p in row.problems), _report([row])


def test_limits_flag_shared_memory_and_registers():
    row = cg.GateRow("synthetic", 80, 256, 0, 200 * 1024, 0, 0, 8, 3)
    probs = " ".join(row.problems)
    assert "registers" in probs and "shared memory" in probs
    assert not cg.GateRow("synthetic", 90, 200, 1024, 200 * 1024, 0, 0, 8, 3).problems


def test_launcher_configs_are_the_gated_ones():
    import torch
    fwd, bwd = cg.load_kernel_module("triton_fwd"), cg.load_kernel_module("triton_bwd")
    # Every table entry is reachable from a gated target, so the gate covers all of them.
    for table, pick in ((fwd.FWD_CONFIGS, fwd.fwd_config), (bwd.BWD_CONFIGS, bwd.bwd_config)):
        gated = [pick(cc, dt) for cc in cg.TARGETS for dt in (torch.bfloat16, torch.float32)]
        assert sorted(map(str, gated)) == sorted(map(str, table.values()))
    # GPUs with 99 KB of shared memory (sm_86/89/120) get the small sm_80 configs.
    for cc in (86, 89, 120):
        assert fwd.fwd_config(cc, torch.bfloat16) == fwd.FWD_CONFIGS[(80, "16bit")]
        assert bwd.bwd_config(cc, torch.bfloat16) == bwd.BWD_CONFIGS[(80, "16bit")]
    assert bwd.bwd_config(100, torch.bfloat16) == bwd.BWD_CONFIGS[(90, "16bit")]


@pytest.mark.parametrize("rows,tiles,sm", [(2048, 1187, 132), (1, 1187, 108), (70000, 1187, 132),
                                           (5, 3, 132), (16, 1, None)])
def test_vocab_splits_fill_the_gpu_and_are_never_empty(rows, tiles, sm):
    fwd = cg.load_kernel_module("triton_fwd")
    splits, per = fwd.pick_splits(rows, tiles, 64, sm)
    assert 1 <= splits <= tiles and (splits - 1) * per < tiles <= splits * per
    if sm and tiles >= 4 * sm:
        assert -(-rows // 64) * splits >= min(4 * sm, -(-rows // 64) * tiles) // 2


def test_gate_under_the_gpu_images_triton(tmp_path):
    # The lent GPU image runs Triton 3.6: the kernels must build there too, not only under
    # the Triton this environment installs (bench.compile_gate --triton pip-installs it
    # aside, once, into the cache).
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    cache = os.environ.get("R1REWARD_CACHE") or str(tmp_path / "cache")
    r = subprocess.run([sys.executable, "-m", "bench.compile_gate", "--triton", "3.6.0"],
                       capture_output=True, text=True, timeout=1200,
                       env={**os.environ, "R1REWARD_CACHE": cache},
                       cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert rows and all(x["triton"] == "3.6.0" and not x["problems"] for x in rows)
    assert {x["cc"] for x in rows} == set(cg.TARGETS)
