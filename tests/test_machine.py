"""r1reward.machine: the numeric paths a run took, read from the process itself, so that
runs pinned to another instruction set (the way docs/training_runs.md emulates a second
machine's numerics) say so in their summary."""
import json
import os
import subprocess
import sys

import torch

from r1reward import machine


def describe_in_child(**env):
    out = subprocess.run([sys.executable, "-m", "r1reward.machine"], env={**os.environ, **env},
                         capture_output=True, text=True, check=True, timeout=120).stdout
    return json.loads(out)


def test_describe_reads_this_process():
    m = machine.describe()
    assert m["aten_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert m["torch_threads"] == torch.get_num_threads() and m["torch"] == torch.__version__
    assert m["cpu"] and m["logical_cpus"] >= 1
    line = machine.one_line(m)
    assert m["cpu"] in line and f"ATen {m['aten_cpu_capability']}" in line


def test_pinned_numeric_paths_are_reported():
    # "default" is ATen's scalar path, available on every CPU: the variable took effect
    m = describe_in_child(ATEN_CPU_CAPABILITY="default", MKL_CBWR="AVX2", OMP_NUM_THREADS="1")
    assert m["aten_cpu_capability"] == "DEFAULT" and m["torch_threads"] == 1
    if torch.backends.mkl.is_available():
        assert m["mkl_branch"] == "AVX2"
        assert "MKL AVX2" in machine.one_line(m)
