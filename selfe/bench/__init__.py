"""Measuring tools, not the library: the Self-E / flow-matching step timer (``steptime``, also
``python -m selfe.bench``), the GPU check (``gpucheck``, ``gpucheck_train``), sampling latency
(``latency``) and the per-GPU memory plan (``memplan``). The scripts in ``benchmarks/`` drive them and
the numbers land in docs/benchmarks.md. Nothing in the library imports this package.
"""
