"""Runnable examples (``python -m curvplan.examples.digits``)."""
