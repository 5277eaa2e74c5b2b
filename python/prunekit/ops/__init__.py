"""torch.library custom ops (namespace `prunekit`): reference body, fake kernel, per-device kernels."""
