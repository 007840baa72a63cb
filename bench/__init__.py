"""Benchmark suite for tensorslice: the service against its transport peers.

Run with ``scripts/bench`` (or ``python -m bench``); see ``bench/run.py`` for the options.
"""
