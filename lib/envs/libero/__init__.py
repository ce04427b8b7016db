"""LIBERO: the simulator worker and its vector rollout."""
