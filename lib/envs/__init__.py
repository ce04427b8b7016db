"""Simulators behind one vector rollout: LIBERO and the simulated soft arm."""
