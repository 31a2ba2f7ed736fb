"""`scripts/compare.py`: the runtime against the PyTorch reference, as a report people can read.

Modules, split by what they import so the runtime side stays torch-free:
  settings.py   what one comparison asks for (shared by both processes, JSON round-trip)
  thresholds.py pass/fail gates and their per-precision defaults
  metrics.py    accuracy numbers (numpy, scikit-image)
  timing.py     median / p95 timing and peak-RSS probes (stdlib, numpy)
  worker.py     the runtime side, run in a child process that never imports torch
  torch_ref.py  the PyTorch side (fp32 and bf16), in the parent process
  figures.py    PNG figures (matplotlib)
  report.py     report.json and report.md
  cli.py        argument parsing and orchestration
This file imports nothing, so `python -m export.compare.worker` does not pull torch in.
"""
