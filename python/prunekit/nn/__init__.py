"""Modules for running pruned models."""
