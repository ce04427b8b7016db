"""Serving a trained checkpoint over the network: the openpi websocket protocol and LeRobot's async inference."""
