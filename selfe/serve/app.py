"""The Ray Serve application: FastAPI routes on one deployment that batches, follows the registry, and
answers bad input and overload with clear errors.

    serve run selfe.serve.app:build_app model=models:/selfe@champion     # or a config file (clusters/)
    python pipelines/serve.py --model models:/selfe@champion             # the same, with a local Ray

Routes: ``GET /`` the web page, ``POST /v1/images``, ``GET /v1/model``, ``GET /healthz``, ``GET /readyz``,
and FastAPI's ``/docs``. The routes are defined per deployment (``make_deployment``) so that the request
model carries its limits into the OpenAPI page; no ``from __future__ import annotations`` here, because
FastAPI reads those annotations at definition time.
"""

import asyncio
import base64
import dataclasses
import importlib.resources
import logging
import time

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve.config import BackpressureConfig

from selfe.serve.batching import Job, JobResult, TextCache, run_batch
from selfe.serve.requests import image_request_model
from selfe.serve.settings import ServeSettings
from selfe.serve.source import AliasFollower
from selfe.tracking.images import grid_image, png_bytes

DEPLOYMENT = "ImageServer"


def make_deployment(settings: ServeSettings):
    """The Serve deployment (not yet bound) for ``settings``."""
    settings.validate()
    ImageRequest = image_request_model(settings.max_images, settings.max_prompt_chars)
    api = FastAPI(title="selfe", description="Text-to-image with a Self-E model: any number of steps, "
                  "fast at 1-2. POST /v1/images; GET /v1/model.", version="1")

    @api.exception_handler(RequestValidationError)
    async def refused(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own answer echoes the input, which fails to encode when it is NaN (an answer 500):
        # name the field and the problem only.
        return JSONResponse({"detail": [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]}
                                        for e in exc.errors()]}, status_code=422)

    @serve.deployment(
        name=DEPLOYMENT,
        num_replicas=settings.num_replicas,
        max_ongoing_requests=settings.max_ongoing_requests,
        max_queued_requests=settings.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=settings.retry_after_s),
        health_check_period_s=10,
    )
    @serve.ingress(api)
    class ImageServer:
        def __init__(self, values: dict) -> None:
            from selfe.tracking.runs import use_tracking_uri

            self.settings = ServeSettings(**values).validate()
            _route_logs_to_serve()
            use_tracking_uri(self.settings.tracking_uri or None)
            self.follower = AliasFollower(self.settings.model, self.settings.device, self.settings.poll_s,
                                          fallback=self.settings.deployed_version or None)
            self.cache = TextCache(self.settings.text_cache_size)
            self.generate_batch.set_max_batch_size(self.settings.max_batch_size)
            self.generate_batch.set_batch_wait_timeout_s(self.settings.batch_wait_s)
            self.served = 0

        def check_health(self) -> None:
            """Serve restarts a replica that stopped following its alias (the watching thread died)."""
            if not self.follower.following():
                raise RuntimeError(f"the registry watch of {self.settings.model} stopped")

        @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02,
                     batch_size_fn=lambda jobs: sum(job.num_images for job in jobs))
        async def generate_batch(self, jobs: list[Job]) -> list[tuple[JobResult, dict]]:
            served = self.follower.current  # one version for the whole batch, whatever a swap does meanwhile
            results = await asyncio.to_thread(run_batch, served.generator, self.cache, jobs,
                                              self.settings.max_batch_size)
            return [(r, served.describe()) for r in results]

        @api.get("/", response_class=HTMLResponse, include_in_schema=False)
        def page(self) -> HTMLResponse:
            return HTMLResponse(importlib.resources.files("selfe.serve").joinpath("page.html").read_text())

        @api.get("/healthz")
        def healthz(self) -> dict:
            return {"status": "ok"}

        @api.get("/readyz")
        def readyz(self) -> JSONResponse:
            # The constructor loaded a model and sampled with it (load_served), so a replica that answers is
            # ready; until then Serve's proxy answers 503 for it.
            return JSONResponse({"ready": True, "version": self.follower.current.version.version})

        @api.get("/v1/model")
        def model(self) -> dict:
            return {**self.follower.current.describe(), "last_error": self.follower.last_error,
                    "requests_served": self.served, "text_cache": {"hits": self.cache.hits, "misses": self.cache.misses}}

        @api.post("/v1/images")
        async def images(self, body: ImageRequest, request: Request) -> Response:
            current = self.follower.current
            job = Job(body.prompt, body.num_images, body.seed, body.steps or current.default_steps,
                      current.generator.cfg.sampler.guidance if body.guidance is None else body.guidance)
            t0 = time.perf_counter()
            try:
                result, described = await asyncio.wait_for(self.generate_batch(job), self.settings.request_timeout_s)
            except asyncio.TimeoutError:
                return JSONResponse({"detail": f"not answered within request_timeout_s = "
                                               f"{self.settings.request_timeout_s:g} s; try again, or fewer steps"},
                                    status_code=504)
            seconds = time.perf_counter() - t0
            self.served += 1
            sc = {"steps": job.steps, "guidance": job.guidance, "seed": job.seed}
            headers = {"X-Model-Name": str(described["name"]), "X-Model-Version": str(described["version"]),
                       "X-Steps": str(job.steps), "X-Guidance": f"{job.guidance:g}", "X-Eta": f"{result.eta:g}", "X-Seconds": f"{seconds:.4f}",
                       "X-Batch-Images": str(result.batch_images), "X-NFE": str(result.nfe),
                       "X-Prompt-Truncated": "true" if result.truncated else "false"}
            if body.format == "png":
                image = result.images[0] if len(result.images) == 1 else grid_image({0: result.images})
                return Response(png_bytes(image, scale=1), media_type="image/png", headers=headers)
            return JSONResponse({
                "images": [base64.b64encode(png_bytes(np.asarray(im), scale=1)).decode() for im in result.images],
                "model": {k: described[k] for k in ("name", "version", "alias", "run_id", "method")},
                **sc, "eta": result.eta,
                "nfe": result.nfe, "seconds": round(seconds, 4), "batch_images": result.batch_images,
                "prompt_truncated": result.truncated}, headers=headers)

        def __del__(self) -> None:
            follower = getattr(self, "follower", None)
            if follower is not None:
                follower.close()

    return ImageServer


def _route_logs_to_serve() -> None:
    """selfe's serving log lines (version swaps, load failures) go where Serve writes the replica's log."""
    ours, theirs = logging.getLogger("selfe.serve"), logging.getLogger("ray.serve")
    ours.setLevel(logging.INFO)
    for handler in theirs.handlers:
        if handler not in ours.handlers:
            ours.addHandler(handler)


def build_app(args: dict) -> serve.Application:
    """The application for ``serve run selfe.serve.app:build_app key=value ...`` or a Serve config's
    ``import_path`` + ``args`` (keys: ``ServeSettings``' fields; Serve calls a builder with that one dict).
    Unknown keys are refused where the app is built, before any replica starts."""
    return application(ServeSettings.from_dict(dict(args)))


def application(settings: ServeSettings) -> serve.Application:
    """The application for ``settings``, built where it is deployed from (the driver): a relative tracking
    store is made absolute (replicas run in other working directories), and the version the model
    reference points at now is recorded as the one a replica falls back to
    (``ServeSettings.deployed_version``)."""
    from selfe.serve.source import resolve_version
    from selfe.tracking.runs import use_tracking_uri

    settings.tracking_uri = use_tracking_uri(settings.tracking_uri or None)
    settings.deployed_version = resolve_version(settings.model).version or 0
    return make_deployment(settings).bind(dataclasses.asdict(settings))
