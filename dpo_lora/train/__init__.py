"""The DPO loop: setup, step, losses, reference log-probs, guards, metrics, checkpoints, evaluation."""
