"""A simulated cable-driven soft arm in MuJoCo, its scripted expert and its graph features.

The arm: a planar soft continuum arm lying on a table, discretized as 10 segments (the graph's 10
nodes; a pseudo-rigid-body model of a slender rod): segment i is a capsule joined to the one before
it by a hinge about the table normal with a torsional spring and damper. The spring stiffness
falls from the base to the tip (a tapered arm) and is scaled per episode by a random factor the
policy is not told (manufacturing spread), so reaching a point needs feedback, not a lookup table.

Actuation: 10 channels; channel k is an antagonistic cable pair anchored at the base and
terminating at segment k (a MuJoCo fixed tendon over joints 0..k). Its command u_k in [-1, 1] pulls
the left (u > 0) or right (u < 0) cable with force |u_k| * CABLE_GEAR, which bends every joint the
cable passes. Joint j thus feels CABLE_GEAR * sum_{k >= j} u_k.

Task: touch a ball (red, green or blue; the instruction names it) placed at a random reachable
point; success when the tip (distal end of segment 9) stays within SUCCESS_RADIUS of the ball
centre for HOLD_STEPS consecutive control steps.

Node features (19 per segment i, world frame, table plane z = 0):

| index | feature                                                   | unit   |
|-------|-----------------------------------------------------------|--------|
| 0-2   | position of the segment's distal end (the node)          | m      |
| 3-5   | linear velocity of the node                               | m/s    |
| 6-8   | tangent: unit vector along the segment                    | -      |
| 9-11  | normal: unit vector in the table plane, left of the tangent | -    |
| 12    | curvature: hinge angle / segment length                   | rad/m  |
| 13    | actuation: command of cable channel i                     | [-1,1] |
| 14-16 | ball centre minus node position                           | m      |
| 17-18 | node index code: sin, cos of pi * i / 10                  | -      |

The proprioceptive state (`state`) is the command applied at the previous step (10 values).

Rollouts (`SoftArmVectorRollout`, `run_soft_arm_episodes`) run each simulator in a worker process
(`python -m lib.envs.soft_arm.sim`): this module imports no torch, so a worker starts in about half a
second.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", "egl")

import mujoco  # noqa: E402

from lib.envs.soft_arm.features import GRAPH_KEY, IMAGE_KEY, NUM_NODES, STATE_KEY
from lib.envs.vector_rollout import PolicyFn, VectorRollout, Window, serve_simulator

NUM_SEGMENTS = NUM_NODES  # one graph node per segment
SEGMENT_LENGTH = 0.04  # m; the arm is 0.4 m long
SEGMENT_RADIUS = 0.008  # m
BASE_STIFFNESS = 0.12  # N m / rad at joint 0, falling linearly to half of it at joint 9
DAMPING_TIME = 0.3  # s; joint damping = DAMPING_TIME * stiffness (about critical at the base)
CABLE_GEAR = 0.03  # N m per unit command
STIFFNESS_SPREAD = 0.15  # per-episode stiffness factor in [1 - spread, 1 + spread]
BALL_RADIUS = 0.02  # m
SUCCESS_RADIUS = 0.03  # m, tip to ball centre
HOLD_STEPS = 3  # the tip must stay on the ball this many control steps (a touch, not a fly-by)
CONTROL_HZ = 10
PHYSICS_DT = 0.002  # s
MAX_STEPS = 40  # 4 s at 10 Hz; the expert needs about 1.5 s
BALL_COLORS = {"red": (0.85, 0.12, 0.12), "green": (0.1, 0.7, 0.15), "blue": (0.12, 0.25, 0.9)}
INSTRUCTIONS = ("touch the {} ball", "reach the {} ball", "move the tip to the {} ball")
# Target shapes are drawn as hinge angles theta_j = bend + twist * (j - 4.5) / 4.5 (rad).
MAX_BEND, MAX_TWIST = 0.22, 0.2


def nominal_stiffness() -> np.ndarray:
    return BASE_STIFFNESS * (1.0 - 0.5 * np.arange(NUM_SEGMENTS) / (NUM_SEGMENTS - 1))


def arm_xml(image_size: int) -> str:
    """MJCF of the arm (nominal stiffness and damping; `SoftArmSim.reset` sets each episode's),
    table, ball and a top-down camera."""
    stiffness = nominal_stiffness()
    segments = ""
    for index in range(NUM_SEGMENTS):
        shade = 0.25 + 0.5 * index / (NUM_SEGMENTS - 1)  # base dark, tip light: node order is visible
        pos = "0 0 0.02" if index == 0 else f"0 {SEGMENT_LENGTH} 0"
        segments += (
            f'<body name="seg{index}" pos="{pos}">'
            f'<joint name="j{index}" type="hinge" axis="0 0 1" stiffness="{stiffness[index]:.6f}" '
            f'damping="{DAMPING_TIME * stiffness[index]:.6f}" armature="1e-5"/>'
            f'<geom type="capsule" fromto="0 0 0 0 {SEGMENT_LENGTH} 0" size="{SEGMENT_RADIUS}" '
            f'rgba="{shade:.2f} {shade:.2f} {0.2 + shade * 0.5:.2f} 1" mass="0.01"/>'
            f'<site name="node{index}" pos="0 {SEGMENT_LENGTH} 0" size="0.004"/>'
        )
    segments += "</body>" * NUM_SEGMENTS
    tendons = "".join(
        f'<fixed name="cable{k}">' + "".join(f'<joint joint="j{j}" coef="1"/>' for j in range(k + 1)) + "</fixed>"
        for k in range(NUM_SEGMENTS)
    )
    actuators = "".join(
        f'<motor name="u{k}" tendon="cable{k}" gear="{CABLE_GEAR}" ctrlrange="-1 1" ctrllimited="true"/>'
        for k in range(NUM_SEGMENTS)
    )
    return f"""
<mujoco model="soft_arm">
  <option timestep="{PHYSICS_DT}" integrator="implicitfast" gravity="0 0 -9.81"/>
  <default><geom contype="0" conaffinity="0"/></default>
  <visual><global offwidth="{image_size}" offheight="{image_size}"/><quality shadowsize="0"/></visual>
  <worldbody>
    <light directional="true" pos="0 0.2 1.5" dir="0 0 -1" diffuse="0.8 0.8 0.8" ambient="0.3 0.3 0.3"/>
    <geom type="plane" size="0.6 0.6 0.01" pos="0 0.2 0" rgba="0.82 0.82 0.8 1"/>
    <geom type="cylinder" size="0.03 0.01" pos="0 0 0.01" rgba="0.2 0.2 0.2 1"/>
    <body name="ball" mocap="true" pos="0 0.3 0.02">
      <geom type="sphere" size="{BALL_RADIUS}" rgba="1 1 1 1"/>
    </body>
    {segments}
    <camera name="top" pos="0 0.16 1.0" xyaxes="1 0 0 0 1 0" fovy="50"/>
  </worldbody>
  <tendon>{tendons}</tendon>
  <actuator>{actuators}</actuator>
</mujoco>
"""


def planar_chain(angles: np.ndarray) -> np.ndarray:
    """Node positions (N, 2) of the planar chain with hinge angles `angles` (base points along +y)."""
    heading = np.pi / 2 + np.cumsum(angles)
    return SEGMENT_LENGTH * np.cumsum(np.stack([np.cos(heading), np.sin(heading)], axis=-1), axis=0)


def shape_angles(bend: float, twist: float) -> np.ndarray:
    return bend + twist * (np.arange(NUM_SEGMENTS) - 4.5) / 4.5


def equilibrium_commands(angles: np.ndarray, stiffness: np.ndarray) -> np.ndarray:
    """Cable commands that hold hinge angles `angles` at rest: K_j theta_j = gear * sum_{k>=j} u_k."""
    torques = stiffness * angles
    return (torques - np.append(torques[1:], 0.0)) / CABLE_GEAR


def solve_shape(target_xy: np.ndarray, start: tuple[float, float] = (0.0, 0.0), iterations: int = 30) -> np.ndarray:
    """(bend, twist) of the shape family whose tip is at `target_xy` (damped Gauss-Newton)."""
    params = np.array(start, dtype=np.float64)
    for _ in range(iterations):
        tip = planar_chain(shape_angles(*params))[-1]
        error = target_xy - tip
        if np.linalg.norm(error) < 1e-6:
            break
        jacobian = np.empty((2, 2))
        for column in range(2):
            delta = np.zeros(2)
            delta[column] = 1e-6
            jacobian[:, column] = (planar_chain(shape_angles(*(params + delta)))[-1] - tip) / 1e-6
        params += np.linalg.solve(jacobian.T @ jacobian + 1e-4 * np.eye(2), jacobian.T @ error)
    return params


@dataclass
class SoftArmTask:
    """What a seed fixes: the ball, its colour and instruction, the stiffness and the start shape."""

    seed: int
    ball: np.ndarray  # (3,) m
    color: str
    instruction: str
    stiffness: np.ndarray  # (10,) N m / rad
    start_angles: np.ndarray  # (10,) rad
    start_command: np.ndarray  # (10,) the cable commands that hold the start shape

    @classmethod
    def from_seed(cls, seed: int) -> SoftArmTask:
        rng = np.random.default_rng(seed)
        stiffness = nominal_stiffness() * rng.uniform(1 - STIFFNESS_SPREAD, 1 + STIFFNESS_SPREAD)
        while True:
            target = shape_angles(rng.uniform(-MAX_BEND, MAX_BEND), rng.uniform(-MAX_TWIST, MAX_TWIST))
            if np.abs(equilibrium_commands(target, nominal_stiffness())).max() < 0.8:
                break
        ball = np.append(planar_chain(target)[-1], 0.02)
        start_command = rng.uniform(-0.3, 0.3, NUM_SEGMENTS) * np.linspace(0.3, 1.0, NUM_SEGMENTS)
        torques = CABLE_GEAR * np.cumsum(start_command[::-1])[::-1]
        color = str(rng.choice(list(BALL_COLORS)))
        instruction = str(rng.choice(INSTRUCTIONS)).format(color)
        return cls(seed, ball, color, instruction, stiffness, torques / stiffness, start_command)


class SoftArmSim:
    """One soft arm; `reset(seed)` builds that seed's episode, `step(command)` advances 1/10 s."""

    def __init__(self, image_size: int = 224) -> None:
        self.image_size = image_size
        self.model: mujoco.MjModel | None = None
        self.renderer: mujoco.Renderer | None = None

    def reset(self, seed: int) -> dict[str, np.ndarray]:
        self.task = SoftArmTask.from_seed(seed)
        if self.model is None:
            self.model = mujoco.MjModel.from_xml_string(arm_xml(self.image_size))
            self.data = mujoco.MjData(self.model)
            self.renderer = mujoco.Renderer(self.model, self.image_size, self.image_size)
            self._ball_geom = self.model.body("ball").geomadr[0]
            self._node_sites = [self.model.site(f"node{i}").id for i in range(NUM_SEGMENTS)]
        mujoco.mj_resetData(self.model, self.data)
        # Everything a seed fixes is set here, so an episode does not depend on what ran before.
        self.model.jnt_stiffness[:] = self.task.stiffness
        self.model.dof_damping[:] = DAMPING_TIME * self.task.stiffness
        self.model.geom_rgba[self._ball_geom, :3] = BALL_COLORS[self.task.color]
        self.data.mocap_pos[0] = self.task.ball
        self.data.qpos[:] = self.task.start_angles
        self.data.ctrl[:] = self.task.start_command
        mujoco.mj_forward(self.model, self.data)
        self.command = self.task.start_command.copy()
        self.steps = 0
        self.steps_on_ball = 0
        self._previous_nodes = self.node_positions()
        return self.observation()

    def node_positions(self) -> np.ndarray:
        return self.data.site_xpos[self._node_sites].copy()

    def tip_distance(self) -> float:
        return float(np.linalg.norm(self.node_positions()[-1, :2] - self.task.ball[:2]))

    def step(self, command: np.ndarray) -> tuple[dict[str, np.ndarray], bool]:
        self.command = np.clip(np.asarray(command, dtype=np.float64), -1.0, 1.0)
        self.data.ctrl[:] = self.command
        self._previous_nodes = self.node_positions()
        mujoco.mj_step(self.model, self.data, nstep=round(1.0 / (CONTROL_HZ * PHYSICS_DT)))
        mujoco.mj_forward(self.model, self.data)  # positions of the final qpos (mj_step leaves them one step old)
        self.steps += 1
        self.steps_on_ball = self.steps_on_ball + 1 if self.tip_distance() < SUCCESS_RADIUS else 0
        return self.observation(), self.success()

    def success(self) -> bool:
        return self.steps_on_ball >= HOLD_STEPS

    def node_features(self) -> np.ndarray:
        positions = self.node_positions()
        velocity = (positions - self._previous_nodes) * CONTROL_HZ
        heading = np.pi / 2 + np.cumsum(self.data.qpos)
        zeros = np.zeros(NUM_SEGMENTS)
        tangent = np.stack([np.cos(heading), np.sin(heading), zeros], axis=-1)
        normal = np.stack([-np.sin(heading), np.cos(heading), zeros], axis=-1)
        index_angle = np.pi * np.arange(NUM_SEGMENTS) / NUM_SEGMENTS
        features = np.concatenate(
            [
                positions,
                velocity,
                tangent,
                normal,
                (self.data.qpos / SEGMENT_LENGTH)[:, None],
                self.command[:, None],
                self.task.ball[None] - positions,
                np.sin(index_angle)[:, None],
                np.cos(index_angle)[:, None],
            ],
            axis=-1,
        )
        return features.astype(np.float32)

    def render(self) -> np.ndarray:
        self.renderer.update_scene(self.data, camera="top")
        return self.renderer.render()

    def observation(self) -> dict[str, np.ndarray]:
        """What a policy sees, under the dataset's feature names."""
        return {
            IMAGE_KEY: self.render(),
            STATE_KEY: self.command.astype(np.float32),
            GRAPH_KEY: self.node_features(),
        }

    def close(self) -> None:
        if self.renderer is not None:
            self.renderer.close()
            self.renderer = None


class ScriptedExpert:
    """Reaches the ball from privileged observations (the graph's node positions and velocities and
    its ball-relative vectors): aim the nominal-stiffness equilibrium shape at an aim point and,
    each time the arm has come to rest, move the aim point by the remaining tip error (the true
    stiffness differs from the nominal one). Commands change by at most `max_rate` per step, so
    demonstrations are smooth."""

    def __init__(
        self,
        gain: float = 0.8,
        max_rate: float = 0.15,
        rest_speed: float = 0.02,
        rest_steps: int = 3,
        max_aim_offset: float = 0.08,
    ) -> None:
        self.gain = gain
        self.max_rate = max_rate
        self.rest_speed = rest_speed
        self.rest_steps = rest_steps
        self.max_aim_offset = max_aim_offset
        self.stiffness = nominal_stiffness()
        self.target: np.ndarray | None = None

    def act(self, observation: dict[str, np.ndarray]) -> np.ndarray:
        graph, command = observation[GRAPH_KEY].astype(np.float64), observation[STATE_KEY].astype(np.float64)
        tip = graph[-1, 0:2]
        if self.target is None:  # first step of the episode
            self.target = tip + graph[-1, 14:16]
            self.aim = self.target.copy()
            self.shape = solve_shape(self.aim)
            self.steps_at_rest = 0
        wanted = equilibrium_commands(shape_angles(*self.shape), self.stiffness)
        settled = np.abs(wanted - command).max() < 1e-5
        resting = settled and np.linalg.norm(graph[-1, 3:5]) < self.rest_speed
        self.steps_at_rest = self.steps_at_rest + 1 if resting else 0
        if self.steps_at_rest >= self.rest_steps:
            offset = self.aim + self.gain * (self.target - tip) - self.target
            self.aim = self.target + offset * min(1.0, self.max_aim_offset / max(np.linalg.norm(offset), 1e-9))
            self.shape = solve_shape(self.aim, start=tuple(self.shape))
            wanted = equilibrium_commands(shape_angles(*self.shape), self.stiffness)
            self.steps_at_rest = 0
        change = np.clip(wanted - command, -self.max_rate, self.max_rate)
        return np.clip(command + change, -1.0, 1.0).astype(np.float32)


def expert_policy_fn() -> PolicyFn:
    """The scripted expert as a batched policy: one `ScriptedExpert` per episode, chunks of 1."""
    experts: dict[tuple[int, int], ScriptedExpert] = {}

    def policy_fn(observations: list[dict[str, Any]]) -> np.ndarray:
        # A fresh expert per attempt: an episode re-run after a simulator failure starts over.
        actions = [experts.setdefault((o["episode"], o["attempt"]), ScriptedExpert()).act(o) for o in observations]
        return np.stack(actions)[:, None]

    return policy_fn


@dataclass
class SoftArmEpisode:
    seed: int
    instruction: str = ""
    success: bool = False
    length: int = 0
    final_distance: float = float("nan")  # m, tip to ball centre when the episode ended
    distances: list[float] = field(default_factory=list)  # after every step
    windows: list[Window] = field(default_factory=list)  # every policy call
    frames: list[np.ndarray] = field(default_factory=list)  # when recorded: the start and every step
    retries: int = 0  # re-runs after a simulator died or hung


def distance_shaped_reward(distance_penalty: float) -> Callable[[SoftArmEpisode], float]:
    """An RL reward (`lib.rl.ript.rollout_groups`' `reward_of`): 1 for a success; a failure
    -distance_penalty x (final tip distance / SUCCESS_RADIUS), so that among failures the ones that
    came closer rank higher (distance_penalty 0: the original's success-only reward)."""

    def reward_of(episode: SoftArmEpisode) -> float:
        if episode.success:
            return 1.0
        return -distance_penalty * episode.final_distance / SUCCESS_RADIUS

    return reward_of


class SoftArmVectorRollout(VectorRollout):
    """`num_envs` soft-arm simulators in worker processes (`python -m lib.envs.soft_arm.sim`), stepped in
    parallel by `lib.envs.vector_rollout.VectorRollout` (the LIBERO rollouts' machinery: one batched policy call
    per round, dead or hung simulators replaced and their episodes re-run), so the RIPT loop's
    pieces (`lib.rl.ript.rollout_groups`) run on either. `run(requests, policy_fn)` rolls out one
    episode per request (a dict with the task `seed`, and optionally `record` to keep its frames)
    and returns the `SoftArmEpisode`s in order. An episode depends on its seed and the policy only.
    A simulator answers a step in milliseconds, so one silent for `worker_timeout_s` has hung."""

    worker_module = "lib.envs.soft_arm.sim"

    def __init__(
        self,
        num_envs: int = 8,
        replan_steps: int = 8,
        max_steps: int = MAX_STEPS,
        image_size: int = 224,
        worker_timeout_s: float = 60.0,
        max_retries: int = 2,
    ) -> None:
        super().__init__([image_size], num_envs, replan_steps, max_steps, worker_timeout_s, max_retries)

    def new_result(self, request: dict[str, Any]) -> SoftArmEpisode:
        return SoftArmEpisode(seed=int(request["seed"]))

    def reset_message(self, request: dict[str, Any]) -> tuple:
        return ("reset", int(request["seed"]))

    def begin(self, result: SoftArmEpisode, answer: tuple, record: bool) -> dict[str, Any]:
        observation, result.instruction = answer
        if record:
            result.frames.append(observation[IMAGE_KEY])
        return {**observation, "task": result.instruction}

    def advance(self, result: SoftArmEpisode, answer: tuple) -> tuple[dict[str, Any], bool, int]:
        observation, success, distances, frames = answer
        result.distances.extend(distances)
        result.final_distance = result.distances[-1]
        result.frames.extend(frames)
        return observation, success, len(distances)


def run_soft_arm_episodes(
    seeds: list[int],
    policy_fn: PolicyFn,
    num_envs: int = 8,
    replan_steps: int = 8,
    max_steps: int = MAX_STEPS,
    image_size: int = 224,
    record: Iterable[int] = (),
    progress: Callable[[int], None] | None = None,
) -> list[SoftArmEpisode]:
    """Closed-loop episodes, one per seed (a seed may repeat), on `num_envs` simulators at once
    (`SoftArmVectorRollout`, started and closed here); episodes whose index is in `record` keep
    their frames."""
    record = set(record)
    requests = [{"seed": seed, "record": index in record} for index, seed in enumerate(seeds)]
    with SoftArmVectorRollout(min(num_envs, len(seeds)), replan_steps, max_steps, image_size) as envs:
        return envs.run(requests, policy_fn, progress=progress)


def serve(connection: Connection, image_size: int) -> None:
    """Worker loop (`lib.envs.vector_rollout.serve_simulator`): ("reset", seed) -> (observation, instruction);
    ("step", commands, record) -> (observation, success, tip distance after each step executed,
    frames); stops at a success. ("close",) ends it."""
    sim = SoftArmSim(image_size)

    def handle(command: str, payload: tuple) -> Any:
        if command == "reset":
            (seed,) = payload
            return sim.reset(seed), sim.task.instruction
        if command == "step":
            commands, record = payload
            distances, frames, observation, success = [], [], None, False
            for action in commands:
                observation, success = sim.step(action)
                distances.append(sim.tip_distance())
                if record:
                    frames.append(observation[IMAGE_KEY])
                if success:
                    break
            return observation, success, distances, frames
        raise ValueError(f"unknown command {command!r}")

    try:
        serve_simulator(connection, handle)
    finally:
        sim.close()


if __name__ == "__main__":
    fd, image_size = sys.argv[1:]
    serve(Connection(int(fd)), int(image_size))
