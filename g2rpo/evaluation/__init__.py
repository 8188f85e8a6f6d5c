"""Evaluation: pinned protocols, the suites of the papers' tables, and their outputs."""
