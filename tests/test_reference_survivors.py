"""Tests written against mutants that survived the mutation run (docs/testing.md), each
checked against an independent reference (numpy, scipy, scikit-learn or a closed form)."""

from __future__ import annotations
