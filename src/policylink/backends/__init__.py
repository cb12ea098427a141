"""Backends that turn trained checkpoints into :class:`policylink.types.Policy` objects.

Each backend imports its heavy framework (torch, lerobot) lazily, so that
``import policylink`` and the robot-side client never pull it in.
:mod:`policylink.backends.obsmap` (numpy only) maps the observation layouts
clients send onto a policy's input features.
"""
