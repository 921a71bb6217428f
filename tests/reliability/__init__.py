"""Helpers of the reliability suite (tests/test_reliability*.py)."""
