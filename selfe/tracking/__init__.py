"""MLflow, in four rooms, imported by name (this package imports nothing, so reading a PNG helper
does not load MLflow):

    runs.py      the tracking URI, experiments, runs (create, find, tag, end), retries through an outage
    runlog.py    metrics and artifacts of a running job that survive an unreachable server
    registry.py  logging the model (from code, ``pyfunc.py``), registering it, loading it back
    images.py    sample grids as PNG (no MLflow)

Workers and the Train controller are separate processes: they receive the run id and tracking URI
explicitly (``MLFLOW_TRACKING_URI`` in the runtime env).
"""
