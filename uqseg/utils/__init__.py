"""Utilities for people who build on uqseg: :mod:`uqseg.utils.estimator_checks`."""
