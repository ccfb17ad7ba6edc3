"""Evaluation: systems under test, tasks and metrics (the full harness is issue #9)."""
