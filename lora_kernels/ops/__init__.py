"""Ops: validation, autograd, torch.library registration and backend dispatch, one file per op."""
