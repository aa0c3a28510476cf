"""Evaluation harness (`rewire-jax eval`): tasks, methods, batched resumable runner, code sandbox,
reports. See the README section "Evaluation harness"."""
