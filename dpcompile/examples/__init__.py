"""Runnable examples (``dpcompile digits``)."""
