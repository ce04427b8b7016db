"""Raw soft-arm episodes -> LeRobotDataset -> training view, with real files."""

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import PYTHON, exit_in_process, run

from lib.data.soft_arm import EpisodeError, load_raw_episode, make_soft_arm_datasets, split_episodes
from lib.envs.soft_arm.features import GRAPH_KEY, IMAGE_KEY
from lib.run.errors import UserError

CONVERTER = "data_prep/soft_arm_to_lerobot.py"


def test_load_raw_episode_names_file_and_problem(raw_dir, tmp_path):
    good = load_raw_episode(raw_dir / "episode_000000.npz")
    assert good.graph.shape[1:] == (10, 19) and good.actions.shape[1:] == (10,)
    corrupt = tmp_path / "episode_corrupt.npz"
    corrupt.write_bytes(b"not a zip file")
    with pytest.raises(EpisodeError, match="episode_corrupt.npz.*cannot be read"):
        load_raw_episode(corrupt)
    wrong = tmp_path / "episode_wrong.npz"
    np.savez(
        wrong,
        images=good.images,
        actions=good.actions,
        graph=good.graph[:, :, :18],
        instruction=np.array("x"),
        fps=np.array(10),
    )
    with pytest.raises(
        EpisodeError, match=r"episode_wrong.npz: 'graph' has shape \(24, 10, 18\), expected \(T, 10, 19\)"
    ):
        load_raw_episode(wrong)
    with pytest.raises(EpisodeError, match="missing.npz: cannot be read"):
        load_raw_episode(tmp_path / "missing.npz")

    def variant(name: str, **changed: np.ndarray):
        path = tmp_path / f"episode_{name}.npz"
        arrays = {"images": good.images, "actions": good.actions, "graph": good.graph}
        np.savez(path, **{**arrays, **changed}, instruction=np.array("x"), fps=np.array(10))
        return path

    with pytest.raises(
        EpisodeError, match=r"episode_gray.npz: 'images' has shape \(24, 64, 64\), expected \(T, \*, \*, 3\)"
    ):
        load_raw_episode(variant("gray", images=good.images[..., 0]))
    for key in ("actions", "graph"):
        poisoned = getattr(good, key).copy()
        poisoned[3, 2] = np.nan
        with pytest.raises(EpisodeError, match=f"episode_nan_{key}.npz: '{key}' contains NaN or inf"):
            load_raw_episode(variant(f"nan_{key}", **{key: poisoned}))


def test_conversion_skips_and_counts_bad_episodes_and_resumes(raw_dir, tmp_path, monkeypatch, capsys):
    raw = tmp_path / "raw"
    shutil.copytree(raw_dir, raw)
    (raw / "episode_000002.npz").write_bytes(b"\x00" * 100)  # corrupt
    good = dict(np.load(raw / "episode_000003.npz"))
    good["actions"] = good["actions"][:, :7]  # wrong shape
    np.savez(raw / "episode_000003.npz", **good)
    aside = tmp_path / "later"
    aside.mkdir()
    shutil.move(raw / "episode_000005.npz", aside / "episode_000005.npz")

    output = tmp_path / "dataset"
    result = run([PYTHON, CONVERTER, "--raw_dir", str(raw), "--output_dir", str(output)])
    assert (
        "episode_000002.npz" in result.stdout + result.stderr and "episode_000003.npz" in result.stdout + result.stderr
    )
    report = json.loads((output / "meta/soft_arm_conversion.json").read_text())
    assert report["converted"] == 3 and report["skipped_count"] == 2
    assert "expected (T, 10)" in report["skipped"]["episode_000003.npz"]

    # A new episode appears: re-running converts only it and keeps what is there.
    shutil.move(aside / "episode_000005.npz", raw / "episode_000005.npz")
    first_data = sorted(p.name for p in (output / "data").rglob("*.parquet"))
    result = run([PYTHON, CONVERTER, "--raw_dir", str(raw), "--output_dir", str(output)])
    assert "3 already converted, 3 to convert" in result.stdout
    assert set(first_data) <= {p.name for p in (output / "data").rglob("*.parquet")}
    sources = json.loads((output / "meta/soft_arm_sources.json").read_text())
    assert sources == ["episode_000000.npz", "episode_000001.npz", "episode_000004.npz", "episode_000005.npz"]
    train, val = make_soft_arm_datasets(output, val_fraction=0.0)
    assert val is None and train.num_episodes == 4 and len(train) == 4 * 24
    # camera frames as video (LeRobot's default): one per episode, also for the resumed ones
    assert train.meta.video_keys == [IMAGE_KEY] and train.meta.total_episodes == 4
    assert train[len(train) - 1][IMAGE_KEY].shape == (3, 224, 224)

    # Too many bad episodes fail the run (after saving what is good).
    args = ["--raw_dir", str(raw), "--output_dir", str(output), "--max_bad_fraction", "0.1"]
    code, error = exit_in_process(monkeypatch, capsys, CONVERTER, *args)
    assert code == 2 and "max_bad_fraction" in error and "Traceback" not in error


def test_conversion_refuses_foreign_output(raw_dir, tmp_path, monkeypatch, capsys):
    foreign = tmp_path / "somebody_elses"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    args = ["--raw_dir", str(raw_dir), "--output_dir", str(foreign)]
    code, error = exit_in_process(monkeypatch, capsys, CONVERTER, *args)
    assert code == 2 and "not written by this converter" in error
    assert (foreign / "precious.txt").read_text() == "keep me"


def test_training_view(dataset_dir):
    train, val = make_soft_arm_datasets(dataset_dir, val_fraction=0.34, seed=0)
    assert set(train.episodes).isdisjoint(val.episodes) and len(train.episodes) + len(val.episodes) == 6
    item = train[len(train) - 1]  # last frame of an episode: the chunk runs past its end
    assert item[IMAGE_KEY].shape == (3, 224, 224) and item[IMAGE_KEY].dtype == torch.float32
    assert item["action"].shape == (16, 10) and item[GRAPH_KEY].shape == (10, 19)
    assert item["action_is_pad"].sum() == 15 and not item["action_is_pad"][0]
    assert isinstance(item["task"], str) and item["task"]
    # every vector feature names its dimensions, as LeRobot's tools expect
    features = train.meta.features
    assert features["action"]["names"] == [f"cable_{i}" for i in range(10)]
    assert features["observation.state"]["names"] == [
        f"state_{i}" for i in range(features["observation.state"]["shape"][0])
    ]


def test_action_chunks_match_lerobot_delta_timestamps(dataset_dir):
    """Our chunking is what LeRobot's own `delta_timestamps` query returns, frame for frame."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    train, _ = make_soft_arm_datasets(dataset_dir, val_fraction=0.34, seed=0)
    reference = LeRobotDataset(
        repo_id="local/reference",
        root=dataset_dir,
        episodes=train.episodes,
        delta_timestamps={"action": [step / train.meta.fps for step in range(16)]},
        video_backend="pyav",
    )
    assert len(train) == len(reference)
    for index in range(len(train)):
        ours, theirs = train[index], reference[index]
        assert torch.equal(ours["action"], theirs["action"]), index
        assert torch.equal(ours["action_is_pad"], theirs["action_is_pad"]), index


def test_split_is_by_episode_and_deterministic():
    train, val = split_episodes(10, 0.2, seed=3)
    assert len(val) == 2 and sorted(train + val) == list(range(10))
    assert split_episodes(10, 0.2, seed=3) == (train, val)
    with pytest.raises(ValueError, match="val_fraction"):
        split_episodes(10, 1.5, seed=0)


def test_missing_dataset_is_a_clear_error(tmp_path):
    """A UserError: the scripts print it as one line and exit 2."""
    with pytest.raises(UserError, match="soft_arm_to_lerobot.py"):
        make_soft_arm_datasets(tmp_path / "nowhere")


def test_a_push_that_cannot_happen_is_refused_before_the_work(raw_dir, tmp_path, monkeypatch, capsys):
    """`--push_to_hub` / `hub.repo_id`: offline, without a token or with a bad id, the run stops at
    once with one line (exit 2 in the scripts), before anything is converted or trained."""
    import huggingface_hub
    import huggingface_hub.constants

    from lib.run.hub import check_hub_push

    output = tmp_path / "dataset"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    args = ["--raw_dir", str(raw_dir), "--output_dir", str(output), "--push_to_hub", "someone/soft-arm"]
    code, error = exit_in_process(monkeypatch, capsys, CONVERTER, *args)
    assert code == 2 and "Traceback" not in error, error
    assert "--push_to_hub=someone/soft-arm needs the network, and HF_HUB_OFFLINE=1 is set" in error
    assert not output.exists()

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(UserError, match="not a hub repository id"):
        check_hub_push("not a repo id", "hub.repo_id")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(UserError, match="no Hugging Face token; run `hf auth login`"):
        check_hub_push("someone/soft-arm", "hub.repo_id")
