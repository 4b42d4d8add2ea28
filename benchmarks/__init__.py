"""sa_cuda benchmarks (benchmarks/README.md).

- ``benchmarks.bench`` (``python -m benchmarks.bench``): the Shuffle Attention layer, eager vs
  torch.compile vs fused, checked against float64 before it is timed;
- ``benchmarks.e2e`` (``python -m benchmarks.e2e``): SA-ResNet-50 with reference vs fused layers;
- ``benchmarks.harness``: what every benchmark script shares (timers, copy bandwidth, model bytes,
  saved memory, modules and inputs, the correctness check); ``benchmarks.configs``: the shapes,
  dtypes, variants and the command line; ``benchmarks.report``: tables, JSON, plot;
- ``benchmarks/gpu_check/``: the one-command GPU visit (gpu_check.sh), built on the same harness.
"""
