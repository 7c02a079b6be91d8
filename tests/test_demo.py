"""The main job (python -m lora_kernels.demo): runs, prints the table, saves the plot, and LoRA-GA wins."""

import os
import subprocess
import sys

import pytest
import torch

from lora_kernels import demo


def test_demo_quick_prints_table_and_saves_png(tmp_path, capsys):
    threads = torch.get_num_threads()
    assert demo.main(["--quick", "--out", str(tmp_path)]) == 0
    assert torch.get_num_threads() == threads  # the demo's single-thread setting does not leak
    out = capsys.readouterr().out
    assert "| method | trainable params | steps to target | final loss | time (s) |" in out
    for method in ("| full |", "| lora |", "| lora-ga |"):
        assert method in out
    png = tmp_path / "lora_demo_loss.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_demo_lora_ga_reaches_target_in_clearly_fewer_steps_than_lora(tmp_path):
    # The default task, all 300 steps (a few seconds on one thread).
    out = demo.run(["--out", str(tmp_path)])
    res = {r["method"]: r for r in out["results"]}
    ga, lora, full = (res[m]["steps_to_target"] for m in ("lora-ga", "lora", "full"))
    assert ga is not None and full is not None
    assert lora is None or lora >= 2 * ga, (ga, lora)
    # same rank: same number of trainable parameters; both far fewer than full fine-tuning
    assert res["lora"]["trainable"] == res["lora-ga"]["trainable"] < res["full"]["trainable"] / 4
    for r in out["results"]:
        assert all(torch.isfinite(torch.tensor(loss)) for _, loss in r["curve"])
    # LoRA-GA's final loss is close to full fine-tuning's and better than LoRA's
    assert res["lora-ga"]["final"] < res["lora"]["final"]


def test_demo_runs_as_module(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "lora_kernels.demo", "--quick", "--steps", "10",
                           "--pretrain-steps", "5", "--out", str(tmp_path), "--device", "cpu"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "| lora-ga |" in proc.stdout and (tmp_path / "lora_demo_loss.png").is_file()


@pytest.mark.gpu
def test_demo_on_gpu_prints_speed_table(tmp_path, capsys):
    assert demo.main(["--quick", "--out", str(tmp_path), "--device", "cuda"]) == 0
    out = capsys.readouterr().out
    assert "LoRALinear fwd+bwd (ms)" in out and "| lora-ga |" in out
