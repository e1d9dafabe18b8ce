"""Export a trained model to the formats other tools load: a diffusers pipeline folder.

``export_diffusers(generator, out)`` writes a folder that ``SelfEPipeline.from_pretrained(out)`` (or
``DiffusionPipeline.from_pretrained(out, custom_pipeline=<selfe/export/pipeline.py>)``) loads; see
``selfe.export.pipeline`` for its layout. Imports diffusers; ``selfe.core`` stays free of it.
"""

from selfe.export.diffusers_model import SelfETransformer2DModel
from selfe.export.pipeline import SelfEPipeline, export_diffusers

__all__ = ["SelfEPipeline", "SelfETransformer2DModel", "export_diffusers"]
