"""Images in prompts: the checkpoint's processor, the inputs a prompt's images become, and how the
encoder prefill takes them, as ``DiffusionGemmaEncoderModel`` does in ``generate(pixel_values=...)``.

The processor (``load_processor``) turns a rendered prompt and its images into token ids, in which
each image is a run of ``image_token_id`` placeholders, and ``ImageInputs`` (pixel patches and their
positions). The engine carries ``ImageInputs`` as CPU tensors from ``resolve`` to the runner, which:

- runs the vision tower once per request over all its images (``image_features``: what the encoder's
  ``get_image_features`` returns, so a request's features do not depend on who shares its pass);
- writes those features over the placeholders' token embeddings (``prompt_embeddings``);
- lets each run of placeholders attend to itself in both directions when the text config says
  ``use_bidirectional_attention == "vision"`` (``vision_blocks``; transformers'
  ``get_block_sequence_ids_for_mask`` and ``blockwise_overlay``), on top of the causal and sliding masks;
- never cuts an image's run across two prefill chunks (``chunk_bounds``), so the bidirectional block
  is whole in one encoder call, as in generate's single prefill.

The image tokens are prompt tokens: they count against the context length and the KV budget like text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InvalidRequestError

# the modality type of an image placeholder in transformers' mm_token_type_ids
IMAGE_TOKEN_TYPE = 1


@dataclass(frozen=True)
class ImageInputs:
    """A prompt's images as the processor made them (CPU tensors), the ``generate`` keyword arguments
    of the same names: ``pixel_values`` [images, patches, 3 * patch_size**2] and
    ``image_position_ids`` [images, patches, 2] ((x, y) of each patch; (-1, -1) marks padding)."""

    pixel_values: torch.Tensor
    image_position_ids: torch.Tensor

    @property
    def num_images(self) -> int:
        return int(self.pixel_values.shape[0])

    def soft_tokens(self, pooling_kernel_size: int) -> list[int]:
        """Placeholder tokens each image fills: its real patches (the vision tower's rule: padding is
        (-1, -1)) pooled ``pooling_kernel_size``² to one."""
        real = (~(self.image_position_ids == -1).all(dim=-1)).sum(dim=-1)
        return [int(n) // pooling_kernel_size**2 for n in real]


def image_token_runs(token_ids, image_token_id: int) -> list[tuple[int, int]]:
    """(start, end) of each run of consecutive image placeholders: one image each (the processor
    puts its begin- and end-of-image tokens around every image)."""
    runs = []
    start = None
    for i, t in enumerate(token_ids):
        if t == image_token_id and start is None:
            start = i
        elif t != image_token_id and start is not None:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, len(token_ids)))
    return runs


def check_images(images: ImageInputs, prompt_ids, config, *, max_images: int, max_encoder_tokens: int) -> None:
    """Refuse (``InvalidRequestError``, param ``messages``) image inputs this prompt and model cannot
    take, before any work is done: too many images, malformed tensors, images of more patches than
    pool into one encoder call, or placeholders that do not match the images."""
    if getattr(config, "vision_config", None) is None or getattr(config, "image_token_id", None) is None:
        raise InvalidRequestError("this model does not take images", "messages")
    pv, pos = images.pixel_values, images.image_position_ids
    if images.num_images > max_images:
        raise InvalidRequestError(
            f"the prompt has {images.num_images} images, more than this server takes in one prompt ({max_images})",
            "messages")
    vision = config.vision_config
    patch_pixels = 3 * vision.patch_size**2
    if (pv.dim() != 3 or not pv.is_floating_point() or pv.shape[-1] != patch_pixels or pos.dim() != 3
            or pos.shape != (*pv.shape[:2], 2) or pos.dtype not in (torch.int32, torch.int64)):
        raise InvalidRequestError(
            f"pixel_values must be [images, patches, {patch_pixels}] floats and image_position_ids "
            "[images, patches, 2] integers, as the checkpoint's processor makes them", "messages")
    # bounds the vision tower's work per image, and (pooled) its placeholders to one encoder call
    most_patches = max_encoder_tokens * vision.pooling_kernel_size**2
    if pv.shape[1] > most_patches:
        raise InvalidRequestError(
            f"the images have {pv.shape[1]} patches each, more than one encoder call's worth ({most_patches}: "
            "max_encoder_tokens x pooling_kernel_size squared)", "messages")
    runs = image_token_runs(prompt_ids, config.image_token_id)
    counts = images.soft_tokens(vision.pooling_kernel_size)
    if [end - start for start, end in runs] != counts:
        raise InvalidRequestError(
            f"the prompt's image placeholders ({[end - start for start, end in runs]} tokens per image) do not "
            f"match its images ({counts} tokens each)", "messages")


def chunk_bounds(token_ids, limit: int, image_token_id: int | None) -> list[tuple[int, int]]:
    """Prefill chunks of at most ``limit`` tokens; a chunk that would end inside an image's run ends
    before it instead (``check_images`` made every run at most ``limit`` long: at most an image's
    patches pooled)."""
    n = len(token_ids)
    runs = image_token_runs(token_ids, image_token_id) if image_token_id is not None else []
    bounds, start = [], 0
    while start < n:
        end = min(start + limit, n)
        for run_start, run_end in runs:
            if start < run_start < end < run_end:
                end = run_start
        bounds.append((start, end))
        start = end
    return bounds


def image_features(encoder, images: ImageInputs, device: torch.device) -> torch.Tensor:
    """[placeholders, hidden]: the vision tower and the projection into the text model's space over
    all of a request's images in one call, as the encoder's forward computes them in ``generate``."""
    out = encoder.get_image_features(images.pixel_values.to(device), images.image_position_ids.to(device),
                                     return_dict=True)
    return out.pooler_output


def prompt_embeddings(encoder, input_ids: torch.Tensor, features: list[torch.Tensor | None],
                      image_token_id: int) -> torch.Tensor:
    """[B, T, hidden]: the rows' token embeddings with each row's image features (in placeholder order)
    written over its placeholders, as the encoder's ``masked_scatter`` does for a batch of one."""
    embeds = encoder.get_input_embeddings()(input_ids)
    for b, f in enumerate(features):
        if f is not None:
            mask = (input_ids[b] == image_token_id).unsqueeze(-1)
            if int(mask.sum()) != f.shape[0]:  # the vision tower pooled another count than check_images expected
                raise ValueError(f"{f.shape[0]} image features for {int(mask.sum())} placeholders")
            embeds[b] = embeds[b].masked_scatter(mask, f.to(embeds.dtype))
    return embeds


def vision_blocks(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """[B, T]: the index of the image run each token is in (-1 for text and padding)."""
    is_image = input_ids == image_token_id
    previous = torch.zeros_like(is_image)
    previous[:, 1:] = is_image[:, :-1]
    starts = is_image & ~previous
    return torch.where(is_image, torch.cumsum(starts.int(), dim=1) - 1, -1)


def load_processor(path: str, tokenizer, config):
    """The checkpoint's image processor and tokenizer as a Gemma 4 processor (``ImageTextProcessor``),
    or None when the checkpoint takes no images (no vision config, or no processor saved with it)."""
    from transformers.utils import cached_file

    if getattr(config, "vision_config", None) is None or getattr(config, "image_token_id", None) is None:
        return None
    found = any(cached_file(path, name, _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)
                for name in ("processor_config.json", "preprocessor_config.json"))
    if not found:
        return None
    return _processor_class().from_pretrained(path, tokenizer=tokenizer)


def _processor_class():
    from transformers import Gemma4Processor
    from transformers.processing_utils import ProcessorMixin

    class ImageTextProcessor(Gemma4Processor):
        """Gemma 4's processor without its audio feature extractor and video processor (the video
        processor needs torchvision, which this server does not install; neither takes part in an
        image prompt): the image processor and the tokenizer, with Gemma 4's placeholder expansion
        and ``mm_token_type_ids``."""

        def __init__(self, image_processor, tokenizer, chat_template=None, image_seq_length: int = 280, **kwargs):
            self.image_seq_length = image_seq_length
            self.image_token_id = tokenizer.image_token_id
            self.image_token = tokenizer.image_token
            self.boi_token = tokenizer.boi_token
            self.eoi_token = tokenizer.eoi_token
            # Gemma4Processor.validate_inputs reads the audio tokens even without audio
            self.audio_token_id = getattr(tokenizer, "audio_token_id", None)
            self.audio_token = getattr(tokenizer, "audio_token", None)
            self.boa_token = getattr(tokenizer, "boa_token", None)
            self.eoa_token = getattr(tokenizer, "eoa_token", None)
            ProcessorMixin.__init__(self, image_processor=image_processor, tokenizer=tokenizer,
                                    chat_template=chat_template, **kwargs)

    return ImageTextProcessor


def process_images(processor, text: str, images: list) -> tuple[list[int], ImageInputs]:
    """A rendered prompt ``text`` whose image placeholders stand for ``images`` (PIL images, in order)
    through the processor: the expanded token ids and the images' inputs. ``ValueError`` when the
    text's placeholders do not match the images."""
    found = text.count(processor.image_token)
    if found != len(images):
        raise ValueError(f"the rendered prompt has {found} image tokens ({processor.image_token}) for {len(images)} "
                         "images (a text part may not hold the image token)")
    out = processor(text=[text], images=[images], add_special_tokens=False, return_tensors="pt")
    ids = out["input_ids"][0].tolist()
    return ids, ImageInputs(out["pixel_values"], out["image_position_ids"])
