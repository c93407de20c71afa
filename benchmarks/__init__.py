"""fsyncbn benchmarks: ratios against torch measured in the same run (``python -m benchmarks``)."""
