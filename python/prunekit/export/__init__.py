"""Writing pruned models for other programs: the compressed-tensors format (compressed_tensors.py) and
the model card written beside a checkpoint (model_card.py)."""
