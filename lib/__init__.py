"""The layer the scripts share, by concern: `policies/` (pi0 and its extensions), `rl/` (the RIPT
engine and objectives), `envs/` (LIBERO and the soft arm behind one vector rollout), `data/` (the
soft arm's episodes as samples) and `run/` (config, checkpoints, faults, guards, logs)."""
