"""Cohort runs: batches of cases."""
