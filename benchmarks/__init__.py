"""Benchmarks of fastresnet vs eager PyTorch and torch.compile (docs/architecture.md §5). Results are JSON Lines rows
under `benchmarks/results/`; `python -m benchmarks.report` turns them into README tables and plots."""
