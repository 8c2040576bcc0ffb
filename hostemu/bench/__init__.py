"""Benchmarks: vbusemu measured next to its baselines (``vbusemu bench``)."""
