"""The recipe that regenerates the built-in demo model (``python -m benchmarks.demo.build --out DIR``)."""
