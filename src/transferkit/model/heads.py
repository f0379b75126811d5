"""The new classifier put on top of a backbone's features."""

from __future__ import annotations

from torch import nn

from transferkit.errors import ConfigError


def build_head(
    in_features: int, num_classes: int, hidden_dim: int | None = None, dropout: float = 0.0
) -> nn.Sequential:
    """Linear by default; `hidden_dim` adds a hidden layer (Linear-ReLU), `dropout` comes before
    each Linear. Layers keep PyTorch's default initialisation (Kaiming-uniform weights, small
    uniform biases), which starts the logits near zero for standardised features."""
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"model.head.dropout={dropout} must lie in [0, 1).")
    layers: list[nn.Module] = []
    if hidden_dim:
        layers += [nn.Dropout(dropout)] if dropout else []
        layers += [nn.Linear(in_features, hidden_dim), nn.ReLU(inplace=True)]
        in_features = hidden_dim
    layers += [nn.Dropout(dropout)] if dropout else []
    layers.append(nn.Linear(in_features, num_classes))
    return nn.Sequential(*layers)
