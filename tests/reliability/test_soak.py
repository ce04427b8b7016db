"""`make soak` (scripts/soak.py) at one minute: both long runs sampled, stopped with SIGTERM, clean."""

import json

import numpy as np
import pytest
from helpers import PYTHON, run

SERIES = {"rss_mib", "children_rss_mib", "open_fds", "children", "zombies"}


@pytest.mark.slow
def test_soak_samples_both_runs_and_stops_them_cleanly(tokenizer_dir, dataset_dir, tmp_path):
    arguments = ["--minutes", "1", "--sample_every", "10", "--warmup_minutes", "0"]
    arguments += ["--dataset", str(dataset_dir), "--tokenizer", str(tokenizer_dir), "--output_dir", str(tmp_path)]
    run([PYTHON, "scripts/soak.py", *arguments])
    result = json.loads((tmp_path / "soak.json").read_text())
    assert set(result["runs"]) == {"train_soft_arm", "train_ript_pi0"}
    for soaked in result["runs"].values():
        assert soaked["exit_code"] == 0 and len(soaked["samples"]) >= 5  # SIGTERM: saved, exit 0
        assert set(soaked["slopes_per_hour"]) == SERIES
        assert all(sample["zombies"] == 0 and sample["open_fds"] > 0 for sample in soaked["samples"])
    assert result["runs"]["train_ript_pi0"]["samples"][-1]["children"] >= 1  # its LIBERO simulator
    assert (tmp_path / "soak.png").stat().st_size > 0


def test_the_slope_ignores_a_simulator_caught_mid_reset(tmp_path):
    """A flat series with two low samples early (a LIBERO worker rebuilding its model, as in the
    30-minute soak): least squares reads a climb, the soak's slope stays flat; a real leak shows."""
    minutes = np.arange(3.0, 30.0)
    flat = np.full_like(minutes, 1924.0)
    flat[[2, 6]] = 1250.0
    assert np.polyfit(minutes, flat, 1)[0] * 60 > 300
    series = {"flat": flat, "leaking": flat + 2.0 * minutes}  # +2 MiB a minute

    def samples(values):
        return [
            {**dict.fromkeys(SERIES, 0.0), "minute": m, "children_rss_mib": v}
            for m, v in zip(minutes, values, strict=True)
        ]

    runs = {name: {"exit_code": 0, "samples": samples(values)} for name, values in series.items()}
    (tmp_path / "earlier.json").write_text(json.dumps({"minutes": 30, "runs": runs}))
    run([PYTHON, "scripts/soak.py", "--samples", str(tmp_path / "earlier.json"), "--output_dir", str(tmp_path)])
    slopes = {
        name: r["slopes_per_hour"]["children_rss_mib"]
        for name, r in json.loads((tmp_path / "soak.json").read_text())["runs"].items()
    }
    assert slopes["flat"] == 0 and slopes["leaking"] == pytest.approx(120)
    assert (tmp_path / "soak.png").stat().st_size > 0
