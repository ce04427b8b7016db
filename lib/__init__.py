"""Thin shared layer of the pi0 accelerate scripts: only what two scripts use."""
