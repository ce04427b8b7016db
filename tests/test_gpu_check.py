"""scripts/gpu_check.py (`make gpu-check`) at the tiny size on the CPU, so its code cannot rot before
a GPU is at hand: the bare LeRobot step, `train_soft_arm.py`, sampling with the masks made once
(what the CUDA-graph capture relies on), the policy served on loopback, and the GPU section written
beside `make bench`'s figures."""

import json

import pytest
from helpers import PYTHON, run


@pytest.mark.slow  # every section of make gpu-check, a server process included: about 60 s on 2 cores
def test_gpu_check_runs_at_the_tiny_size(tokenizer_dir, dataset_dir, tmp_path):
    report = tmp_path / "BENCHMARKS.md"
    report.write_text("# Benchmarks\n\n| figure | measured |\n|---|---|\n| a. kept | 1 |\n\n## GPU\n\nold\n")
    (tmp_path / "BENCHMARKS.json").write_text(json.dumps({"training": {"kept": 1}, "gpu": "old"}))
    run(
        [
            PYTHON,
            "scripts/gpu_check.py",
            *("--size", "tiny", "--dataset", str(dataset_dir), "--tokenizer", str(tokenizer_dir)),
            *("--sections", "training", "sampling", "serving", "--modes", "full", "--no_compile"),
            *("--steps", "2", "--repeats", "2", "--sample_batches", "1", "2", "--output", str(report)),
        ]
    )
    text = report.read_text()
    assert text.startswith("# Benchmarks") and "| a. kept | 1 |" in text and "\nold\n" not in text  # CPU part kept
    assert text.count("## GPU") == 1 and "tiny size" in text
    saved = json.loads((tmp_path / "BENCHMARKS.json").read_text())
    assert saved["training"] == {"kept": 1}
    gpu = saved["gpu"]
    bare, script = gpu["training"]["bare"], gpu["training"]["script"]
    assert bare["samples_per_s"] > 0 and bare["flops_per_sample"] > 0
    assert [row["mode"] for row in script] == ["full"] and script[0]["samples_per_s"] > 0
    for batch in (1, 2):
        row = gpu["sampling"][f"batch_{batch}"]
        assert row["eager"]["p50_ms"] > 0 and row["cuda_graph"] == "needs CUDA"
        assert row["replay_max_abs_diff"] == 0.0  # the attention-mask rows made once change nothing
    assert gpu["sampling"]["guided_over_plain"] > 0
    serving = gpu["serving"]  # a real server process on loopback, the same observation as in process
    assert serving["one_client"]["p50_ms"] > 0 and serving["in_process"]["p50_ms"] > 0
    assert serving["sixteen_clients_requests_per_s"] > 0 and "Serving (`serve_policy.py`" in text
    assert "ript" not in gpu and "failed" not in gpu
