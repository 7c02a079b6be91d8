"""The main job (python -m lora_kernels.demo): LoRA-GA's head start on real data, the table, the plot, the CLI.

Only the plot test needs matplotlib: the quality check runs without it."""

import os
import subprocess
import sys

import pytest
import torch

from lora_kernels import demo

pytest.importorskip("sklearn", reason="the demo's data ships with scikit-learn (a dependency of lora_kernels)")


def test_demo_quick_lora_ga_reaches_target_in_clearly_fewer_steps_than_lora(capsys):
    # The quick setting (2 seeds, lr 1e-2, 100 steps; deterministic: fixed seeds, one thread). Measured on the CPU:
    # LoRA-GA reaches 90 % test accuracy in 15 and 25 steps, LoRA in 70 and 80; require at least 2x.
    threads = torch.get_num_threads()
    out = demo.run(["--quick", "--methods", "lora,lora-ga", "--no-png"])
    assert torch.get_num_threads() == threads  # the demo's single-thread setting does not leak
    ga, lora = out["best"]["lora-ga"], out["best"]["lora"]
    assert all(s is not None for s in ga["test_hit"]), ga["test_hit"]
    lora_steps = [s if s is not None else out["args"]["steps"] + 1 for s in lora["test_hit"]]
    assert 2 * sum(ga["test_hit"]) <= sum(lora_steps), (ga["test_hit"], lora["test_hit"])
    # same rank: same number of trainable parameters; both reach a useful final accuracy
    assert ga["trainable"] == lora["trainable"] == 2344
    assert ga["final"][0] > 0.9 and lora["final"][0] > 0.8
    text = capsys.readouterr().out
    assert "| method | trainable params | best lr | steps to 90 % test acc. (mean ± sd) |" in text
    assert "| lora-ga | 2,344 | 1e-2 |" in text and "| lora | 2,344 | 1e-2 |" in text
    assert "ρ = α/√r = 4 (rsLoRA) for all" in text
    assert "fewer steps than LoRA" in text and "inf" not in text


def _tiny(*extra):
    return ["--steps", "10", "--seeds", "1", "--pretrain-steps", "20", "--lrs", "1e-2", *extra]


def test_demo_every_method_and_best_lr_selection(tmp_path):
    out = demo.run(_tiny("--lrs", "1e-2,3e-2", "--no-png"))
    assert set(out["best"]) == set(demo.METHODS)
    assert out["png"] is None
    for method, res in out["best"].items():
        assert res["lr"] in (1e-2, 3e-2)
        # the reported lr is the one with the best validation rank key
        keys = {lr: demo.summarize(out["runs"][(method, lr)], out["target"], 10)["rank_key"] for lr in (1e-2, 3e-2)}
        assert keys[res["lr"]] == min(keys.values())
        assert res["runs"][0]["steps"] == [0, 5, 10]
    assert out["best"]["full"]["trainable"] > 10 * out["best"]["lora"]["trainable"]


def test_demo_writes_png_where_asked(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "sub" / "curves.png"
    out = demo.run(_tiny("--methods", "lora,lora-ga", "--png", str(png)))
    assert out["png"] == str(png)
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert f"accuracy curves: {png}" in capsys.readouterr().out


def test_demo_without_matplotlib_finishes_with_a_note(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    png = tmp_path / "curves.png"
    assert demo.main(_tiny("--methods", "lora", "--png", str(png))) == 0
    text = capsys.readouterr().out
    assert "plot skipped: matplotlib is not installed" in text and "| lora |" in text
    assert not png.exists()


def test_demo_not_reached_is_reported_plainly(capsys):
    out = demo.run(
        [
            "--steps",
            "5",
            "--seeds",
            "2",
            "--pretrain-steps",
            "20",
            "--lrs",
            "1e-4",
            "--methods",
            "lora,lora-ga",
            "--no-png",
            "--target",
            "1.0",
        ]
    )
    text = capsys.readouterr().out
    assert out["best"]["lora"]["test_hit"] == [None, None]
    assert "not reached in 5" in text and "inf" not in text
    assert "LoRA-GA reached 100 % in 0/2 seeds, LoRA in 0/2 (within 5 steps)" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--target", "1.5"], "--target: expected an accuracy in (0, 1]"),
        (["--target", "0"], "--target: expected an accuracy in (0, 1]"),
        (["--target", "abc"], "--target: expected an accuracy in (0, 1]"),
        (["--rank", "6"], "--rank 6: LoRA-GA needs 2r <= 10"),
        (["--rank", "0"], "--rank: expected a positive integer"),
        (["--steps", "-3"], "--steps: expected a positive integer"),
        (["--lrs", "1e-3,x"], "--lrs: expected comma-separated numbers"),
        (["--lrs", "0"], "--lrs: expected positive learning rates"),
        (["--methods", "lora,dora"], "--methods: dora; choose from full, lora, lora-ga, pissa"),
        (["--alpha", "-1"], "--alpha must be a positive number"),
    ],
)
def test_demo_bad_options_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        demo.run(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.strip().splitlines()[-1].startswith("lora-kernels-demo: error:")


def test_demo_device_cuda_without_cuda_is_a_one_line_error(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        demo.run(["--device", "cuda"])
    assert exc.value.code == 2
    assert "--device cuda: no CUDA device is available" in capsys.readouterr().err


def test_demo_help_documents_every_option_with_its_default():
    parser = demo.build_parser()
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help and "(default: " in action.help, action.dest
    text = " ".join(parser.format_help().split())
    for default in (
        "(default: lora_demo.png in the current directory)",
        "(default: 150)",
        "(default: 0.9)",
        "(default: 4)",
        "(default: 3)",
        "(default: 3e-3,1e-2,3e-2)",
    ):
        assert default in text, default


def test_demo_runs_as_module(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "lora_kernels.demo", *_tiny("--methods", "lora,lora-ga"), "--no-png", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| lora-ga |" in proc.stdout and not list(tmp_path.iterdir())


@pytest.mark.gpu
def test_demo_on_gpu_prints_speed_table(tmp_path, capsys):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    assert demo.main(["--quick", "--no-png", "--device", "cuda"]) == 0
    out = capsys.readouterr().out
    assert "LoRALinear fwd+bwd (ms)" in out and "| lora-ga |" in out
