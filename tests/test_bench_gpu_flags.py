"""The CUDA rows of the benchmarks (issue 14) where no GPU is: `--device cuda` is refused with a message before
anything is measured, and benchmarks/gpu_check.sh exits 2 saying why. The GPU side itself is tests/test_gpu.py."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import common  # noqa: E402

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the rows would run")


def test_check_device_rule():
    assert common.check_device("cpu", available=lambda: False) == "cpu"
    assert common.check_device("cuda", available=lambda: True) == "cuda"
    with pytest.raises(ValueError, match=r"--device cuda: no CUDA device is available here \(torch "):
        common.check_device("cuda", available=lambda: False)
    with pytest.raises(ValueError, match=r"--device must be one of \['cpu', 'cuda'\], got 'tpu'"):
        common.check_device("tpu")


def test_on_device_names_cuda_in_the_title():
    spec = lambda result: {"title": "One step, batch 2 x 64, CPU", "series": {}}  # noqa: E731
    assert common.on_device(spec, "cpu") is spec
    assert common.on_device(spec, "cuda")({})["title"] == "One step, batch 2 x 64, CUDA"


@NO_GPU
@pytest.mark.parametrize("name", ["lora_linear", "train_step", "inference"])
def test_device_cuda_is_refused_before_measuring(name, monkeypatch, capsys, tmp_path):
    out = tmp_path / "x.json"
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--device", "cuda", "--quick", "--out", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        __import__(name).main()
    assert exit_info.value.code == 2
    assert "--device cuda: no CUDA device is available here" in capsys.readouterr().err
    assert not out.exists()


@NO_GPU
def test_gpu_check_refuses_without_a_gpu(tmp_path):
    done = subprocess.run(["bash", str(BENCH / "gpu_check.sh")], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "OUT": str(tmp_path / "out")})
    assert done.returncode == 2, done.stdout + done.stderr
    assert "no CUDA device is available here" in done.stderr and "nothing was run" in done.stderr
    assert not (tmp_path / "out").exists()
