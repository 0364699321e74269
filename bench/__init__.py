"""Benchmarks against qemu-img convert; run as `python -m bench.run` from the top folder."""
