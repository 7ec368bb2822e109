"""Benchmarks: how fast dlsuite trains and feeds models, next to a reference.

Each module measures one thing against a reference (Keras's own
applications, in-memory tensors, a plain PIL loop) and prints one JSON object
per result. `python -m benchmarks` runs them all and writes RESULTS.md; see
`benchmarks/__main__.py`.
"""
