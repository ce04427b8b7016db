"""RL post-training: the RIPT engine (sampling, outcome history, the update) and the objectives."""
