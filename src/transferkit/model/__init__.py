"""The model: the LightningModule (backbone + head), its heads, metrics, multi-label decisions
and the per-epoch history it keeps."""
