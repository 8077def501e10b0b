"""The GPU smoke check runs green here on the CPU, at tiny shapes, through the same steps."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gpu_check_script_runs_green_on_the_cpu(tmp_path):
    assets = tmp_path / "assets"
    run = lambda *a: subprocess.run(["bash", str(REPO / "scripts/gpu_check.sh"), *a], capture_output=True, text=True)  # noqa: E731
    assert run("--prepare", "--assets", str(assets)).returncode == 0
    done = run("--device", "cpu", "--tiny", "--assets", str(assets), "--out", str(tmp_path / "out"))
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    failed = [(s["step"], s.get("error")) for s in report["steps"] if not s["ok"]]
    assert done.returncode == 0 and not failed, (failed, done.stdout[-2000:], done.stderr[-2000:])
    steps = {s["step"]: s for s in report["steps"]}
    assert list(steps) == ["build", "generate --compare", "profile", "batch host syncs", "gemma3-shaped fp16",
                           "train 10 + resume 20", "torch.profiler"]
    assert set(steps["generate --compare"]["runs"]) == {"bfloat16_t0", "bfloat16_t1", "float32_t0", "float32_t1"}
    assert steps["generate --compare"]["runs"]["float32_t0"]["identical_to_plain"] is True
    assert len(steps["profile"]["table"]["longer"]) == 1  # two contexts
    syncs = steps["batch host syncs"]
    assert syncs["steps"] > 0 and syncs["host_syncs"] > 0 and syncs["host_syncs_by_call"]
    assert steps["gemma3-shaped fp16"]["new_tokens"] > 0
    assert steps["train 10 + resume 20"]["latest"] == "step_00000020"
    assert (tmp_path / "out" / "profiler.txt").read_text().count("\n") > 10


def test_gpu_check_refuses_to_start_without_its_tokenizer_files(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "scripts/gpu_check.py"), "--assets", str(tmp_path), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 2 and "--prepare" in done.stderr and "Traceback" not in done.stderr
