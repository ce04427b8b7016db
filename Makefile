# Set-up: `make install` then `make test` (see README.md).
SHELL := /bin/bash
VENV := .venv
PY ?= $(VENV)/bin/python
ACCELERATE := $(VENV)/bin/accelerate
# Built on demand by `make debug` and the tests; see data_prep/.
TOKENIZER_DIR := artifacts/tokenizer
DEBUG_RAW_DIR := artifacts/soft_arm_raw_debug
DEBUG_DATASET_DIR := artifacts/soft_arm_lerobot_debug

export MUJOCO_GL ?= egl
export PYOPENGL_PLATFORM ?= egl
export TOKENIZERS_PARALLELISM ?= false
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE ?= 1

.PHONY: install debug bench plan gpu-check soak soft-arm-ablation ript-soft-arm smoke-full test test-slow test-all lint format clean stage-08 stage-09 stage-10 stage-11 stage-12 stage-13

# Python 3.12 is required: try `python3.12`, then pyenv's 3.12 (its shim fails when the global
# version is another one), then give up with a clear message.
PYTHON312 := $(shell \
	if python3.12 -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; then echo python3.12; \
	elif command -v pyenv >/dev/null 2>&1 && ls -d "$$(pyenv root)"/versions/3.12.*/bin/python3.12 >/dev/null 2>&1; then \
		ls -d "$$(pyenv root)"/versions/3.12.*/bin/python3.12 | sort -V | tail -n 1; \
	fi)

install:
	@if [ -z "$(PYTHON312)" ]; then \
		echo "error: Python 3.12 is required (python3.12 on PATH or installed with pyenv); none was found." >&2; exit 1; fi
	@if [ ! -x $(PY) ] || ! $(PY) -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; then \
		echo "creating $(VENV) with $(PYTHON312)"; rm -rf $(VENV); $(PYTHON312) -m venv $(VENV); fi
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --editable . --editable plugins/lerobot_policy_pi0_graph --editable plugins/lerobot_env_soft_arm
	$(PY) -m pip check

$(TOKENIZER_DIR)/tokenizer.json:
	$(PY) data_prep/make_tokenizer.py --output_dir $(TOKENIZER_DIR)

debug: $(TOKENIZER_DIR)/tokenizer.json
	$(PY) data_prep/make_fake_soft_arm.py --output_dir $(DEBUG_RAW_DIR) --episodes 12 --seed 0
	$(PY) data_prep/soft_arm_to_lerobot.py --raw_dir $(DEBUG_RAW_DIR) --output_dir $(DEBUG_DATASET_DIR)
	$(PY) scripts/train_soft_arm.py --config configs/debug_config.yaml --overwrite

# Graph tokens vs none on the simulated soft arm (docs/soft_arm.md "Graph tokens vs none"): 100 expert
# demonstrations, the tiny pi0 trained with and without graph tokens for each seed, every checkpoint
# and the expert evaluated on the same 50 held-out tasks, then the table. Each run is a file target:
# a finished one is kept, an interrupted training resumes from its last checkpoint.
ABLATION_DIR := outputs/soft_arm_ablation
ABLATION_RAW_DIR := artifacts/soft_arm_raw_sim
ABLATION_DATASET_DIR := artifacts/soft_arm_lerobot_sim
ABLATION_SEEDS := 0 1 2
ABLATION_EVAL := --num_episodes 50 --replan_steps 8
ABLATION_RUNS := $(foreach variant,graph no_graph,$(foreach seed,$(ABLATION_SEEDS),$(ABLATION_DIR)/$(variant)_seed$(seed)/eval/summary.json))
soft-arm-ablation: $(ABLATION_DIR)/eval_expert/summary.json $(ABLATION_RUNS)
	$(PY) scripts/soft_arm_ablation_results.py --output_dir $(ABLATION_DIR) --seeds $(ABLATION_SEEDS)

$(ABLATION_DATASET_DIR)/meta/info.json:
	$(PY) data_prep/simulate_soft_arm.py --output_dir $(ABLATION_RAW_DIR) --episodes 100 --seed 0 --workers 2
	$(PY) data_prep/soft_arm_to_lerobot.py --raw_dir $(ABLATION_RAW_DIR) --output_dir $(ABLATION_DATASET_DIR)

$(ABLATION_DIR)/eval_expert/summary.json:
	$(PY) scripts/eval_soft_arm.py --expert $(ABLATION_EVAL) --output_dir $(@D)

# One training run and its evaluation; the stem $* is <variant>_seed<N>.
$(ABLATION_DIR)/%/eval/summary.json: $(ABLATION_DATASET_DIR)/meta/info.json $(TOKENIZER_DIR)/tokenizer.json
	$(PY) scripts/train_soft_arm.py --config configs/soft_arm_sim.yaml --resume latest \
		output_dir=$(ABLATION_DIR)/$* seed=$(lastword $(subst _seed, ,$*)) data.root=$(ABLATION_DATASET_DIR) \
		model.tokenizer=$(TOKENIZER_DIR) tracking.run_name=$* model.use_graph=$(if $(filter no_graph_%,$*),false,true)
	$(PY) scripts/eval_soft_arm.py --checkpoint $(ABLATION_DIR)/$*/checkpoints/last/pretrained_model $(ABLATION_EVAL) \
		--seed $(lastword $(subst _seed, ,$*)) --label "$(subst _seed, seed ,$*)" --output_dir $(@D)

# Does the RIPT loop learn? (docs/ript.md "RIPT on the simulated soft arm"): 20 demonstrations, behaviour
# cloning to a middling policy, then RL post-training with each objective (configs/ript_soft_arm.yaml)
# and the no-reward control, 3 seeds each. Every step keeps what an earlier run finished.
RIPT_ARM_RAW_DIR := artifacts/soft_arm_raw_few20
RIPT_ARM_DATASET_DIR := artifacts/soft_arm_lerobot_few20
RIPT_ARM_DIR := outputs/ript_soft_arm
RIPT_ARM := $(PY) scripts/ript_soft_arm.py --config configs/ript_soft_arm.yaml --resume latest \
	model.pretrained=$(RIPT_ARM_DIR)/bc_few20/checkpoints/last/pretrained_model
RIPT_LEVER_BASE := rl.objective=cfg_rl model.guidance_weight=2 rl.max_episodes=96
ript-soft-arm: $(TOKENIZER_DIR)/tokenizer.json
	$(PY) data_prep/simulate_soft_arm.py --output_dir $(RIPT_ARM_RAW_DIR) --episodes 20 --seed 0 --workers 2
	$(PY) data_prep/soft_arm_to_lerobot.py --raw_dir $(RIPT_ARM_RAW_DIR) --output_dir $(RIPT_ARM_DATASET_DIR)
	$(PY) scripts/train_soft_arm.py --config configs/soft_arm_sim.yaml --resume latest \
		output_dir=$(RIPT_ARM_DIR)/bc_few20 data.root=$(RIPT_ARM_DATASET_DIR) \
		train.steps=800 train.val_every=800 train.save_every=800
	$(RIPT_ARM) rl.objective=cfg_rl model.guidance_weight=1 output_dir=$(RIPT_ARM_DIR)/cfg_rl_w1
	$(RIPT_ARM) rl.objective=cfg_rl model.guidance_weight=2 output_dir=$(RIPT_ARM_DIR)/cfg_rl_w2
	$(RIPT_ARM) rl.objective=cfg_rl model.guidance_weight=2 iterations=30 output_dir=$(RIPT_ARM_DIR)/cfg_rl_w2_30
	$(RIPT_ARM) rl.objective=cfg_rl model.guidance_weight=2 iterations=30 optim.lr=3e-5 \
		output_dir=$(RIPT_ARM_DIR)/cfg_rl_w2_lr3e-5
	$(RIPT_ARM) rl.objective=advantage_filtered output_dir=$(RIPT_ARM_DIR)/advantage_filtered
	$(RIPT_ARM) rl.objective=behavior_cloning output_dir=$(RIPT_ARM_DIR)/behavior_cloning
	$(RIPT_ARM) rl.objective=flow_noise optim.lr=1e-5 output_dir=$(RIPT_ARM_DIR)/flow_noise_lr1e-5
	$(RIPT_ARM) rl.objective=cfg_rl model.guidance_weight=2 rl.distance_penalty=0.1 \
		output_dir=$(RIPT_ARM_DIR)/cfg_rl_w2_dist0.1
	$(RIPT_ARM) rl.objective=cfg_rl model.guidance_weight=2 rl.rollouts_per_state=8 rl.states_per_draw=4 \
		rl.target_groups=4 output_dir=$(RIPT_ARM_DIR)/cfg_rl_w2_k8
	$(RIPT_ARM) rl.objective=cfg_rl model.guidance_weight=2 rl.states_per_draw=16 rl.target_groups=16 \
		rl.minibatch_size=32 output_dir=$(RIPT_ARM_DIR)/cfg_rl_w2_g16
	# the same recipe from a weaker start: 10 demonstrations
	$(PY) data_prep/simulate_soft_arm.py --output_dir artifacts/soft_arm_raw_few10 --episodes 10 --seed 0 --workers 2
	$(PY) data_prep/soft_arm_to_lerobot.py --raw_dir artifacts/soft_arm_raw_few10 --output_dir artifacts/soft_arm_lerobot_few10
	$(PY) scripts/train_soft_arm.py --config configs/soft_arm_sim.yaml --resume latest \
		output_dir=$(RIPT_ARM_DIR)/bc_few10 data.root=artifacts/soft_arm_lerobot_few10 \
		train.steps=800 train.val_every=800 train.save_every=800
	$(RIPT_ARM) rl.objective=cfg_rl model.guidance_weight=2 output_dir=$(RIPT_ARM_DIR)/few10_cfg_rl_w2 \
		model.pretrained=$(RIPT_ARM_DIR)/bc_few10/checkpoints/last/pretrained_model
	# past the plateau (docs/ript.md "Past the plateau"): each lever of issue 28 alone, then all three,
	# cfg_rl w=2 within the baseline's bound of 96 episodes an iteration (3 draws x 8 states x K=4)
	$(RIPT_ARM) $(RIPT_LEVER_BASE) rl.advantage=critic output_dir=$(RIPT_ARM_DIR)/critic
	$(RIPT_ARM) $(RIPT_LEVER_BASE) rl.explore_std=0.1 output_dir=$(RIPT_ARM_DIR)/explore
	$(RIPT_ARM) $(RIPT_LEVER_BASE) rl.explore_std=0.2 output_dir=$(RIPT_ARM_DIR)/explore_std0.2
	$(RIPT_ARM) $(RIPT_LEVER_BASE) rl.demo_dataset=$(RIPT_ARM_DATASET_DIR) output_dir=$(RIPT_ARM_DIR)/demos
	$(RIPT_ARM) $(RIPT_LEVER_BASE) rl.advantage=critic rl.explore_std=0.1 rl.demo_dataset=$(RIPT_ARM_DATASET_DIR) \
		output_dir=$(RIPT_ARM_DIR)/combined
	# the two levers that did not hurt alone, without the critic
	$(RIPT_ARM) $(RIPT_LEVER_BASE) rl.explore_std=0.1 rl.demo_dataset=$(RIPT_ARM_DATASET_DIR) \
		output_dir=$(RIPT_ARM_DIR)/explore_demos
	# why it levels off: each held-out task 8 times, the BC start and the RL policies
	$(PY) scripts/eval_soft_arm.py --checkpoint $(RIPT_ARM_DIR)/bc_few20/checkpoints/last/pretrained_model \
		--num_episodes 100 --num_envs 16 --attempts 8 --videos 0 --output_dir $(RIPT_ARM_DIR)/pass_at_8/bc_few20
	for arm in cfg_rl_w2 critic explore explore_std0.2 demos combined explore_demos; do for seed in 0 1 2; do \
		$(PY) scripts/eval_soft_arm.py --checkpoint $(RIPT_ARM_DIR)/$$arm/seed$$seed/pretrained_model --num_episodes 100 \
		--num_envs 16 --attempts 8 --videos 0 --output_dir $(RIPT_ARM_DIR)/pass_at_8/$${arm}_seed$$seed; done; done
	$(PY) scripts/ript_soft_arm_results.py --runs_dir $(RIPT_ARM_DIR)

# The project's own speed (scripts/benchmark.py): writes BENCHMARKS.md and BENCHMARKS.json.
$(DEBUG_DATASET_DIR)/meta/info.json:
	$(PY) data_prep/make_fake_soft_arm.py --output_dir $(DEBUG_RAW_DIR) --episodes 12 --seed 0
	$(PY) data_prep/soft_arm_to_lerobot.py --raw_dir $(DEBUG_RAW_DIR) --output_dir $(DEBUG_DATASET_DIR)

bench: $(TOKENIZER_DIR)/tokenizer.json $(DEBUG_DATASET_DIR)/meta/info.json
	$(PY) scripts/benchmark.py --dataset $(DEBUG_DATASET_DIR) --tokenizer $(TOKENIZER_DIR)

# Predicted GPU memory of every shipped production config x launcher x fine-tuning mode, computed on
# fake tensors (scripts/plan_memory.py; docs/memory.md): docs/results/memory_plan/plan.md and .json.
plan:
	$(PY) scripts/plan_memory.py

# The full-size figures on one GPU (scripts/gpu_check.py, about 8 minutes): the GPU section of
# BENCHMARKS.md/json. On a bare GPU machine without .venv: `make gpu-check PY=python3` with the
# project's wheels on PYTHONPATH. Its dataset keeps PNG frames, so no video decoder is needed.
GPU_CHECK_DATASET_DIR := artifacts/soft_arm_lerobot_debug_frames
$(GPU_CHECK_DATASET_DIR)/meta/info.json:
	$(PY) data_prep/make_fake_soft_arm.py --output_dir $(DEBUG_RAW_DIR) --episodes 12 --seed 0
	$(PY) data_prep/soft_arm_to_lerobot.py --raw_dir $(DEBUG_RAW_DIR) --output_dir $(GPU_CHECK_DATASET_DIR) --no_videos

gpu-check: $(TOKENIZER_DIR)/tokenizer.json $(GPU_CHECK_DATASET_DIR)/meta/info.json
	$(PY) scripts/gpu_check.py --dataset $(GPU_CHECK_DATASET_DIR) --tokenizer $(TOKENIZER_DIR)

# Leak check (docs/faults.md): 30 minutes of tiny training and RIPT side by side,
# memory, file descriptors and child processes sampled each minute; soak.json, soak.png, the slopes.
soak: $(TOKENIZER_DIR)/tokenizer.json $(DEBUG_DATASET_DIR)/meta/info.json
	$(PY) scripts/soak.py --minutes 30 --dataset $(DEBUG_DATASET_DIR) --tokenizer $(TOKENIZER_DIR)

# The stage-by-stage RIPT reproduction (scripts/STAGES.md) on the debug config.
stage-08: $(TOKENIZER_DIR)/tokenizer.json
	$(PY) scripts/08_train_with_epochs.py --tokenizer $(TOKENIZER_DIR)

stage-09: $(TOKENIZER_DIR)/tokenizer.json
	$(PY) scripts/09_train_with_config.py --config configs/debug_train_pi0.yaml

stage-10: $(TOKENIZER_DIR)/tokenizer.json
	$(ACCELERATE) launch --config_file accelerate_configs/cpu_2proc.yaml scripts/10_train_with_distributed.py \
		--config configs/debug_train_pi0.yaml

stage-11: $(TOKENIZER_DIR)/tokenizer.json
	$(ACCELERATE) launch --config_file accelerate_configs/cpu_2proc.yaml scripts/11_train_with_logging.py \
		--config configs/debug_train_pi0.yaml

stage-12: $(TOKENIZER_DIR)/tokenizer.json
	$(ACCELERATE) launch --config_file accelerate_configs/cpu_2proc.yaml scripts/12_train_with_dataset.py \
		--config configs/debug_train_pi0.yaml

stage-13: $(TOKENIZER_DIR)/tokenizer.json
	$(ACCELERATE) launch --config_file accelerate_configs/cpu_2proc.yaml scripts/13_train_production_ready.py \
		--config configs/debug_train_pi0.yaml

# Two pytest-xdist workers: most tests wait on one process at a time (imports, a simulator), so two
# fill CI's 2 cores; two-rank launches share one worker (tests/helpers.py, TWO_RANK_LAUNCH).
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

test:
	$(PYTEST) -m "not slow and not full_size" --durations=15 tests

test-slow:
	$(PYTEST) -m "slow and not full_size" --durations=10 tests

test-all:
	$(PYTEST) -m "not full_size" tests

# The real 4 B pi0 on the CPU in bf16 (tests/full_size, marker full_size; about 40 minutes on 2 cores,
# 18 GB of memory): train, save, checked load, resume, LoRA, guided sampling, RIPT on LIBERO, export.
# Writes docs/results/full_size_cpu/report.{md,json}. One process at a time: no xdist workers.
smoke-full:
	$(PY) -m pytest -q -p no:xdist -m full_size --durations=0 tests/full_size

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format:
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf artifacts outputs wandb .pytest_cache
