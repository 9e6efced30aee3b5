"""Benchmarks of fastresnet against eager PyTorch and torch.compile (DESIGN.md §5). Results are JSON Lines rows
under `benchmarks/results/`; `python -m benchmarks.report` turns them into README tables and plots."""
