"""Errors that name the case and the problem, so batch runs can report and go on."""

from __future__ import annotations


class CaseError(Exception):
    """A case cannot be processed; the message says which case and why."""

    def __init__(self, case: str, problem: str) -> None:
        super().__init__(f"{case}: {problem}")
        self.case = case
        self.problem = problem


class BatchError(Exception):
    """A batch cannot start as asked (an unwritable output folder, one phase image for many
    cases); raised before any case runs, so nothing is done in vain."""


class InputError(ValueError):
    """The inputs of a batch cannot be listed (a case list that is missing, empty or has no
    image column): nothing has run and nothing was written."""
