"""Evaluation harness (`rewire-jax eval`): tasks, methods, batched resumable runner, code sandbox,
reports. See docs/evaluation.md."""
