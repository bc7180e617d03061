"""Longitudinal comparison: a baseline and a follow-up scan of one head, detected each on its own,
registered rigidly, their lesions matched in the follow-up's space and labelled new,
persisting or resolved; the count of new microbleeds graded as ARIA-H."""
