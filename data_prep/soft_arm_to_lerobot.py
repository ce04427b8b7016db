"""Convert a folder of raw soft-arm episodes (format: lib/data/soft_arm.py) into a local LeRobotDataset.

Features: `observation.images.front` (H, W, 3), `observation.state` (S,), `observation.graph`
(10, 19), `action` (10,), and the instruction as the frame's task. Camera frames are stored as MP4
video, LeRobot's default (`--no_videos`: one PNG per frame, lossless and larger). Nothing is
downloaded; `--push_to_hub REPO_ID` pushes the finished dataset with LeRobot's own push.

Safe to re-run: existing output is never deleted. Raw episodes already converted are skipped, so an
interrupted conversion resumes where it stopped (`meta/soft_arm_sources.json` lists the raw file of
every episode in order; the dataset's own episode count says how many of them were saved). A
corrupt or wrong-shape episode is reported with its path, skipped and counted in
`meta/soft_arm_conversion.json`; more than `--max_bad_fraction` bad episodes fails the run.

    python data_prep/soft_arm_to_lerobot.py --raw_dir artifacts/soft_arm_raw_debug \
        --output_dir artifacts/soft_arm_lerobot_debug
"""

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from lib.data.soft_arm import EpisodeError, RawEpisode, list_raw_episodes, load_raw_episode
from lib.envs.soft_arm.features import (
    ACTION_DIM,
    ACTION_KEY,
    ACTION_NAMES,
    GRAPH_KEY,
    IMAGE_KEY,
    NODE_FEATURES,
    NUM_NODES,
    STATE_KEY,
)
from lib.run.errors import UserError, exit_code_of
from lib.run.hub import check_hub_push

SOURCES_FILE = "meta/soft_arm_sources.json"
REPORT_FILE = "meta/soft_arm_conversion.json"


def features_of(episode: RawEpisode, videos: bool) -> dict:
    state_size = episode.state.shape[1]
    height, width = episode.images.shape[1:3]
    image_storage = "video" if videos else "image"
    return {
        IMAGE_KEY: {"dtype": image_storage, "shape": (height, width, 3), "names": ["height", "width", "channels"]},
        # One name per dimension (LeRobot's convention); the raw format fixes only the state's size.
        STATE_KEY: {"dtype": "float32", "shape": (state_size,), "names": [f"state_{i}" for i in range(state_size)]},
        GRAPH_KEY: {"dtype": "float32", "shape": (NUM_NODES, NODE_FEATURES), "names": ["node", "feature"]},
        ACTION_KEY: {"dtype": "float32", "shape": (ACTION_DIM,), "names": ACTION_NAMES},
    }


def check_matches(episode: RawEpisode, features: dict, fps: int) -> None:
    """An episode must match the dataset it joins (image size, state width, fps)."""
    for key, array in ((IMAGE_KEY, episode.images[0]), (STATE_KEY, episode.state[0])):
        if tuple(array.shape) != tuple(features[key]["shape"]):
            raise EpisodeError(
                f"{episode.path}: {key} has shape {array.shape}, the dataset has {features[key]['shape']}"
            )
    if episode.fps != fps:
        raise EpisodeError(f"{episode.path}: fps {episode.fps}, the dataset has {fps}")


def write_json(path: Path, value) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    tmp.replace(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw_dir", type=Path, required=True)
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--max_bad_fraction", type=float, default=0.5)
    parser.add_argument("--no_videos", action="store_true", help="store camera frames as PNG images, not video")
    parser.add_argument("--push_to_hub", metavar="REPO_ID", help="push the dataset there when done (needs the network)")
    parser.add_argument("--private", action="store_true", help="with --push_to_hub: a private repository")
    args = parser.parse_args()
    if args.push_to_hub:
        check_hub_push(args.push_to_hub, "--push_to_hub")  # before converting, not after

    from lerobot.datasets.dataset_metadata import LeRobotDatasetMetadata
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    raw_paths = list_raw_episodes(args.raw_dir)
    if not raw_paths:
        raise UserError(f"no episode_*.npz files in {args.raw_dir}")
    repo_id = f"local/{args.output_dir.name}"
    sources_file = args.output_dir / SOURCES_FILE
    report_file = args.output_dir / REPORT_FILE

    dataset, sources, skipped = None, [], {}
    if args.output_dir.exists():
        if not sources_file.is_file():
            raise UserError(
                f"{args.output_dir} exists but was not written by this converter ({SOURCES_FILE} "
                "missing); choose another --output_dir (existing output is never deleted)"
            )
        saved = LeRobotDatasetMetadata(repo_id=repo_id, root=args.output_dir).total_episodes
        sources = json.loads(sources_file.read_text())[:saved]  # the rest never reached the disk
        if report_file.is_file():
            skipped = json.loads(report_file.read_text())["skipped"]
    todo = [p for p in raw_paths if p.name not in set(sources)]
    print(f"{len(raw_paths)} raw episodes: {len(sources)} already converted, {len(todo)} to convert")

    for path in tqdm(todo, desc="converting"):
        try:
            episode = load_raw_episode(path)
            if dataset is None:
                if sources:
                    dataset = LeRobotDataset.resume(repo_id=repo_id, root=args.output_dir, video_backend="pyav")
                else:
                    dataset = LeRobotDataset.create(
                        repo_id=repo_id,
                        fps=episode.fps,
                        root=args.output_dir,
                        features=features_of(episode, videos=not args.no_videos),
                        robot_type="soft_arm",
                        use_videos=not args.no_videos,
                        metadata_buffer_size=1,
                        video_backend="pyav",
                    )
            check_matches(episode, dataset.meta.features, dataset.meta.fps)
        except EpisodeError as error:
            tqdm.write(f"skipping bad episode: {error}")
            skipped[path.name] = str(error)
            continue
        for t in range(episode.length):
            dataset.add_frame(
                {
                    IMAGE_KEY: episode.images[t],
                    STATE_KEY: episode.state[t],
                    GRAPH_KEY: episode.graph[t],
                    ACTION_KEY: episode.actions[t],
                    "task": episode.instruction,
                }
            )
        sources.append(path.name)
        write_json(sources_file, sources)
        dataset.save_episode()
        skipped.pop(path.name, None)
    if dataset is not None:
        dataset.finalize()

    report = {"converted": len(sources), "skipped_count": len(skipped), "skipped": skipped}
    if args.output_dir.exists():
        write_json(report_file, report)
    print(f"dataset {args.output_dir}: {len(sources)} episodes, {len(skipped)} bad episodes skipped")
    bad_fraction = len(skipped) / len(raw_paths)
    if bad_fraction > args.max_bad_fraction:
        raise UserError(
            f"{bad_fraction:.0%} of the raw episodes are bad (limit --max_bad_fraction "
            f"{args.max_bad_fraction:.0%}); see {report_file}"
        )
    if args.push_to_hub:  # LeRobot's own push: the dataset card and the codebase-version tag loaders need
        LeRobotDataset(args.push_to_hub, root=args.output_dir, video_backend="pyav").push_to_hub(private=args.private)
        print(f"pushed {args.output_dir} to the hub as the dataset {args.push_to_hub}")
    return 0


if __name__ == "__main__":
    sys.exit(exit_code_of(main))
