"""The pure core of Self-E: the MM-DiT (``model``), the training objective (``objective``), the
any-step sampler (``sampling``), the EMA (``ema``) and the data types they share (``types``).

Only PyTorch: nothing here imports Ray or MLflow, knows about files, or knows how it is parallelised.
The layers around it (``selfe.data``, ``selfe.train``, ``selfe.eval``, ``selfe.tracking``) feed it
``types.Batch`` / ``types.TextCond`` and call it.
"""
