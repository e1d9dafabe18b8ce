"""selfe: Self-E text-to-image training on Ray, tracked in MLflow.

The package is built in layers. A module imports from its own folder and from layers below its own,
never from a layer above or beside it, so there is no import cycle between modules or between folders
(``tests/test_layers.py`` reads the table below and enforces it, lazy imports inside functions
included). Bottom to top:

    1  configtools, core        config helpers; the method itself in pure PyTorch (no Ray, no MLflow)
    2  storage, perf, console   where bytes live and Ray starts; FLOP counts; the pipelines' console
    3  encoders                 the frozen text encoder and image codecs
    4  config                   the typed job config, composed of the sections that live with their code
    5  paths, data              where outputs land; source -> reader -> render/encode pool -> cache -> contract
    6  eval, generator          GenEval-lite, CLIP score and FID; a trained model that samples
    7  tracking, export         MLflow runs, registry, images; the diffusers export
    8  train                    the Ray Train driver and workers
    9  sweep, cli, serve        Ray Tune sweeps; the pipelines' shared command-line helpers; Ray Serve serving
    10 bench                    measuring tools (nothing in the library imports them)

The pipelines (``pipelines/``, ``tune/``) and ``benchmarks/`` sit on top and are not imported by the
package.
"""
