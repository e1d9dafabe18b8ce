"""Serving a registered model on Ray Serve: HTTP API, web page, dynamic batching, registry following.

    settings   ServeSettings: the limits and knobs of one deployment (validated before Ray starts)
    requests   the request body of POST /v1/images (pydantic: unknown fields and bad values -> 422)
    source     resolve models:/name@alias to a version, load it, warm it up; AliasFollower swaps versions
    batching   TextCache (LRU of prompt embeddings) and run_batch (compatible requests -> one forward)
    app        the FastAPI app and the Serve deployment; ``build_app`` for ``serve run`` / config files

Only ``app`` imports Ray; the others can be used (and tested) without a cluster.
"""
