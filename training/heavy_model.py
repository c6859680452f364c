"""Stage 2: a small transformer over the card's last 64 transactions plus the current one.

This module owns the stage-2 network, its training loop and its ONNX export (opset 17, dynamic
batch axis): input ``sequence`` float32 ``[N, SEQUENCE_LEN, TOKEN_DIM]``, output ``score`` float32
``[N, 1]``. Attention is written out with plain matmul / softmax so the exported graph is portable
(onnxruntime CPU and CUDA, TensorRT through Triton). Padding positions (token channel 0 == 0) are
masked out of attention and pooling. The head reads the current transaction's token together with
a masked mean over the sequence.

Training sees negatives subsampled (random plus "hard" ones from stage 1's escalation band), so
the raw logits rank well but over-state the fraud rate; a Platt scaling fitted with importance
weights (each sampled genuine transaction standing for the ones not sampled) is folded into the
exported graph, so the score is a fraud probability on the real traffic mix.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn

from cascade.features import SEQUENCE_LEN, TOKEN_DIM

if TYPE_CHECKING:
    from pathlib import Path

    from numpy.typing import NDArray

__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAME",
    "HeavyConfig",
    "HeavyModel",
    "export_heavy",
    "predict_logits",
    "train_heavy",
]

logger = logging.getLogger(__name__)

INPUT_NAME: Final = "sequence"
OUTPUT_NAME: Final = "score"
_OPSET: Final = 17
_MASKED: Final = -1.0e4


@dataclass(frozen=True, slots=True)
class HeavyConfig:
    """Size and training schedule of the stage-2 model."""

    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 3
    ff_dim: int = 128
    dropout: float = 0.1
    epochs: int = 6
    batch_size: int = 128
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4


class _EncoderLayer(nn.Module):
    """Pre-norm self-attention + feed-forward block with an additive padding mask."""

    def __init__(self, config: HeavyConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.d_model // config.n_heads
        self.norm1 = nn.LayerNorm(config.d_model)
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.norm2 = nn.LayerNorm(config.d_model)
        self.ff = nn.Sequential(
            nn.Linear(config.d_model, config.ff_dim),
            nn.GELU(),
            nn.Linear(config.ff_dim, config.d_model),
        )
        self.drop = nn.Dropout(config.dropout)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        d_model = self.n_heads * self.head_dim
        qkv = self.qkv(self.norm1(h)).reshape(-1, SEQUENCE_LEN, 3, self.n_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [N, H, L, dh]
        attn = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim)) + mask
        mixed = torch.matmul(torch.softmax(attn, dim=-1), v)
        mixed = mixed.transpose(1, 2).reshape(-1, SEQUENCE_LEN, d_model)
        h = h + self.drop(self.proj(mixed))
        out: torch.Tensor = h + self.drop(self.ff(self.norm2(h)))
        return out


class HeavyModel(nn.Module):
    """Transformer encoder over ``[N, SEQUENCE_LEN, TOKEN_DIM]`` tokens -> fraud probability."""

    def __init__(self, config: HeavyConfig) -> None:
        super().__init__()
        self.embed = nn.Linear(TOKEN_DIM, config.d_model)
        self.position = nn.Parameter(torch.zeros(1, SEQUENCE_LEN, config.d_model))
        nn.init.normal_(self.position, std=0.02)
        self.layers = nn.ModuleList(_EncoderLayer(config) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(config.d_model)
        self.head = nn.Sequential(
            nn.Linear(2 * config.d_model, config.d_model), nn.GELU(), nn.Linear(config.d_model, 1)
        )
        # Platt scaling folded into the graph: probability = sigmoid(scale * logit + shift).
        self.register_buffer("platt", torch.tensor([1.0, 0.0]))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Uncalibrated logits ``[N, 1]``."""
        real = x[:, :, 0:1]  # [N, L, 1]
        mask = ((1.0 - real) * _MASKED).reshape(-1, 1, 1, SEQUENCE_LEN)
        h = self.embed(x) + self.position
        for layer in self.layers:
            h = layer(h, mask)
        h = self.norm(h)
        pooled = (h * real).sum(dim=1) / real.sum(dim=1).clamp(min=1.0)
        return self.head(torch.cat([h[:, -1], pooled], dim=-1))  # type: ignore[no-any-return]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Calibrated fraud probability ``[N, 1]``."""
        platt: torch.Tensor = self.platt  # type: ignore[assignment]
        return torch.sigmoid(self.logits(x) * platt[0] + platt[1])


def predict_logits(
    model: HeavyModel, sequences: NDArray[np.float32], batch_size: int = 512
) -> NDArray[np.float32]:
    """Uncalibrated logits for ``sequences`` (eval mode, no grad), as a flat array."""
    model.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(sequences), batch_size):
            batch = torch.from_numpy(sequences[start : start + batch_size])
            out.append(model.logits(batch).squeeze(1).numpy())
    return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


def train_heavy(
    sequences: NDArray[np.float32],
    labels: NDArray[np.int8],
    weights: NDArray[np.float64],
    config: HeavyConfig,
    *,
    seed: int,
) -> HeavyModel:
    """Train on a subsampled set, then fit the Platt scaling with importance ``weights``."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = HeavyModel(config)
    x = torch.from_numpy(sequences)
    y = torch.from_numpy(labels.astype(np.float32)).unsqueeze(1)
    n_pos = float(labels.sum())
    pos_weight = torch.tensor([max((len(labels) - n_pos) / max(n_pos, 1.0), 1.0) ** 0.5])
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    steps = config.epochs * math.ceil(len(labels) / config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.learning_rate, total_steps=steps, pct_start=0.15
    )
    for epoch in range(config.epochs):
        model.train()
        started = time.perf_counter()
        order = torch.randperm(len(labels), generator=generator)
        total = 0.0
        for start in range(0, len(labels), config.batch_size):
            idx = order[start : start + config.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model.logits(x[idx]), y[idx])
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            total += loss.item() * len(idx)
        logger.info(
            "stage 2 epoch %d/%d loss %.4f (%.0f s)",
            epoch + 1,
            config.epochs,
            total / len(labels),
            time.perf_counter() - started,
        )
    logits = predict_logits(model, sequences)
    platt = LogisticRegression(C=1e4, max_iter=1000)
    platt.fit(logits.reshape(-1, 1), labels, sample_weight=weights)
    model.platt.copy_(  # type: ignore[operator]
        torch.tensor([float(platt.coef_[0, 0]), float(platt.intercept_[0])])
    )
    model.eval()
    return model


def export_heavy(model: HeavyModel, path: Path) -> None:
    """Write ``model`` as ONNX (opset 17, dynamic batch) with the stage-2 tensor contract."""
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(2, SEQUENCE_LEN, TOKEN_DIM)
    example[:, -1, 0] = 1.0
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        opset_version=_OPSET,
        dynamo=False,
        do_constant_folding=True,
    )
