"""Pairs of rows whose cosine similarity passes a threshold, found block by block: memory stays
at a block of rows against a block of columns (2048 x 2048 floats, 16 MB), whatever the number
of images, and the time is one matrix product over the upper triangle."""

from __future__ import annotations

import torch

BLOCK = 2048


def normalized(vectors: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length (fp32), so a dot product is their cosine similarity."""
    return torch.nn.functional.normalize(vectors.float(), dim=1)


def similar_pairs(
    vectors: torch.Tensor, threshold: float, per_row: int = 10, block: int = BLOCK
) -> list[tuple[int, int, float]]:
    """(i, j, similarity) with i < j for every pair of unit rows at or above `threshold`, keeping
    for each row i its `per_row` most similar later rows (a picture copied a hundred times lists
    each copy against a few others, not all 4,950 pairs). Sorted by i, then most similar first."""
    n = vectors.shape[0]
    pairs: list[tuple[int, int, float]] = []
    k = max(1, int(per_row))
    for start in range(0, n, block):
        rows = vectors[start : start + block]
        best = torch.full((len(rows), 0), -2.0)
        best_index = torch.zeros((len(rows), 0), dtype=torch.long)
        row_index = torch.arange(start, start + len(rows))[:, None]
        for col in range(start, n, block):  # the upper triangle only: j > i
            sims = rows @ vectors[col : col + block].T
            col_index = torch.arange(col, col + sims.shape[1])[None, :].expand_as(sims)
            sims = sims.masked_fill(col_index <= row_index, -2.0)
            merged, merged_index = torch.cat([best, sims], 1), torch.cat([best_index, col_index], 1)
            best, order = merged.topk(min(k, merged.shape[1]), dim=1)
            best_index = merged_index.gather(1, order)
        hit_rows, hit_cols = torch.nonzero(best >= threshold, as_tuple=True)
        for r, c in zip(hit_rows.tolist(), hit_cols.tolist(), strict=True):
            pairs.append((start + r, int(best_index[r, c]), float(best[r, c])))
    return pairs
