"""Graph pi0: LeRobot's pi0 with the soft arm's graph as extra tokens of the action expert.

The arm's 10 segments are the nodes of a chain graph, each with 19 features. `SimpleGraphEncoder`
turns them into one 32-dim token per node. 32 is pi0's `max_action_dim`, so `action_in_proj`
(Linear(32, expert width)) lifts the graph tokens into the expert exactly as it lifts actions.
The tokens join the suffix between the state token and the action tokens, as their own attention
block: they see the prefix, the state and each other; the actions see them; the prefix does not.

One token per node rather than one pooled token: the chain keeps its spatial layout (which
segment is bent where), the action tokens can attend to the segment that matters, and 10 extra
tokens are cheap next to the prefix (~250 tokens) and the action chunk.

Only `embed_suffix` is overridden; LeRobot's `forward`, `sample_actions` and `denoise_step` run
as they are. With no graph, `PI0WithGraph` computes exactly what `PI0Pytorch` computes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from lerobot.configs import PreTrainedConfig
from lerobot.policies.pi0.modeling_pi0 import PI0Pytorch
from lerobot.utils.constants import ACTION, OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS
from torch import Tensor, nn

from lib.envs.soft_arm.features import GRAPH_KEY
from lib.policies.loading import CheckedLoadPolicy
from lib.policies.sizes import SizedPI0Config


class SimpleGraphEncoder(nn.Module):
    """(B, N, F) node features -> (B, N, token_dim) graph tokens.

    A node MLP plus a learned node-index embedding, then `message_passing_steps` residual rounds
    in which every node mixes its state with the mean of its chain neighbours (segment i is
    joined to i-1 and i+1), then a linear read-out per node.
    """

    def __init__(
        self,
        num_nodes: int = 10,
        node_dim: int = 19,
        token_dim: int = 32,
        hidden_dim: int = 64,
        message_passing_steps: int = 2,
    ) -> None:
        super().__init__()
        self.num_nodes = num_nodes
        self.node_dim = node_dim
        self.node_in = nn.Sequential(nn.Linear(node_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim))
        self.node_index_embedding = nn.Parameter(torch.randn(num_nodes, hidden_dim) * 0.02)
        self.message_mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(2 * hidden_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim))
            for _ in range(message_passing_steps)
        )
        self.norm = nn.LayerNorm(hidden_dim)
        self.token_out = nn.Linear(hidden_dim, token_dim)
        # Mean over chain neighbours; derived from num_nodes, so not saved with the weights.
        adjacency = torch.zeros(num_nodes, num_nodes)
        index = torch.arange(num_nodes - 1)
        adjacency[index, index + 1] = 1.0
        adjacency[index + 1, index] = 1.0
        self.register_buffer("neighbour_mean", adjacency / adjacency.sum(-1, keepdim=True), persistent=False)

    def forward(self, node_features: Tensor) -> Tensor:
        expected = (self.num_nodes, self.node_dim)
        if node_features.ndim != 3 or tuple(node_features.shape[1:]) != expected:
            raise ValueError(
                f"graph node features must have shape (batch, {expected[0]}, {expected[1]}), "
                f"got {tuple(node_features.shape)}"
            )
        dtype = self.token_out.weight.dtype
        hidden = self.node_in(node_features.to(dtype)) + self.node_index_embedding
        for message_mlp in self.message_mlps:
            neighbours = torch.einsum("ij,bjd->bid", self.neighbour_mean.to(dtype), hidden)
            hidden = hidden + message_mlp(torch.cat([hidden, neighbours], dim=-1))
        return self.token_out(self.norm(hidden))


class PI0WithGraph(PI0Pytorch):
    """`PI0Pytorch` whose `forward`/`sample_actions` take an optional `graph` (B, N, F)."""

    def __init__(self, config: PI0GraphConfig, rtc_processor: Any = None) -> None:
        super().__init__(config, rtc_processor=rtc_processor)
        self.graph_encoder = (
            SimpleGraphEncoder(
                num_nodes=config.graph_num_nodes,
                node_dim=config.graph_node_dim,
                token_dim=config.max_action_dim,
                hidden_dim=config.graph_hidden_dim,
                message_passing_steps=config.graph_message_passing_steps,
            )
            if config.use_graph
            else None
        )
        # Expert-width graph tokens of the call in progress. LeRobot's forward/denoise_step call
        # `embed_suffix(state, x_t, t)` with no slot for extra inputs, so the tokens wait here.
        self._graph_embs: Tensor | None = None

    @contextlib.contextmanager
    def graph_conditioning(self, graph: Tensor | None) -> Iterator[None]:
        """Within the block, every `embed_suffix` call inserts the tokens of `graph`."""
        if graph is None:
            yield
            return
        if self.graph_encoder is None:
            raise ValueError("a graph was given to a model built with use_graph=False")
        self._graph_embs = self.action_in_proj(self.graph_encoder(graph).to(self.action_in_proj.weight.dtype))
        try:
            yield
        finally:
            self._graph_embs = None

    def forward(self, images, img_masks, lang_tokens, lang_masks, state, actions, noise, time, graph=None) -> Tensor:
        with self.graph_conditioning(graph):
            return super().forward(images, img_masks, lang_tokens, lang_masks, state, actions, noise, time)

    @torch.no_grad()
    def sample_actions(
        self, images, img_masks, lang_tokens, lang_masks, state, noise=None, num_steps=None, graph=None, **kwargs
    ) -> Tensor:
        with self.graph_conditioning(graph):
            return super().sample_actions(images, img_masks, lang_tokens, lang_masks, state, noise, num_steps, **kwargs)

    def embed_suffix(self, state, noisy_actions, timestep):
        embs, pad_masks, att_masks, adarms_cond = super().embed_suffix(state, noisy_actions, timestep)
        if self._graph_embs is None:
            return embs, pad_masks, att_masks, adarms_cond
        graph_embs = self._graph_embs.to(embs.dtype)
        batch_size, num_tokens = graph_embs.shape[:2]
        graph_pad = torch.ones(batch_size, num_tokens, dtype=pad_masks.dtype, device=pad_masks.device)
        # 1 opens a new attention block: graph tokens see prefix + state + each other.
        graph_att = torch.zeros(batch_size, num_tokens, dtype=att_masks.dtype, device=att_masks.device)
        graph_att[:, 0] = 1
        embs = torch.cat([embs[:, :1], graph_embs, embs[:, 1:]], dim=1)
        pad_masks = torch.cat([pad_masks[:, :1], graph_pad, pad_masks[:, 1:]], dim=1)
        att_masks = torch.cat([att_masks[:, :1], graph_att, att_masks[:, 1:]], dim=1)
        return embs, pad_masks, att_masks, adarms_cond


def batch_graph(batch: dict[str, Tensor], use_graph: bool) -> Tensor | None:
    """The (B, N, F) graph of a pre-processed batch, or None (no graph, or `use_graph` off).
    LeRobot's AddBatchDimension step batches only the features it knows (state, images): a single
    observation's graph arrives as (N, F)."""
    graph = batch.get(GRAPH_KEY) if use_graph else None
    return graph.unsqueeze(0) if graph is not None and graph.ndim == 2 else graph


@PreTrainedConfig.register_subclass("pi0_graph")
@dataclass
class PI0GraphConfig(SizedPI0Config):
    """`PI0Config` plus the graph encoder and the model size ("full", "small" or "tiny", see lib/policies/sizes.py)."""

    use_graph: bool = True
    graph_num_nodes: int = 10
    graph_node_dim: int = 19
    graph_hidden_dim: int = 64
    graph_message_passing_steps: int = 2


class PI0GraphPolicy(CheckedLoadPolicy):
    """`PI0Policy` around `PI0WithGraph`; `save_pretrained`/`from_pretrained` carry the graph
    encoder's weights and config. Reads the graph from `batch["observation.graph"]` when present.
    Starts from a plain pi0 checkpoint with a fresh graph encoder."""

    config_class = PI0GraphConfig
    name = "pi0_graph"
    new_parts = {"pi0": ("model.graph_encoder.",)}
    network_cls = PI0WithGraph

    def _graph(self, batch: dict[str, Tensor]) -> Tensor | None:
        return batch_graph(batch, self.config.use_graph)

    @torch.no_grad()
    def predict_action_chunk(self, batch: dict[str, Tensor], **kwargs: Any) -> Tensor:
        return super().predict_action_chunk(batch, graph=self._graph(batch), **kwargs)

    def forward(
        self, batch: dict[str, Tensor], noise: Tensor | None = None, time: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Flow-matching loss of a pre-processed batch.

        Unlike `PI0Policy.forward`: padded action steps (`action_is_pad`, past an episode's end)
        and padded action dims do not count, `noise`/`time` may be given (exact resume, paired
        comparisons), and no `.item()` forces a host sync every step. Each frame's loss is the
        mean over its own valid steps and the batch loss the mean over frames, so every frame
        weighs the same whatever batch it is in: accumulated micro-batches and ranks average to
        the loss of their union (a mean over all valid steps of the batch would not).
        """
        images, img_masks = self._preprocess_images(batch)
        lang_tokens, lang_masks = batch[OBS_LANGUAGE_TOKENS], batch[OBS_LANGUAGE_ATTENTION_MASK]
        state = self.prepare_state(batch)
        actions = self.prepare_action(batch)
        if noise is None:
            noise = self.model.sample_noise(actions.shape, actions.device)
        if time is None:
            time = self.model.sample_time(actions.shape[0], actions.device)
        losses = self.model(
            images, img_masks, lang_tokens, lang_masks, state, actions, noise, time, graph=self._graph(batch)
        )
        action_dim = self.config.output_features[ACTION].shape[0]
        per_step = losses[:, :, :action_dim].mean(dim=-1)
        valid = ~batch["action_is_pad"] if "action_is_pad" in batch else torch.ones_like(per_step, dtype=torch.bool)
        valid = valid.to(per_step.dtype)
        loss = ((per_step * valid).sum(dim=1) / valid.sum(dim=1).clamp_min(1.0)).mean()
        return loss, {"loss": loss.detach()}
