"""Text encoder, image codecs and model storage: real MiniLM offline, tiny random VAEs, a moto S3 server."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import huggingface_hub.constants
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from selfe.encoders import (
    CodecConfig,
    ImageCodec,
    PixelCodec,
    TextEncoder,
    TextEncoderConfig,
    build_codec,
    images_to_tensor,
    resolve_model_dir,
    tensor_to_images,
)
from selfe.encoders.storage import MINILM, is_hub_id, split_hub_id
from tests.synthetic import save_tiny_vae

S3Bucket = tuple[Any, str]
"""A boto3 S3 client and the name of a fresh bucket on the moto server."""

MAX_TOKENS = 32
LONG_CAPTION = " ".join(["a small red circle above a large blue square"] * 6)


@pytest.fixture(scope="module", autouse=True)
def offline_hub() -> Iterator[None]:
    """No hub access: the env vars for subprocesses, the constant for the already-imported hub client."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    return TextEncoder(TextEncoderConfig(name=MINILM, max_tokens=MAX_TOKENS, batch_size=64))


@pytest.fixture
def s3(s3_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> S3Bucket:
    """A boto3 client on the moto server, a fresh bucket, and the model cache redirected to tmp_path."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    monkeypatch.setenv("SELFE_MODEL_CACHE", str(tmp_path / "model-cache"))
    client = boto3.client("s3", endpoint_url=s3_server)
    bucket = f"models-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)
    return client, bucket


def upload_dir(client: Any, bucket: str, local_dir: str | Path, prefix: str) -> None:
    for path in Path(local_dir).rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local_dir).as_posix()}")


# --- text encoder -------------------------------------------------------------------------------------


def test_minilm_shapes_mask_and_null_prompt(minilm: TextEncoder) -> None:
    captions = ["", "a red circle", "two green triangles left of a yellow square"]
    emb = minilm.encode(captions)

    assert (minilm.width, minilm.pooled_width, minilm.max_tokens) == (384, 384, MAX_TOKENS)
    assert minilm.id.startswith("minilm:all-MiniLM-L6-v2@")
    assert emb.tokens.shape == (3, MAX_TOKENS, 384) and emb.tokens.dtype == torch.float32
    assert emb.mask.shape == (3, MAX_TOKENS) and emb.mask.dtype == torch.bool
    assert emb.pooled.shape == (3, 384)
    lengths = [len(minilm.tokenizer(c)["input_ids"]) for c in captions]
    assert emb.mask.sum(dim=1).tolist() == lengths
    assert lengths[0] == 2  # the null prompt is [CLS] [SEP] only
    assert emb.mask[:, 0].all() and not emb.mask[0, 2:].any()  # real tokens first, padding after
    assert (emb.tokens[~emb.mask] == 0).all() and (emb.tokens[emb.mask].abs().sum(-1) > 0).all()
    assert torch.isfinite(emb.tokens).all() and torch.isfinite(emb.pooled).all()
    # Outputs must be usable in a graph that is trained (inference tensors cannot be saved for backward).
    assert not emb.tokens.is_inference() and not emb.pooled.is_inference()


def test_minilm_pooled_vectors_are_normalised_and_semantic(minilm: TextEncoder) -> None:
    captions = ["a red circle", "a red circle on grey", "three blue squares", "a red circle"]
    pooled = minilm.encode(captions).pooled

    assert torch.allclose(pooled.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.equal(pooled[0], pooled[3])
    assert not torch.allclose(pooled[0], pooled[1], atol=1e-3)
    cos = pooled @ pooled.T
    assert cos[0, 1] > cos[0, 2] + 0.2


def test_minilm_pooled_is_masked_mean_of_tokens(minilm: TextEncoder) -> None:
    emb = minilm.encode(["a red circle", "a much longer caption about two blue squares"])
    mean = emb.tokens.sum(dim=1) / emb.mask.sum(dim=1, keepdim=True)
    assert torch.allclose(emb.pooled, F.normalize(mean, dim=-1), atol=1e-6)


def test_minilm_flags_truncated_captions(minilm: TextEncoder) -> None:
    emb = minilm.encode(["a red circle", LONG_CAPTION])

    assert len(minilm.tokenizer(LONG_CAPTION)["input_ids"]) > MAX_TOKENS
    assert minilm.truncated(["a red circle", LONG_CAPTION]).tolist() == [False, True]
    assert emb.mask[1].all() and emb.tokens.shape[1] == MAX_TOKENS


def test_minilm_batching_does_not_change_results(
    minilm: TextEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    captions = ["", "a red circle", LONG_CAPTION, "three blue squares", "a green triangle", "x"]
    whole = minilm.encode(captions)
    monkeypatch.setattr(minilm.cfg, "batch_size", 4)  # batches of 4 and 2, different padded lengths
    split = minilm.encode(captions)

    assert torch.equal(whole.mask, split.mask)
    assert torch.allclose(whole.tokens, split.tokens, atol=1e-5)
    assert torch.allclose(whole.pooled, split.pooled, atol=1e-5)


def test_encode_rejects_a_bare_string_and_handles_empty_input(minilm: TextEncoder) -> None:
    with pytest.raises(TypeError, match="sequence of captions"):
        minilm.encode("a red circle")
    empty = minilm.encode([])
    assert empty.tokens.shape == (0, MAX_TOKENS, 384) and empty.pooled.shape == (0, 384)


def test_text_encoder_config_is_validated() -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        TextEncoderConfig(max_tokens=0)


def _save_with_minilm_tokenizer(model: PreTrainedModel, path: Path) -> str:
    model.save_pretrained(path)
    minilm_dir = Path(resolve_model_dir(MINILM))
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_dir / name, path / name)
    return str(path)


def test_t5_checkpoint_loads_its_encoder_only(tmp_path: Path) -> None:
    from transformers import T5Config, T5Model

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=30522,
        d_model=16,
        d_kv=4,
        d_ff=32,
        num_heads=2,
        num_layers=1,
        num_decoder_layers=1,
        decoder_start_token_id=0,
    )
    full = T5Model(config).eval()
    encoder = TextEncoder(TextEncoderConfig(name=_save_with_minilm_tokenizer(full, tmp_path), max_tokens=8))

    assert type(encoder.model).__name__ == "T5EncoderModel"
    assert (encoder.width, encoder.pooled_width) == (16, 16)
    emb = encoder.encode(["a red circle", ""])
    ids = encoder.tokenizer(["a red circle"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = full.encoder(input_ids=ids).last_hidden_state[0]
    assert torch.allclose(emb.tokens[0, : ids.shape[1]], expected, atol=1e-5)  # trained weights, not re-init


def test_clip_checkpoint_uses_projected_text_embeds(tmp_path: Path) -> None:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    text = dict(
        vocab_size=30522,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        bos_token_id=101,
        eos_token_id=102,
    )
    vision = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=16,
    )
    full = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).eval()
    path = _save_with_minilm_tokenizer(full, tmp_path)
    encoder = TextEncoder(TextEncoderConfig(name=path, max_tokens=12))

    assert (encoder.width, encoder.pooled_width) == (16, 8)
    emb = encoder.encode(["a red circle"])
    ids = encoder.tokenizer(["a red circle"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        eos_state = full.text_model(input_ids=ids).last_hidden_state[0, -1]
        expected = full.text_projection(eos_state)
    assert torch.allclose(emb.pooled[0], expected, atol=1e-5)
    with pytest.raises(ValueError, match="exceeds the 16 positions"):
        TextEncoder(TextEncoderConfig(name=path, max_tokens=40))


# --- storage ------------------------------------------------------------------------------------------


def test_missing_local_dir_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist.*s3://bucket/prefix"):
        resolve_model_dir(str(tmp_path / "no-such-model"))


def test_hub_id_offline_says_what_to_pass_instead() -> None:
    with pytest.raises(OSError, match="no network here.*local path or s3:// prefix"):
        TextEncoder(TextEncoderConfig(name="nobody-here/no-such-model"))


def test_hub_id_parsing(tmp_path: Path) -> None:
    assert split_hub_id("black-forest-labs/FLUX.1-dev/vae") == ("black-forest-labs/FLUX.1-dev", "vae")
    assert split_hub_id("owner/name") == ("owner/name", None)
    assert is_hub_id("owner/name") and not is_hub_id(str(tmp_path)) and not is_hub_id("./rel/dir")
    assert not is_hub_id("s3://bucket/prefix") and not is_hub_id(MINILM)


def test_minilm_from_s3_matches_local(minilm: TextEncoder, s3: S3Bucket, tmp_path: Path) -> None:
    client, bucket = s3
    upload_dir(client, bucket, resolve_model_dir(MINILM), "minilm")
    remote = TextEncoder(TextEncoderConfig(name=f"s3://{bucket}/minilm", max_tokens=MAX_TOKENS))

    local_copy = tmp_path / "model-cache" / bucket / "minilm"
    assert (local_copy / "model.safetensors").is_file()
    assert (local_copy / "1_Pooling" / "config.json").is_file()  # nested keys keep their folders
    captions = ["", "a red circle", LONG_CAPTION]
    a, b = minilm.encode(captions), remote.encode(captions)
    assert torch.allclose(a.tokens, b.tokens, atol=1e-6) and torch.allclose(a.pooled, b.pooled, atol=1e-6)
    assert remote.id.split("@")[1] == minilm.id.split("@")[1]  # same files, same fingerprint

    # A second resolve skips same-size files and repairs a damaged one.
    weights_mtime = (local_copy / "model.safetensors").stat().st_mtime_ns
    (local_copy / "config.json").write_text("{}")
    assert resolve_model_dir(f"s3://{bucket}/minilm") == str(local_copy)
    assert (local_copy / "model.safetensors").stat().st_mtime_ns == weights_mtime
    original = Path(resolve_model_dir(MINILM)) / "config.json"
    assert (local_copy / "config.json").read_bytes() == original.read_bytes()


def test_s3_empty_prefix_is_a_clear_error(s3: S3Bucket) -> None:
    client, bucket = s3
    client.put_object(Bucket=bucket, Key="minilm/config.json", Body=b"{}")
    # "mini" is a string prefix of "minilm/..." but not a folder: it must not match.
    for uri in (f"s3://{bucket}/missing", f"s3://{bucket}/mini"):
        with pytest.raises(FileNotFoundError, match=f"no objects under {uri}.*aws s3 sync"):
            resolve_model_dir(uri)


def test_s3_missing_bucket_or_credentials_is_a_clear_error(
    s3: S3Bucket, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with pytest.raises(RuntimeError, match="could not read s3://no-such-bucket/m.*bucket exists"):
        resolve_model_dir("s3://no-such-bucket/m")

    _, bucket = s3
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(RuntimeError, match=f"no usable AWS credentials.*{bucket}.*AWS_ACCESS_KEY_ID"):
        resolve_model_dir(f"s3://{bucket}/minilm")


# --- image codecs -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny_vae(tmp_path_factory.mktemp("vae"), seed=0)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_autoencoder_kl_shapes_and_attributes(tiny_vae: str, images: torch.Tensor) -> None:
    codec = build_codec(CodecConfig(kind="autoencoder_kl", path=tiny_vae))

    assert (codec.channels, codec.downsample) == (4, 2)
    assert codec.scale == pytest.approx(0.18215) and codec.shift == 0.0  # diffusers' config defaults
    assert codec.id.startswith(f"autoencoder_kl:{Path(tiny_vae).name}@")
    latents = codec.encode(images)
    assert latents.shape == (2, 4, 16, 16) and not latents.is_inference()
    decoded = codec.decode(latents)
    assert decoded.shape == images.shape and torch.isfinite(decoded).all()
    assert decoded.min() >= -1 and decoded.max() <= 1
    assert torch.equal(codec.encode(images), latents)  # posterior mean: deterministic


def test_autoencoder_kl_applies_scale_and_shift(tiny_vae: str, images: torch.Tensor) -> None:
    def codec(scale: float, shift: float) -> ImageCodec:
        return build_codec(CodecConfig(kind="autoencoder_kl", path=tiny_vae, scale=scale, shift=shift))

    raw, scaled, shifted = codec(1.0, 0.0), codec(2.0, 0.0), codec(2.0, 0.3)
    z = raw.encode(images)
    assert torch.allclose(scaled.encode(images), 2 * z, atol=1e-6)
    assert torch.allclose(shifted.encode(images), (z - 0.3) * 2, atol=1e-6)
    # decode undoes exactly the normalisation encode applied.
    assert torch.allclose(shifted.decode(shifted.encode(images)), raw.decode(z), atol=1e-5)


def test_autoencoder_kl_sampling_draws_from_the_posterior(tiny_vae: str, images: torch.Tensor) -> None:
    codec = build_codec(CodecConfig(kind="autoencoder_kl", path=tiny_vae, sample=True))
    assert not torch.allclose(codec.encode(images), codec.encode(images))


def test_codec_id_follows_the_weights(tiny_vae: str, tmp_path: Path) -> None:
    other = save_tiny_vae(tmp_path / Path(tiny_vae).name, seed=1)  # same name and config, new weights
    a = build_codec(CodecConfig(kind="autoencoder_kl", path=tiny_vae))
    b = build_codec(CodecConfig(kind="autoencoder_kl", path=other))
    assert a.id != b.id


def test_autoencoder_kl_from_s3_matches_local(
    tiny_vae: str, images: torch.Tensor, s3: S3Bucket, tmp_path: Path
) -> None:
    client, bucket = s3
    upload_dir(client, bucket, tiny_vae, "vaes/tiny")
    remote = build_codec(CodecConfig(kind="autoencoder_kl", path=f"s3://{bucket}/vaes/tiny"))
    local = build_codec(CodecConfig(kind="autoencoder_kl", path=tiny_vae))
    assert torch.allclose(remote.encode(images), local.encode(images), atol=1e-6)
    assert (tmp_path / "model-cache" / bucket / "vaes" / "tiny" / "config.json").is_file()
    # An explicit cache_dir is the root under which <bucket>/<prefix> is mirrored.
    explicit = resolve_model_dir(f"s3://{bucket}/vaes/tiny/", cache_dir=tmp_path / "explicit")
    assert explicit == str((tmp_path / "explicit" / bucket / "vaes" / "tiny").resolve())
    assert sorted(p.name for p in Path(explicit).iterdir()) == sorted(
        p.name for p in Path(tiny_vae).iterdir()
    )


def test_pixel_codec_round_trip_is_exact(images: torch.Tensor) -> None:
    codec = build_codec(CodecConfig())
    assert isinstance(codec, PixelCodec) and (codec.id, codec.channels, codec.downsample) == ("pixels", 3, 1)
    assert torch.equal(codec.decode(codec.encode(images)), images)
    assert codec.decode(torch.full((1, 3, 2, 2), 3.0)).max() == 1.0
    with pytest.raises(ValueError, match=r"shape \(B, 3, H, W\)"):
        codec.encode(torch.zeros(3, 8, 8))


def test_codec_config_errors(tiny_vae: str) -> None:
    with pytest.raises(ValueError, match="valid kinds: pixels, autoencoder_kl"):
        build_codec(CodecConfig(kind="vqgan"))
    with pytest.raises(ValueError, match="needs `path`"):
        build_codec(CodecConfig(kind="autoencoder_kl"))
    codec = build_codec(CodecConfig(kind="autoencoder_kl", path=tiny_vae))
    with pytest.raises(ValueError, match="not divisible by the codec's downsample factor 2"):
        codec.encode(torch.zeros(1, 3, 15, 16))


def test_uint8_images_round_trip_exactly() -> None:
    pixels = np.arange(256 * 3, dtype=np.int64).reshape(16, 16, 3) % 256
    batch = [pixels.astype(np.uint8), np.flip(pixels, 0).astype(np.uint8)]
    tensor = images_to_tensor(batch)

    assert tensor.shape == (2, 3, 16, 16) and tensor.dtype == torch.float32
    assert tensor.min() == -1.0 and tensor.max() == 1.0
    back = tensor_to_images(tensor)
    assert back.dtype == np.uint8 and np.array_equal(back, np.stack(batch))
    assert np.array_equal(tensor_to_images(images_to_tensor(back)), back)  # (B, H, W, 3) array input
    with pytest.raises(ValueError, match="uint8"):
        images_to_tensor([pixels.astype(np.float32)])


def test_pixel_codec_with_downsample_pools_and_scales_back() -> None:
    from selfe.data.shapes import generate_one
    from selfe.data.shapes_spec import ShapesConfig
    from selfe.encoders.image import images_to_tensor, tensor_to_images
    from selfe.eval.geneval_lite import score

    codec = PixelCodec(downsample=2)
    assert codec.id == "pixels/2" and codec.downsample == 2 and PixelCodec().id == "pixels"
    image, _, spec = generate_one(3, 0, ShapesConfig(resolution=32))
    x = images_to_tensor([image])
    latent = codec.encode(x)
    assert latent.shape == (1, 3, 16, 16)
    assert torch.allclose(latent[0, :, 0, 0], x[0, :, :2, :2].mean(dim=(1, 2)))  # a 2x2 average
    back = codec.decode(latent)
    assert back.shape == x.shape and back.abs().max() <= 1
    assert score(tensor_to_images(back)[0], spec)[0]  # the round trip keeps what the scorer needs
    with pytest.raises(ValueError, match="pixel_downsample must be >= 1"):
        PixelCodec(downsample=0)
