"""Training with sparsity: gradual pruning schedules, masked training, distillation for recovery."""
