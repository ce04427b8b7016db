"""Weights that fail to load never become a silent random start (docs/faults.md).

LeRobot 0.6.1's `PI0Policy.from_pretrained` prints load errors and returns the random model; every
loader of this project (`lib.policies.loading.load_pretrained_policy`, and so `PI0GraphPolicy.from_pretrained`,
`PI0CFGPolicy.from_pretrained`, `make_pi0_policy`, the scripts) must raise instead."""

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import PYTHON, exit_in_process, run
from lerobot.configs import FeatureType, PolicyFeature
from lerobot.policies.pi0.configuration_pi0 import PI0Config
from lerobot.policies.pi0.modeling_pi0 import PI0Policy
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from lib.policies.factories import make_ript_policy
from lib.policies.flag_pi0 import PI0CFGConfig, PI0CFGPolicy
from lib.policies.graph_pi0 import GRAPH_KEY, PI0GraphConfig, PI0GraphPolicy
from lib.policies.loading import CheckpointError, load_pretrained_policy, make_pi0_policy, resolve_pretrained
from lib.rl.ript import RL_IDENTITY_KEYS
from lib.run.checkpoint import JSON_STATE_FILE, STATE_DIR, RunIdentity, check_output_dir, start_output_dir
from lib.run.errors import UserError
from lib.run.schemas import ModelConfig

FEATURES = {
    "observation.images.front": PolicyFeature(type=FeatureType.VISUAL, shape=(3, 64, 64)),
    "observation.state": PolicyFeature(type=FeatureType.STATE, shape=(10,)),
}


def graph_config(**overrides) -> PI0GraphConfig:
    return PI0GraphConfig(
        model_size="tiny",
        chunk_size=8,
        n_action_steps=8,
        device="cpu",
        input_features={**FEATURES, GRAPH_KEY: PolicyFeature(type=FeatureType.STATE, shape=(10, 19))},
        output_features={"action": PolicyFeature(type=FeatureType.ACTION, shape=(10,))},
        **overrides,
    )


@pytest.fixture(scope="module")
def graph_checkpoint(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("graph_checkpoint")
    make_pi0_policy("tiny", graph_config(), PI0GraphPolicy).save_pretrained(directory)
    return directory


def damaged_copy(source: Path, destination: Path, change) -> Path:
    """A copy of a checkpoint with the weights `change(state_dict)` returns."""
    destination.mkdir()
    (destination / "config.json").write_text((source / "config.json").read_text())
    weights = load_file(source / "model.safetensors")
    save_file(change(weights), destination / "model.safetensors")
    return destination


def test_a_good_checkpoint_loads_exactly(graph_checkpoint, tmp_path):
    policy = PI0GraphPolicy.from_pretrained(graph_checkpoint)
    saved = load_file(graph_checkpoint / "model.safetensors")
    assert saved.keys() == policy.state_dict().keys()
    assert all(torch.equal(saved[key], value) for key, value in policy.state_dict().items())

    # The backbone is built without random init (`backbone_built_uninitialised`, minutes at full size):
    # every parameter and buffer, the non-persistent rotary frequencies too, still ends as the saved
    # policy's, and so do its actions.
    original = make_pi0_policy("tiny", graph_config(), PI0GraphPolicy).eval()
    original.save_pretrained(tmp_path)
    loaded = PI0GraphPolicy.from_pretrained(tmp_path)
    for kind in ("named_parameters", "named_buffers"):
        expected, got = dict(getattr(original, kind)()), dict(getattr(loaded, kind)())
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected), kind
    generator = torch.Generator().manual_seed(0)
    batch = {
        "observation.images.front": torch.rand(2, 3, 64, 64, generator=generator),
        "observation.state": torch.randn(2, 10, generator=generator),
        GRAPH_KEY: torch.randn(2, 10, 19, generator=generator),
        "observation.language.tokens": torch.randint(0, 500, (2, 12), generator=generator),
        "observation.language.attention_mask": torch.ones(2, 12, dtype=torch.bool),
    }
    noise = torch.randn(2, 8, 32, generator=generator)
    assert torch.equal(
        loaded.predict_action_chunk(batch, noise=noise), original.predict_action_chunk(batch, noise=noise)
    )


def test_truncated_weights_are_an_error(graph_checkpoint, tmp_path):
    truncated = damaged_copy(graph_checkpoint, tmp_path / "truncated", lambda weights: weights)
    weights_file = truncated / "model.safetensors"
    os.truncate(weights_file, weights_file.stat().st_size // 2)
    for load in (
        lambda: PI0GraphPolicy.from_pretrained(truncated),
        lambda: make_pi0_policy(truncated, policy_cls=PI0GraphPolicy),
    ):
        with pytest.raises(CheckpointError, match="model.safetensors is truncated or corrupt"):
            load()


def test_missing_and_unexpected_keys_are_named(graph_checkpoint, tmp_path):
    missing = damaged_copy(
        graph_checkpoint, tmp_path / "missing", lambda w: {k: v for k, v in w.items() if k != "model.state_proj.weight"}
    )
    with pytest.raises(CheckpointError, match=r"1 missing keys \['model.state_proj.weight'\]"):
        PI0GraphPolicy.from_pretrained(missing)
    # A graph checkpoint must hold its graph encoder: only a plain pi0 may lack it.
    no_encoder = damaged_copy(
        graph_checkpoint,
        tmp_path / "no_encoder",
        lambda w: {k: v for k, v in w.items() if not k.startswith("model.graph_encoder.")},
    )
    with pytest.raises(CheckpointError, match="missing keys"):
        PI0GraphPolicy.from_pretrained(no_encoder)
    extra = damaged_copy(graph_checkpoint, tmp_path / "extra", lambda w: {**w, "stray": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"1 unexpected keys \['model.stray'\]"):
        PI0GraphPolicy.from_pretrained(extra)


def test_another_policy_type_or_shape_is_refused(graph_checkpoint):
    with pytest.raises(CheckpointError, match="holds a 'pi0_graph' policy; PI0CFGPolicy loads pi0_cfg or pi0"):
        PI0CFGPolicy.from_pretrained(graph_checkpoint)
    with pytest.raises(CheckpointError, match="does not fit a tiny PI0GraphPolicy.*size mismatch"):
        make_pi0_policy(graph_checkpoint, graph_config(graph_hidden_dim=32), PI0GraphPolicy)


def test_a_plain_pi0_checkpoint_leaves_only_the_new_parts_fresh(tmp_path):
    """The documented new parts (graph encoder, flag embedding) may be missing from a plain pi0
    checkpoint; every other weight is the checkpoint's."""
    plain_config = PI0Config(
        chunk_size=8,
        n_action_steps=8,
        device="cpu",
        input_features=FEATURES,
        output_features={"action": PolicyFeature(type=FeatureType.ACTION, shape=(10,))},
    )
    make_pi0_policy("tiny", plain_config, PI0Policy).save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    cfg_config = PI0CFGConfig(
        model_size="tiny",
        chunk_size=8,
        n_action_steps=8,
        device="cpu",
        input_features=FEATURES,
        output_features=plain_config.output_features,
    )
    for policy_cls, config, new_part in (
        (PI0GraphPolicy, graph_config(), "model.graph_encoder."),
        (PI0CFGPolicy, cfg_config, "model.condition_embedding."),
    ):
        policy = load_pretrained_policy(tmp_path, policy_cls, config)
        state = policy.state_dict()
        assert {k for k in state if k not in saved} and all(k.startswith(new_part) for k in state if k not in saved)
        assert all(torch.equal(saved[key], state[key]) for key in saved)
    # With its flag embedding at zero, the flag-conditioned class acts exactly as the plain pi0 (so
    # eval_libero.py scores a plain pi0 through it), at any guidance weight.
    generator = torch.Generator().manual_seed(0)
    batch = {
        "observation.images.front": torch.rand(2, 3, 64, 64, generator=generator),
        "observation.state": torch.randn(2, 10, generator=generator),
        "observation.language.tokens": torch.randint(0, 500, (2, 12), generator=generator),
        "observation.language.attention_mask": torch.ones(2, 12, dtype=torch.bool),
    }
    noise = torch.randn(2, 8, 32, generator=generator)
    plain = make_pi0_policy("tiny", plain_config, PI0Policy)
    plain.load_state_dict(saved)
    expected = plain.predict_action_chunk(batch, noise=noise)
    for guidance_weight in (1.0, 3.0):
        config = PI0CFGConfig.from_config(plain_config, model_size="tiny", guidance_weight=guidance_weight)
        cfg_policy = load_pretrained_policy(tmp_path, PI0CFGPolicy, config)
        torch.testing.assert_close(cfg_policy.predict_action_chunk(batch, noise=noise), expected, rtol=1e-5, atol=1e-5)


def test_missing_local_path_is_named():
    with pytest.raises(CheckpointError, match="pretrained path outputs/no_such_run/pretrained_model does not exist"):
        resolve_pretrained("outputs/no_such_run/pretrained_model")
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_pretrained("./pi0_base")


def test_a_hub_id_loads_from_the_cache_with_the_hub_arguments(graph_checkpoint, tmp_path):
    """A hub id resolves through the Hugging Face cache offline; LeRobot's hub arguments of
    `from_pretrained` (cache_dir, revision) reach the download instead of being dropped."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-graph-pi0"  # the cache's documented layout
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in graph_checkpoint.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)

    expected = PI0GraphPolicy.from_pretrained(graph_checkpoint).state_dict()
    for revision in (None, commit):
        policy = PI0GraphPolicy.from_pretrained("someone/tiny-graph-pi0", cache_dir=tmp_path / "hub", revision=revision)
        assert all(torch.equal(expected[key], value) for key, value in policy.state_dict().items())
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache"):
        PI0GraphPolicy.from_pretrained("someone/tiny-graph-pi0", cache_dir=tmp_path / "hub", revision="v2")
    with pytest.raises(CheckpointError, match="strict=False is not supported"):
        PI0GraphPolicy.from_pretrained(graph_checkpoint, strict=False)


def test_ript_policy_from_a_checkpoint_without_processors_is_refused(tmp_path, tokenizer_dir):
    """Its normalization statistics are unknown: never replaced by identity normalization."""
    model = OmegaConf.structured(ModelConfig(pretrained="tiny", tokenizer=str(tokenizer_dir), chunk_size=8))
    policy, *_ = make_ript_policy(model, "cpu")
    policy.save_pretrained(tmp_path)  # weights and config, no processors
    model.pretrained = str(tmp_path)
    with pytest.raises(CheckpointError, match="has no policy_preprocessor.json"):
        make_ript_policy(model, "cpu")


def test_scripts_exit_2_with_one_line(
    graph_checkpoint, tmp_path, train_args, dataset_dir, tokenizer_dir, monkeypatch, capsys
):
    """The command-line contract: a clear line naming the problem, exit 2, no traceback. (In this
    process where the error comes before anything is built: the same `main`, without 6 s of imports.)"""
    truncated = damaged_copy(graph_checkpoint, tmp_path / "truncated", lambda weights: weights)
    os.truncate(truncated / "model.safetensors", 1000)
    eval_dir = tmp_path / "eval"
    code, error = exit_in_process(
        monkeypatch, capsys, "scripts/eval_soft_arm.py", "--checkpoint", str(truncated), "--output_dir", str(eval_dir)
    )
    assert code == 2 and "Traceback" not in error, error
    assert f"error: {truncated / 'model.safetensors'} is truncated or corrupt" in error
    assert not eval_dir.exists()

    # An uncached hub id with the hub out of reach: the offline advice, before a model is built.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty_hf_home")}
    result = run(
        [
            PYTHON,
            "scripts/train_soft_arm.py",
            *train_args,
            f"output_dir={tmp_path / 'run'}",
            "model.pretrained=lerobot/pi0_base",
        ],
        check=False,
        env=env,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "hub id 'lerobot/pi0_base' is not in the Hugging Face cache" in result.stderr
    assert "HF_HUB_OFFLINE=1" in result.stderr
    assert not (tmp_path / "run").exists()  # resolved before the dataset, its loader workers and the output_dir

    def refused_ript(*overrides: str) -> str:
        """train_ript_pi0.py on configs/minimal_test.yaml with `overrides`: exit 2, one line; its stderr."""
        code, error = exit_in_process(
            monkeypatch, capsys, "scripts/train_ript_pi0.py", "--config", "configs/minimal_test.yaml", *overrides
        )
        assert code == 2 and "Traceback" not in error, error
        return error

    # A fresh RIPT run into a directory that holds a run: refused before anything is written.
    run_dir = tmp_path / "ript"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    assert f"error: output_dir {run_dir} already holds a run" in refused_ript(f"output_dir={run_dir}")
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl"]

    # A task name the suite does not have: named before the output_dir is created.
    fresh_dir = tmp_path / "ript_fresh"
    error = refused_ript(f"output_dir={fresh_dir}", "env.task_names=[no_such_task]")
    assert "libero_spatial has no task named ['no_such_task']" in error and not fresh_dir.exists()

    # Demonstrations for the update's anchor without the policy's inputs (a soft-arm dataset given to
    # the LIBERO trainer), or no dataset at all: named before the output_dir is created.
    for demos, expected in (
        (dataset_dir, f"rl.demo_dataset {dataset_dir}: no 'observation.images.image', which the policy takes"),
        (tmp_path / "no_demos", f"rl.demo_dataset {tmp_path / 'no_demos'} is not a LeRobotDataset"),
    ):
        error = refused_ript(f"output_dir={fresh_dir}", f"model.tokenizer={tokenizer_dir}", f"rl.demo_dataset={demos}")
        assert expected in error and not fresh_dir.exists()


def test_output_dir_rules(tmp_path, capsys):
    """A run never lands on top of another: refused unless resumed or overwritten; `--resume latest`
    with nothing to resume says so; a resumed run drops the metrics rows logged after its checkpoint."""
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    with pytest.raises(UserError, match=f"output_dir {a_file} exists and is not a directory"):
        check_output_dir(a_file, None, overwrite=False)

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step_00000002" / "training_state").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(f'{{"step": {step}, "loss": 1.0}}\n' for step in (1, 2, 3, 4)))
    with pytest.raises(UserError, match="already holds a run; pass --resume latest to continue it, --overwrite"):
        check_output_dir(run_dir, None, overwrite=False)
    checkpoint = check_output_dir(run_dir, "latest", overwrite=False)
    assert checkpoint == run_dir / "checkpoints" / "step_00000002"
    start_output_dir(run_dir, checkpoint, overwrite=False)
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]

    assert check_output_dir(tmp_path / "new", "latest", overwrite=False) is None
    assert "--resume latest: no checkpoint in" in capsys.readouterr().out
    start_output_dir(run_dir, None, overwrite=True)
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()


def test_a_resume_with_another_objective_is_refused(tmp_path):
    """What makes a run the experiment it is (`RunIdentity`, kept in each checkpoint's state.json):
    a resume that changes it is refused naming the key; a checkpoint from before the identity was
    saved has nothing to compare. End to end through ript_soft_arm.py: test_soft_arm_sim.py (`slow`)."""
    saved = OmegaConf.create({"rl": {"objective": "cfg_rl"}, "model": {"guidance_weight": 2.0}})
    checkpoint = tmp_path / "step_00000001"
    (checkpoint / STATE_DIR).mkdir(parents=True)
    state_file = checkpoint / STATE_DIR / JSON_STATE_FILE
    state_file.write_text(json.dumps({"identity": RunIdentity(saved, RL_IDENTITY_KEYS).state_dict()}))
    RunIdentity(saved, RL_IDENTITY_KEYS).check(checkpoint)  # the same run
    for key, value in (("rl.objective", "advantage_filtered"), ("model.guidance_weight", 1.0)):
        other = OmegaConf.merge(saved, OmegaConf.from_dotlist([f"{key}={value}"]))
        with pytest.raises(UserError, match=f"trained with {key}=.*, this run has {key}={value}"):
            RunIdentity(other, RL_IDENTITY_KEYS).check(checkpoint)
    state_file.write_text(json.dumps({"progress": {"iteration": 1}}))  # saved before RunIdentity existed
    RunIdentity(OmegaConf.merge(saved, {"rl": {"objective": "behavior_cloning"}}), RL_IDENTITY_KEYS).check(checkpoint)


def test_train_ript_resolves_its_model_before_any_tracker_starts(monkeypatch, capsys, tmp_path):
    """An uncached hub id for train_ript_pi0.py: one line, exit 2, and no output_dir (no wandb run,
    no log) - the model source is checked with the config, not after the trackers start."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    run_dir = tmp_path / "ript"
    code, err = exit_in_process(
        monkeypatch,
        capsys,
        "scripts/train_ript_pi0.py",
        "--config",
        "configs/minimal_test.yaml",
        f"output_dir={run_dir}",
        "model.pretrained=lerobot/pi0_libero_finetuned",
    )
    assert code == 2 and "Traceback" not in err, err
    assert "hub id 'lerobot/pi0_libero_finetuned' is not in the Hugging Face cache" in err
    assert not run_dir.exists()
