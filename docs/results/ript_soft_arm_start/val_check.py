"""Val loss of a BC checkpoint on the 27 val frames of the few20 dataset, under both definitions:
today's (each frame's mean over its valid steps, then the mean over frames) and 9d9a348's (the mean
over every valid step of the batch), each averaged over 16 noise draws per frame."""

import json
import sys

import torch

from lib.data.soft_arm import make_soft_arm_datasets
from lib.policies.graph_pi0 import PI0GraphPolicy
from lib.policies.noise import keyed_noise_and_time
from lib.policies.processors import load_pi0_processors, load_tokenizer

ckpt, data = sys.argv[1], sys.argv[2]
policy = PI0GraphPolicy.from_pretrained(ckpt).eval()
pre, _ = load_pi0_processors(ckpt, load_tokenizer(ckpt), "cpu")
_, val = make_soft_arm_datasets(data, 0.1, 0, 16, 224)
frame_losses, valid_steps = [], []
with torch.no_grad():
    for i in range(len(val)):
        raw = torch.utils.data.default_collate([val[i]])
        batch = pre(dict(raw))
        draws = []
        for d in range(16):
            noise, t = keyed_noise_and_time(policy.model, [1_000_003 * d + int(raw["index"][0])], "cpu")
            draws.append(policy(batch, noise=noise, time=t)[0].item())
        frame_losses.append(sum(draws) / len(draws))
        valid_steps.append(int((~raw["action_is_pad"]).sum()))
per_frame = sum(frame_losses) / len(frame_losses)
per_step = sum(loss * steps for loss, steps in zip(frame_losses, valid_steps, strict=True)) / sum(valid_steps)
print(
    json.dumps(
        {
            "checkpoint": ckpt,
            "frames": len(frame_losses),
            "valid_steps": valid_steps,
            "per_frame_mean (today)": per_frame,
            "per_valid_step_mean (9d9a348)": per_step,
        }
    )
)
