"""Pruning methods: each takes one weight and its calibration statistics and returns the pruned weight."""
