"""Does the RIPT loop learn? RL post-training of a behaviour-cloned graph pi0 on the simulated soft
arm (lib/soft_arm_sim.py), where a tiny pi0 reaches a middling success rate on a CPU, unlike LIBERO.

    python scripts/ript_soft_arm.py --checkpoint outputs/ript_soft_arm/bc_few20/checkpoints/last/pretrained_model \
        --seeds 0 1 2 --output_dir outputs/ript_soft_arm/rl        # `make ript-soft-arm` runs it all

The loop is train_ript_pi0.py's, from the same lib/ript.py pieces, with the soft-arm simulators
behind the same env interface as LIBERO's (`SoftArmVectorRollout`): each iteration draws task seeds
(the "init states": a pool of `--train_states` training seeds, reshuffled every pass), rolls out K
episodes from each in batched simulators, keeps the groups whose outcomes differ (dynamic
sampling, with the per-state outcome history), gives every rollout its leave-one-out advantage,
and updates the policy on the windows of the rollouts with positive advantage (the
`advantage_filtered` objective: the checkpoint is a graph pi0 without the CFG flag).
`--update_on all` is the control: the same loop imitating every window, reward ignored.

Success is measured in closed loop on the held-out seeds of eval_soft_arm.py before the first and
after the last iteration, for every RL seed. Writes `results.md` and `summary.json` under
`--output_dir`, and per seed `seed<N>/summary.json`, `metrics.jsonl` and `success.png` (rollout
success per iteration). A seed whose `summary.json` exists is kept, not re-run.
"""

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib.errors import exit_code_of  # noqa: E402
from lib.graph_pi0 import PI0GraphPolicy  # noqa: E402
from lib.pi0 import (  # noqa: E402
    CheckpointError,
    load_pi0_processors,
    load_tokenizer,
    make_pi0_policy,
    resolve_pretrained,
    saved_config,
    seeded_noise_and_time,
)
from lib.ript import (  # noqa: E402
    StateOutcomeHistory,
    collect_informative_groups,
    minibatch_order,
    rollout_groups,
    window_batch,
    windows_with_advantages,
)
from lib.rollout import make_policy_fn  # noqa: E402
from lib.run_logging import append_metrics, plot_metrics  # noqa: E402
from lib.soft_arm_sim import MAX_STEPS, SoftArmVectorRollout  # noqa: E402

HELD_OUT_SEED_START = 10_000_000  # eval_soft_arm.py's
TRAIN_SEED_START = 20_000_000  # the RL "init states"; never in the demonstrations or the held-out set


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a train_soft_arm.py pretrained_model")
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/ript_soft_arm"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="RL seeds, one run each")
    parser.add_argument("--iterations", type=int, default=15)
    parser.add_argument("--train_states", type=int, default=512, help="size of the pool of training task seeds")
    parser.add_argument("--rollouts_per_state", type=int, default=4, help="K")
    parser.add_argument("--states_per_draw", type=int, default=8)
    parser.add_argument("--target_groups", type=int, default=8)
    parser.add_argument("--max_draw_rounds", type=int, default=3)
    parser.add_argument("--update_epochs", type=int, default=2)
    parser.add_argument("--minibatch_size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--num_envs", type=int, default=16)
    parser.add_argument("--replan_steps", type=int, default=8)
    parser.add_argument("--max_steps", type=int, default=MAX_STEPS, help="control steps per episode")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--eval_episodes", type=int, default=100)
    parser.add_argument(
        "--update_on",
        choices=("positive", "all"),
        default="positive",
        help="windows the update imitates: those with positive advantage (RIPT), or all of them "
        "(a control that ignores the reward: does success come from the reward or from more data?)",
    )
    return parser.parse_args()


def success_rate(envs: SoftArmVectorRollout, policy_fn, seeds: list[int], label: str) -> float:
    with tqdm(total=len(seeds), desc=f"{label}: held-out episodes", unit="ep", leave=False) as bar:
        episodes = envs.run([{"seed": seed} for seed in seeds], policy_fn, progress=bar.update)
    return float(np.mean([e.success for e in episodes]))


def run_seed(seed: int, args: argparse.Namespace) -> dict:
    output_dir = args.output_dir / f"seed{seed}"
    summary_file = output_dir / "summary.json"
    if summary_file.is_file():
        print(f"seed {seed}: keeping the finished run in {output_dir} (delete it to run again)")
        return json.loads(summary_file.read_text())
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    policy = make_pi0_policy(args.checkpoint, policy_cls=PI0GraphPolicy)
    preprocessor, postprocessor = load_pi0_processors(args.checkpoint, load_tokenizer(args.checkpoint), "cpu")
    policy_fn = make_policy_fn(policy, preprocessor, postprocessor)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=args.lr)
    held_out = list(range(HELD_OUT_SEED_START, HELD_OUT_SEED_START + args.eval_episodes))
    envs = SoftArmVectorRollout(args.num_envs, args.replan_steps, args.max_steps, args.image_size)

    policy.eval()
    before = success_rate(envs, policy_fn, held_out, f"seed {seed} before RL")
    print(f"seed {seed}: success before RL {before:.1%} on {len(held_out)} held-out seeds")

    # The "init states": a fixed pool of task seeds, drawn in a new order every pass.
    pool = [{"seed": TRAIN_SEED_START + i} for i in range(args.train_states)]
    order_rng = random.Random(seed)

    def pool_draws():
        while True:
            order = order_rng.sample(pool, len(pool))
            for start in range(0, len(order) - args.states_per_draw + 1, args.states_per_draw):
                yield [dict(state) for state in order[start : start + args.states_per_draw]]

    draws = pool_draws()
    rollout_results = []

    history = StateOutcomeHistory()
    metrics_file = output_dir / "metrics.jsonl"
    metrics_file.unlink(missing_ok=True)
    for iteration in tqdm(range(1, args.iterations + 1), desc=f"seed {seed} iterations"):
        started = time.perf_counter()
        rollout_results.clear()
        policy.eval()
        kept, stats = collect_informative_groups(
            lambda: next(draws),
            lambda states: rollout_groups(envs, policy_fn, states, args.rollouts_per_state, rollout_results),
            lambda state: state["seed"],
            history,
            args.target_groups,
            args.max_draw_rounds,
        )
        windows, advantages = windows_with_advantages(kept)
        positive = [i for i, advantage in enumerate(advantages) if advantage > 0]
        imitated = positive if args.update_on == "positive" else list(range(len(windows)))
        rollout_time = time.perf_counter() - started
        losses = []
        if imitated:
            policy.train()
            windows = [windows[i] for i in imitated]
            advantages = [advantages[i] for i in imitated]
            steps = args.update_epochs * math.ceil(len(windows) / args.minibatch_size)
            for step, picked in enumerate(minibatch_order(len(windows), steps, args.minibatch_size, seed + iteration)):
                batch, _ = window_batch(windows, advantages, picked, policy.config.chunk_size)
                batch = preprocessor(batch)
                noise, flow_time = seeded_noise_and_time(
                    policy.model, len(picked), (seed * 1_000_003 + iteration) * 10_007 + step, "cpu"
                )
                loss, _ = policy(batch, noise=noise, time=flow_time)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
        metrics = {
            "rollout/success_rate": float(np.mean([e.success for e in rollout_results])),
            "rollout/episodes": len(rollout_results),
            "sampling/groups_kept": len(kept),
            "sampling/dropped_all_success": stats.dropped_all_success,
            "sampling/dropped_all_failure": stats.dropped_all_failure,
            "sampling/skipped_states": stats.skipped_states,
            "update/positive_windows": len(positive),
            "update/windows": len(imitated),
            "update/loss": float(np.mean(losses)) if losses else float("nan"),
            "time/rollout_s": rollout_time,
            "time/update_s": time.perf_counter() - started - rollout_time,
        }
        append_metrics(metrics_file, iteration, metrics)
        tqdm.write(
            f"seed {seed} iteration {iteration}: rollout success {metrics['rollout/success_rate']:.2f}, "
            f"{len(kept)} groups kept, {len(positive)} positive windows, loss {metrics['update/loss']:.4f}"
        )

    policy.eval()
    after = success_rate(envs, policy_fn, held_out, f"seed {seed} after RL")
    print(f"seed {seed}: success after RL {after:.1%} (before {before:.1%})")
    plot_metrics(metrics_file, output_dir / "success.png", ("rollout/success_rate",), log_scale=False)
    result = {"seed": seed, "success_before": before, "success_after": after}
    summary_file.write_text(json.dumps(result, indent=2))
    return result


def main() -> int:
    args = parse_args()
    saved_type = saved_config(resolve_pretrained(args.checkpoint)).get("type")
    if saved_type != PI0GraphPolicy.name:
        raise CheckpointError(
            f"{args.checkpoint} holds a {saved_type!r} policy, expected a train_soft_arm.py checkpoint"
        )
    results = [run_seed(seed, args) for seed in args.seeds]
    before = [r["success_before"] for r in results]
    after = [r["success_after"] for r in results]
    summary = {"checkpoint": str(args.checkpoint), "args": {k: str(v) for k, v in vars(args).items()}, "runs": results}
    (args.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    lines = [
        f"| RL seed (update on {args.update_on} windows) | success before ({args.eval_episodes} held-out seeds) "
        f"| after {args.iterations} iterations |",
        "|---|---|---|",
        *[f"| {r['seed']} | {r['success_before']:.0%} | {r['success_after']:.0%} |" for r in results],
        f"| mean ± std | {np.mean(before):.1%} ± {np.std(before):.1%} | {np.mean(after):.1%} ± {np.std(after):.1%} |",
    ]
    (args.output_dir / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(exit_code_of(main))
