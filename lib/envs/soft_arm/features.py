"""The soft arm's feature keys and sizes: one torch-free home for the data adapter
(`lib/data/soft_arm.py`), the simulator and its worker processes (`lib/envs/soft_arm/sim.py`)."""

NUM_NODES = 10
NODE_FEATURES = 19
ACTION_DIM = 10
ACTION_NAMES = [f"cable_{i}" for i in range(ACTION_DIM)]  # the command of tendon channel i, in [-1, 1]
CHUNK_SIZE = 16
IMAGE_SIZE = 224
IMAGE_KEY = "observation.images.front"
STATE_KEY = "observation.state"
GRAPH_KEY = "observation.graph"
ACTION_KEY = "action"
