"""Synthetic SWI with microbleeds and their mimics."""
