"""Soft-arm data: the raw episode format and the training view over a converted LeRobotDataset.

Raw episode format (one file per episode, `<raw_dir>/episode_<id>.npz`, written by
`numpy.savez_compressed`):

| key           | shape / type        | meaning                                              |
|---------------|---------------------|------------------------------------------------------|
| `images`      | (T, H, W, 3) uint8  | RGB camera frames (any H, W; the same in a dataset)  |
| `actions`     | (T, 10) float32     | actuator commands, one per tendon channel            |
| `graph`       | (T, 10, 19) float32 | node features of the arm's 10 segments               |
| `state`       | (T, S) float32      | optional proprioception; if absent, the previous    |
|               |                     | step's action (zeros at t=0) stands in               |
| `instruction` | () str              | language instruction, e.g. "touch the red ball"      |
| `fps`         | () int              | control rate in Hz                                   |

`data_prep/soft_arm_to_lerobot.py` converts a folder of these into a local LeRobotDataset.
"""

from __future__ import annotations

import random
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import v2

from lib.envs.soft_arm.features import (
    ACTION_DIM,
    ACTION_KEY,
    CHUNK_SIZE,
    GRAPH_KEY,
    IMAGE_KEY,
    IMAGE_SIZE,
    NODE_FEATURES,
    NUM_NODES,
    STATE_KEY,
)
from lib.run.errors import UserError
from lib.run.faults import raise_in_loader_if_injected


class EpisodeError(ValueError):
    """A raw episode that cannot be used; the message names the file and what was expected."""


@dataclass
class RawEpisode:
    path: Path
    images: np.ndarray
    actions: np.ndarray
    graph: np.ndarray
    state: np.ndarray
    instruction: str
    fps: int

    @property
    def length(self) -> int:
        return len(self.actions)


def _expect_shape(path: Path, key: str, array: np.ndarray, expected: tuple[int | None, ...]) -> None:
    if array.ndim != len(expected) or any(e is not None and a != e for a, e in zip(array.shape, expected, strict=True)):
        shown = ", ".join(str(e) if e is not None else ("T" if i == 0 else "*") for i, e in enumerate(expected))
        raise EpisodeError(f"{path}: '{key}' has shape {array.shape}, expected ({shown})")


def load_raw_episode(path: str | Path) -> RawEpisode:
    """Read and check one raw episode; raise `EpisodeError` naming the file and the problem."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise EpisodeError(f"{path}: cannot be read as an .npz episode ({error})") from error
    missing = {"images", "actions", "graph", "instruction", "fps"} - arrays.keys()
    if missing:
        raise EpisodeError(f"{path}: missing keys {sorted(missing)}")
    images, actions, graph = arrays["images"], arrays["actions"], arrays["graph"]
    _expect_shape(path, "images", images, (None, None, None, 3))
    _expect_shape(path, "actions", actions, (None, ACTION_DIM))
    _expect_shape(path, "graph", graph, (None, NUM_NODES, NODE_FEATURES))
    if images.dtype != np.uint8:
        raise EpisodeError(f"{path}: 'images' has dtype {images.dtype}, expected uint8")
    length = len(actions)
    if length == 0 or len(images) != length or len(graph) != length:
        raise EpisodeError(
            f"{path}: images/actions/graph have {len(images)}/{length}/{len(graph)} steps, expected the same T > 0"
        )
    if "state" in arrays:
        state = arrays["state"].astype(np.float32)
        _expect_shape(path, "state", state, (length, None))
    else:
        state = np.concatenate([np.zeros((1, ACTION_DIM)), actions[:-1]]).astype(np.float32)
    for key, array in (("actions", actions), ("graph", graph), ("state", state)):
        if not np.isfinite(array).all():
            raise EpisodeError(f"{path}: '{key}' contains NaN or inf")
    return RawEpisode(
        path=path,
        images=images,
        actions=actions.astype(np.float32),
        graph=graph.astype(np.float32),
        state=state,
        instruction=str(arrays["instruction"]),
        fps=int(arrays["fps"]),
    )


def save_raw_episode(path: str | Path, episode: RawEpisode) -> None:
    """Write `episode` atomically (a temporary name, then a rename): no half-written episodes."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(
        tmp,
        images=episode.images,
        actions=episode.actions,
        graph=episode.graph,
        state=episode.state,
        instruction=np.array(episode.instruction),
        fps=np.array(episode.fps),
    )
    tmp.rename(path)


def list_raw_episodes(raw_dir: str | Path) -> list[Path]:
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise UserError(f"raw soft-arm episode folder {raw_dir} does not exist")
    return sorted(p for p in raw_dir.glob("episode_*.npz") if not p.name.endswith(".tmp.npz"))


def split_episodes(num_episodes: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Train/val split by whole episodes (no frame of a val episode is trained on)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    indices = list(range(num_episodes))
    random.Random(seed).shuffle(indices)
    num_val = max(1, round(num_episodes * val_fraction)) if val_fraction > 0 and num_episodes > 1 else 0
    return sorted(indices[num_val:]), sorted(indices[:num_val])


class ActionChunkDataset(torch.utils.data.Dataset):
    """A LeRobotDataset's frames with the next `chunk_size` actions of the same episode (`action`,
    (chunk, action_dim); steps past the episode end repeat its last action and are marked in
    `action_is_pad`), as LeRobot's `delta_timestamps` would give them. LeRobot 0.6.1 fetches a
    delta-timestamp query as whole rows, decoding every image of the chunk to return its actions;
    here the actions are read once from the table and each item decodes one image."""

    def __init__(self, frames, chunk_size: int) -> None:
        self.frames = frames
        self.meta = frames.meta
        self.episodes = frames.episodes
        self.num_episodes = frames.num_episodes
        self.chunk_size = chunk_size
        table = frames.hf_dataset.with_format("numpy").select_columns([ACTION_KEY, "episode_index"])[:]
        self.actions = torch.from_numpy(np.stack(table[ACTION_KEY]).astype(np.float32))
        episode_index = np.asarray(table["episode_index"])
        # Rows of an episode are contiguous: the row each frame's episode ends at (exclusive).
        boundaries = np.flatnonzero(np.diff(episode_index)) + 1
        ends = np.append(boundaries, len(episode_index))
        self.episode_end = torch.from_numpy(ends[np.searchsorted(ends, np.arange(len(episode_index)), side="right")])
        self.items_loaded = 0  # by this process (a loader worker counts its own)

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, index: int) -> dict:
        self.items_loaded += 1
        raise_in_loader_if_injected(self.items_loaded)  # fault-injection tests only
        item = self.frames[index]
        rows = torch.arange(index, index + self.chunk_size)
        last = int(self.episode_end[index]) - 1
        item[ACTION_KEY] = self.actions[rows.clamp(max=last)]
        item["action_is_pad"] = rows > last
        return item


def make_soft_arm_datasets(
    root: str | Path,
    val_fraction: float = 0.1,
    seed: int = 0,
    chunk_size: int = CHUNK_SIZE,
    image_size: int = IMAGE_SIZE,
):
    """(train, val) datasets over a converted soft-arm dataset: each item has the current image at
    `image_size`^2, state and graph, the next `chunk_size` actions (`action`, `action_is_pad` past
    the episode end) and the instruction as `task`. `val` is None when `val_fraction` is 0."""
    from lerobot.datasets.dataset_metadata import LeRobotDatasetMetadata

    root = Path(root)
    if not (root / "meta" / "info.json").is_file():
        raise UserError(
            f"{root} is not a LeRobotDataset (no meta/info.json); convert raw episodes with "
            "data_prep/soft_arm_to_lerobot.py"
        )
    meta = LeRobotDatasetMetadata(repo_id=f"local/{root.name}", root=root)
    for key in (IMAGE_KEY, STATE_KEY, GRAPH_KEY, ACTION_KEY):
        if key not in meta.features:
            raise UserError(f"{root}: feature '{key}' missing, expected a soft-arm dataset")
    train_episodes, val_episodes = split_episodes(meta.total_episodes, val_fraction, seed)

    def view(episodes: list[int]) -> ActionChunkDataset:
        return open_action_chunks(root, chunk_size, image_size, episodes)

    return view(train_episodes), (view(val_episodes) if val_episodes else None)


def open_action_chunks(
    root: str | Path, chunk_size: int, image_size: int, episodes: list[int] | None = None, key: str = "dataset"
) -> ActionChunkDataset:
    """Any local LeRobotDataset's frames (all episodes, or `episodes`) with `chunk_size`-step action
    chunks and images resized to `image_size`^2 (the soft arm's datasets, LIBERO demonstrations);
    `key` names the source in an error (say, the config key that gave it)."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    root = Path(root)
    if not (root / "meta" / "info.json").is_file():
        raise UserError(f"{key} {root} is not a LeRobotDataset (no meta/info.json)")
    frames = LeRobotDataset(
        repo_id=f"local/{root.name}",
        root=root,
        episodes=episodes,
        image_transforms=v2.Resize((image_size, image_size), antialias=True),
        video_backend="pyav",
    )
    return ActionChunkDataset(frames, chunk_size)


def dataset_stats(dataset) -> dict[str, dict[str, torch.Tensor]]:
    """Normalization statistics of a LeRobotDataset, as tensors (what LeRobot's processors take)."""
    return {
        key: {name: torch.as_tensor(np.asarray(value), dtype=torch.float32) for name, value in stats.items()}
        for key, stats in dataset.meta.stats.items()
    }
