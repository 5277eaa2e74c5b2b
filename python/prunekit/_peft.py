"""peft, the LoRA library, as an optional dependency: the adapter name prunekit trains and the import
with an install hint. Shared by LoRAPrune (pruning/loraprune.py) and LoRA recovery (train/lora.py)."""
from __future__ import annotations

ADAPTER = "default"


def require_peft():
    try:
        import peft
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("LoRA features need peft: pip install 'prunekit[lora]'") from e
    return peft
