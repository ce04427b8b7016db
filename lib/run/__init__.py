"""What a training run needs around the model: config and schemas, checkpoints, faults, guards, logs, errors, hub."""
