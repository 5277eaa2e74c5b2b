"""Plain PyTorch references: the default implementations and the test oracles of every fast path."""
