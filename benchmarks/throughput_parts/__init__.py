"""The pieces of :mod:`benchmarks.throughput` (the CLI lives there), one role per module.

* :mod:`.common` -- defaults, constants and device helpers shared by both modes;
* :mod:`.flops` -- FLOPs per image: analytic from the layer shapes, and the flop counter;
* :mod:`.step` -- step mode: time the real ``TrainStep``;
* :mod:`.jpegs` -- a folder of ImageNet-like JPEGs to time the input pipeline on;
* :mod:`.data` -- data mode: the loop's CPU pipeline and the GPU-decode pipelines;
* :mod:`.suite` -- running settings (in-process or isolated), the suites, output and summary.
"""
