"""Policies that the server can serve."""

from .builtin import BUILTIN_POLICIES, ConstantPolicy, RandomPolicy, ReplayPolicy, make_builtin_policy

__all__ = ["BUILTIN_POLICIES", "ConstantPolicy", "RandomPolicy", "ReplayPolicy", "make_builtin_policy"]
