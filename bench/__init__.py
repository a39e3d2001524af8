"""Benchmarks that print measurements against a baseline taken in the same run.

They never assert speed targets and never contact any address but 127.0.0.1.
"""
