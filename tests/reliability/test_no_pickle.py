"""Nothing the project loads runs code from a file: weights are safetensors, configs JSON/YAML, the
training state's own objects JSON (`lib.run.checkpoint.checkpoint_as_json`), and what accelerate loads
itself (optimizer, RNG states, sampler) goes through `torch.load(weights_only=True)`.

One documented exception: serving over LeRobot's async-inference protocol, whose transport pickles
(`lib/serving/lerobot_grpc.py`; docs/serving.md: trusted networks only). The websocket protocol
never unpickles."""

import re

from helpers import REPO

# What would load a pickle with code execution: the pickle modules, NumPy's pickle switch,
# torch.load without weights_only=True, and accelerate's registered objects (loaded with
# weights_only=False).
UNSAFE = {
    "pickle module": re.compile(r"^\s*(import|from)\s+(c?pickle|dill|joblib)\b", re.M),
    "np.load with allow_pickle=True": re.compile(r"allow_pickle\s*=\s*True"),
    "torch.load without weights_only=True": re.compile(r"torch\.load\((?![^)]*weights_only\s*=\s*True)[^)]*\)"),
    "accelerate's pickled custom objects": re.compile(r"register_for_checkpointing\("),
}


# file -> (what it does, why it may): each is said in its own docstring and in docs/serving.md
DOCUMENTED_EXCEPTIONS = {"lib/serving/lerobot_grpc.py": "pickle module"}


def test_no_unrestricted_pickle_in_the_code():
    sources = sorted(path for folder in ("lib", "scripts", "data_prep") for path in (REPO / folder).rglob("*.py"))
    assert len(sources) > 20
    found = [
        f"{path.relative_to(REPO)}: {what}"
        for path in sources
        for what, pattern in UNSAFE.items()
        if pattern.search(path.read_text()) and DOCUMENTED_EXCEPTIONS.get(str(path.relative_to(REPO))) != what
    ]
    assert not found, found
    for path in DOCUMENTED_EXCEPTIONS:
        assert "trusted networks only" in (REPO / path).read_text(), path
    assert "trusted networks only" in (REPO / "docs" / "serving.md").read_text()


def test_the_patterns_catch_what_they_are_for():
    """The grep above can fail: each pattern finds its own example and passes the safe spelling."""
    unsafe = {
        "pickle module": "import pickle\n",
        "np.load with allow_pickle=True": "np.load(path, allow_pickle=True)\n",
        "torch.load without weights_only=True": "state = torch.load(path, map_location='cpu')\n",
        "accelerate's pickled custom objects": "accelerator.register_for_checkpointing(progress)\n",
    }
    for what, example in unsafe.items():
        assert UNSAFE[what].search(example), what
    safe = "torch.load(path, map_location='cpu', weights_only=True)\nnp.load(path, allow_pickle=False)\n"
    assert not any(pattern.search(safe) for pattern in UNSAFE.values())
