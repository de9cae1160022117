"""Images in the engine: a prompt's images through the checkpoint's processor and the vision tower into
the encoder prefill give ``generate(..., pixel_values=...)``'s tokens, token for token (float32, the
reference sampler, batch 1), also when the prompt is prefilled in chunks and when it shares its passes
with other requests; and what the engine refuses before any work.

The tiny checkpoint (``TinySpec(vision=True)``) has a tiny vision tower, Gemma 4's image tokens, a
saved Gemma 4 image processor config (70 placeholder tokens an image at most) and image placeholders
attending to each other in both directions (``use_bidirectional_attention="vision"``), loaded through
the real loading path.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from engine import EngineCore, EngineSettings, InvalidRequestError, SamplingParams
from engine.loader import load_model
from engine.multimodal import ImageInputs, image_token_runs, process_images
from tests.engine_helpers import reference_model, reference_run
from tools.tiny_checkpoint import TinySpec, build_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("vision"), TinySpec(vision=True))


def make_core(checkpoint, **overrides) -> EngineCore:
    settings = EngineSettings(model=str(checkpoint), **overrides)
    core = EngineCore(load_model(settings), settings)
    assert core.loaded.dtype == torch.float32 and core.runner.sampler.name == "reference"
    return core


@pytest.fixture(scope="module")
def core(checkpoint):
    return make_core(checkpoint, max_num_seqs=4)


def noise_image(height: int, width: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def image_prompt(core, parts: list) -> tuple[dict, list[int], ImageInputs]:
    """One user message of text and images through the chat template and the processor: the processor's
    own outputs (generate's inputs), and the engine's token ids and image inputs."""
    content = [{"type": "text", "text": p} if isinstance(p, str) else {"type": "image"} for p in parts]
    images = [p for p in parts if not isinstance(p, str)]
    text = core.loaded.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                     add_generation_prompt=True)
    processed = core.loaded.processor(text=[text], images=[images], add_special_tokens=False, return_tensors="pt")
    ids, inputs = process_images(core.loaded.processor, text, images)
    assert ids == processed["input_ids"][0].tolist()
    return processed, ids, inputs


def generate_inputs(processed: dict) -> dict:
    return {k: processed[k] for k in ("pixel_values", "image_position_ids", "mm_token_type_ids")}


def engine_tokens(core, requests) -> dict:
    """{request id: tokens} for [(id, prompt ids, params, images)] submitted together."""
    for rid, ids, params, images in requests:
        core.add_request(rid, ids, core.resolve(ids, params, images=images), images=images)
    out = {rid: [] for rid, *_ in requests}
    while core.has_work():
        for o in core.step():
            out[o.request_id].extend(o.token_ids)
    return out


PARAMS = SamplingParams(max_tokens=40, seed=11, ignore_eos=True)


def test_image_prompt_equals_generate_with_pixel_values(core):
    processed, ids, images = image_prompt(core, ["What is in ", noise_image(30, 40, 0), "? Say it."])
    assert images.num_images == 1 and 20 <= ids.count(core.loaded.model.config.image_token_id) <= 70
    resolved = core.resolve(ids, PARAMS, images=images)
    expected, _ = reference_run(reference_model(core), ids, 11, resolved, **generate_inputs(processed))
    assert engine_tokens(core, [("img", ids, PARAMS, images)])["img"] == expected
    # the prompt's KV after the prefill (one encoder call) is generate's, bitwise
    core.add_request("kv", ids, resolved, images=images)
    core.step()
    keys, values = engine_prefill_kv(core, "kv", len(ids))
    expected_keys, expected_values = generate_prefill_kv(reference_model(core), processed)
    assert torch.equal(keys, expected_keys) and torch.equal(values, expected_values)
    core.drain()
    # what is being matched depends on the image's features and on the placeholders' bidirectional block
    without_image, _ = reference_run(reference_model(core), ids, 11, resolved)
    causal_only, _ = reference_run(reference_model(core), ids, 11, resolved, pixel_values=processed["pixel_values"],
                                   image_position_ids=processed["image_position_ids"])
    assert expected != without_image and expected != causal_only


def generate_prefill_kv(model, processed: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values [kv heads, prompt, head dim] of the last (full-attention) layer after
    generate's prefill (one canvas: the encoder runs once, over the prompt)."""
    cache = model.generate(processed["input_ids"], max_new_tokens=model.config.canvas_length,
                           **generate_inputs(processed)).past_key_values
    return cache.layers[-1].keys[0], cache.layers[-1].values[0]


def engine_prefill_kv(core, request_id: str, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same from the engine's KV slot buffers after the request's first pass (its prefill)."""
    kv = core.runner.kv
    slot = kv.get(request_id).slot
    return kv._keys[-1][slot, :, :length], kv._values[-1][slot, :, :length]


def test_two_images_prefilled_in_chunks_equal_generate(checkpoint):
    """A prompt longer than max_encoder_tokens is prefilled in chunks; no chunk cuts an image, so each
    image's bidirectional block is whole in one call, as in generate's one prefill. Chunks reduce in
    calls of other shapes, so the prompt's KV is generate's up to rounding (as for a text prompt); a
    cut image would move it by far more (a tenth and up), which the tokens alone may hide."""
    core = make_core(checkpoint, max_num_seqs=2, max_encoder_tokens=72)
    processed, ids, images = image_prompt(
        core, ["Compare ", noise_image(36, 36, 1), " with ", noise_image(20, 60, 2), " in one word."])
    runs = image_token_runs(ids, core.loaded.model.config.image_token_id)
    # 72-token chunks from the start would cut the first image
    assert images.num_images == 2 and len(ids) > 2 * 72 and runs[0][0] < 72 < runs[0][1]
    resolved = core.resolve(ids, PARAMS, images=images)
    core.add_request("two", ids, resolved, images=images)
    core.step()
    keys, values = engine_prefill_kv(core, "two", len(ids))
    expected_keys, expected_values = generate_prefill_kv(reference_model(core), processed)
    assert torch.allclose(keys, expected_keys, rtol=0, atol=1e-5)
    assert torch.allclose(values, expected_values, rtol=0, atol=1e-5)
    core.drain()
    expected, _ = reference_run(reference_model(core), ids, 11, resolved, **generate_inputs(processed))
    assert engine_tokens(core, [("two", ids, PARAMS, images)])["two"] == expected


def test_image_prompt_shares_passes_with_text_and_images_as_alone(core):
    """Batched with a text request and another image request (left-padded rows, one encoder group), an
    image request gets the tokens it gets alone."""
    _, ids, images = image_prompt(core, ["Describe ", noise_image(30, 40, 0)])
    _, other_ids, other_images = image_prompt(core, [noise_image(50, 25, 3), "and this?"])
    text_ids = core.loaded.tokenizer("a short text prompt")["input_ids"]
    alone = engine_tokens(core, [("img", ids, PARAMS, images)])["img"]
    together = engine_tokens(core, [
        ("text", text_ids, SamplingParams(max_tokens=24, seed=5), None),
        ("img", ids, PARAMS, images),
        ("other", other_ids, SamplingParams(max_tokens=16, seed=6), other_images),
    ])
    assert together["img"] == alone
    assert together["text"] == engine_tokens(core, [("text", text_ids, SamplingParams(max_tokens=24, seed=5), None)])["text"]
    assert core.num_live_states() == 0


def refusal(core, ids, images) -> str:
    with pytest.raises(InvalidRequestError) as info:
        core.resolve(ids, PARAMS, images=images)
    assert info.value.param == "messages"
    return info.value.message


def test_refused_before_any_work(checkpoint, core):
    _, ids, images = image_prompt(core, ["one ", noise_image(30, 40, 0), " two ", noise_image(30, 40, 1)])
    one_image = make_core(checkpoint, max_num_seqs=1, max_images_per_prompt=1)
    assert refusal(one_image, ids, images) == "the prompt has 2 images, more than this server takes in one prompt (1)"
    n = images.soft_tokens(3)[0]
    assert refusal(core, ids[:-3], ImageInputs(images.pixel_values[:1], images.image_position_ids[:1])) == (
        f"the prompt's image placeholders ([{n}, {n}] tokens per image) do not match its images ([{n}] tokens each)")
    assert refusal(core, ids, ImageInputs(images.pixel_values[..., :10], images.image_position_ids)) == (
        "pixel_values must be [images, patches, 48] floats and image_position_ids [images, patches, 2] integers, "
        "as the checkpoint's processor makes them")
    # an image's patches (the processor pads them to its budget, 70 x 3 x 3) must pool into one encoder call
    short_calls = make_core(checkpoint, max_num_seqs=1, max_encoder_tokens=32)
    assert refusal(short_calls, ids, images) == (
        "the images have 630 patches each, more than one encoder call's worth (288: max_encoder_tokens x "
        "pooling_kernel_size squared)")


def test_text_only_checkpoint_has_no_processor(tmp_path):
    core = make_core(build_tiny_checkpoint(tmp_path, TinySpec()), max_num_seqs=1)
    assert core.loaded.processor is None
