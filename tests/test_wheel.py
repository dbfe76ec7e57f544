"""The built wheel ships the kernels as ``r1reward.kernels``, never a top-level ``kernels``."""
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_exposes_kernels_under_r1reward_only(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps",
                    "--no-build-isolation", "-q", "-w", str(tmp_path)], check=True)
    (wheel,) = tmp_path.glob("r1reward-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names}
    assert "kernels" not in top_level, f"wheel installs a top-level 'kernels': {sorted(top_level)}"
    assert "r1reward/kernels/__init__.py" in names
    assert "r1reward/kernels/functional.py" in names
    assert "r1reward/kernels/entropy.py" in names
    assert {f"r1reward/integrations/{m}.py" for m in ("trl", "verl", "openrlhf", "hf")} <= set(names)
    # Installed from that wheel into a scratch target, the public API imports.
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True)
    probe = ("import r1reward.kernels as k, importlib.util as u; "
             "print(k.__file__); print(getattr(u.find_spec('kernels'), 'origin', None))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, check=True, text=True,
                         capture_output=True, env={"PYTHONPATH": str(target), "PATH": ""}).stdout
    kernels_file, top_level_kernels = out.strip().splitlines()
    assert kernels_file.startswith(str(target)), kernels_file
    # None, or Hugging Face's package where the environment has it (transformers >= 5.25)
    assert not top_level_kernels.startswith(str(target)), top_level_kernels
