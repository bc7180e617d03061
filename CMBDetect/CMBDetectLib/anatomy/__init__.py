"""Anatomy: the shipped MARS atlas, the SWI-to-template registration and its QC, and the look-up
of each lesion's MARS region, structure and side (DESIGN.md section 10)."""
