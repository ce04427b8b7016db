"""The simulated soft arm: its features, its simulator workers, its Gymnasium env."""
