"""Fixed 2-D sin-cos position embeddings for image tokens (MAE style).

BAGEL adds a 2-D position embedding at the LLM input of every image token (ViT and
VAE latent); the LLM itself gives an image one RoPE position, so this is the only
place the model learns where a patch sits inside its image.

The first half of the channels encodes the row, the second half the column; each
half is [sin(pos * w_k), cos(pos * w_k)] with w_k = 1 / 10000^(k / (D/4)).
The table is a non-persistent buffer: it is a pure function of (dim, max grid), so it
stays out of checkpoints and the max grid can grow without breaking old ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[len(positions), dim]: sin in the first half, cos in the second."""
    if dim % 2:
        raise ValueError(f"1-D sin-cos needs an even dim, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000.0**omega
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_2d(dim: int, rows: int, cols: int) -> torch.Tensor:
    """[rows, cols, dim]: rows in channels [0, dim/2), columns in [dim/2, dim)."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos needs a dim divisible by 4, got {dim}")
    row_emb = sincos_1d(dim // 2, torch.arange(rows))  # [rows, dim/2]
    col_emb = sincos_1d(dim // 2, torch.arange(cols))  # [cols, dim/2]
    return torch.cat([row_emb[:, None, :].expand(rows, cols, -1),
                      col_emb[None, :, :].expand(rows, cols, -1)], dim=2)


def grid_list(grids: torch.Tensor | Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """Grids as plain (rows, cols) pairs, from a [n, 2] tensor or a list of pairs."""
    if isinstance(grids, torch.Tensor):
        grids = grids.reshape(-1, 2).tolist()
    return [(int(r), int(c)) for r, c in grids]


class SinCos2D(nn.Module):
    """2-D sin-cos embeddings for a list of grids, gathered in row-major order per grid.

    forward(grids [n_images, 2]) -> [sum(rows * cols), dim], images in order.
    """

    def __init__(self, dim: int, max_rows: int, max_cols: int) -> None:
        super().__init__()
        self.dim, self.max_rows, self.max_cols = dim, max_rows, max_cols
        self.register_buffer("table", sincos_2d(dim, max_rows, max_cols).reshape(-1, dim),
                             persistent=False)

    def reset_buffers(self) -> None:
        """Recompute the table (after building on the meta device and `to_empty`)."""
        table = sincos_2d(self.dim, self.max_rows, self.max_cols).reshape(-1, self.dim)
        self.table = table.to(device=self.table.device, dtype=self.table.dtype)

    def index(self, grids: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
        """Flat indices into the table for each token of each grid (row-major)."""
        parts = []
        for rows, cols in grid_list(grids):
            if not (0 < rows <= self.max_rows and 0 < cols <= self.max_cols):
                raise ValueError(f"grid {rows}x{cols} outside the position table "
                                 f"{self.max_rows}x{self.max_cols}; raise max_rows/max_cols")
            r = torch.arange(rows, device=self.table.device)
            c = torch.arange(cols, device=self.table.device)
            parts.append((r[:, None] * self.max_cols + c[None, :]).flatten())
        if not parts:
            return torch.zeros(0, dtype=torch.long, device=self.table.device)
        return torch.cat(parts)

    def forward(self, grids: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
        return self.table[self.index(grids)]

    def extra_repr(self) -> str:
        return f"dim={self.dim}, max_grid={self.max_rows}x{self.max_cols}"
