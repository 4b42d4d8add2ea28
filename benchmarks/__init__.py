"""sa_cuda benchmarks (benchmarks/README.md).

- ``benchmarks.bench`` (``python -m benchmarks.bench``): the Shuffle Attention layer, eager vs
  torch.compile vs fused, checked against float64 before it is timed;
- ``benchmarks.e2e`` (``python -m benchmarks.e2e``): SA-ResNet-50 with reference vs fused layers;
- what every benchmark script shares: ``benchmarks.timers`` (timers, copy bandwidth, model bytes)
  and ``benchmarks.harness`` (modules and inputs, the correctness check, the timed statement of
  each pass, saved memory); ``benchmarks.configs``: the shapes, dtypes, variants and the command
  line; ``benchmarks.report``: tables, JSON, plot;
- ``benchmarks/gpu_check/``: the one-command GPU visit (gpu_check.sh), built on the same harness.
"""
