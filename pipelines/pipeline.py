"""The DALI graphs: one @pipeline_def for training, one for evaluation (val and test).

Both read through a ClipSource (pipelines/source.py) and decode on the GPU ("mixed": nvJPEG /
NVDEC) or the CPU, then make O views per video, each one fused crop+resize (one resampling),
per-clip mirror, and CLIP normalization. Train adds per-clip RandAugment and grayscale (both before the crop).

Decode modes: "frame" decodes each JPEG as its own sample (biggest decoder batches; every op
whose parameters come from the source stays per clip because the source repeats them for
every frame: crops, flips, grayscale and the RandAugment draws); "video" decodes the needed
frames of a VP9 WebM into one FHWC sample per clip. With the source's `crop_decode` (frame mode, no
RandAugment) the decoder decodes only the window of the frame the views' resampling reads
(libjpeg-turbo skips the rest's IDCT and colour conversion).
"""

from nvidia.dali import fn, pipeline_def, types

from pipelines import augment
from pipelines.source import (ENCODED, FRAME_INDICES, FRAME_SIZE, WINDOW_ANCHOR, WINDOW_SHAPE, ClipSource, ViewParams,
                              view_output)


def read_clips(source: ClipSource, decode_device: str, parallel: int, decoder_options: dict):
    """Encoded inputs -> decoded uint8 frames (HWC per frame, or FHWC per clip), their (H, W) size (None
    without RandAugment) and, per view, its ViewParams (gray and draws None where the source gives none)."""
    nodes = fn.external_source(source=source, num_outputs=source.num_outputs, batch=True, batch_info=True,
                               **({"parallel": True, "prefetch_queue_depth": parallel + 1} if parallel else {}))
    outputs = dict(zip(source.output_names, nodes))  # by name: the source decides the order
    # EXIF orientation is not applied, as the official loader's PIL does not, and the shard index holds the
    # stored (unrotated) sizes that crop windows refer to.
    jpeg_options = dict(device=decode_device, output_type=types.RGB, adjust_orientation=False, **decoder_options)
    if source.crop_decode:  # only the window the views read; their ROIs come relative to it
        images = fn.decoders.image_slice(outputs[ENCODED], outputs[WINDOW_ANCHOR], outputs[WINDOW_SHAPE],
                                         axis_names="WH", normalized_anchor=False, normalized_shape=False,
                                         **jpeg_options)
    elif source.mode == "frame":
        images = fn.decoders.image(outputs[ENCODED], **jpeg_options)
    else:
        images = fn.decoders.video(outputs[ENCODED], frames=outputs[FRAME_INDICES],
                                   device=decode_device)  # (F, H, W, C) per clip
    views = [ViewParams(**{field: outputs[view_output(field, view)] for field in source.view_fields})
             for view in range(source.num_views)]
    return images, outputs.get(FRAME_SIZE), views


def _output(images, mirror, dtype, mode: str):
    return augment.normalize(images, mirror, dtype, "CHW" if mode == "frame" else "FCHW")


@pipeline_def(enable_conditionals=True)
def train_pipeline(source: ClipSource, *, image_size: int, decode_device: str, dtype,
                   randaugment_levels: int = 0, parallel: int = 0, decoder_options: dict | None = None):
    """O = num_sample training views per video: [RandAugment], [grayscale], RRC (fused), mirror, normalize.

    RandAugment works on the stored frames, before the crop, as the official code runs it on the
    frames before scaling: its translations are a share of the whole frame and its rotations and
    shears fill corners that the crop may leave out.
    """
    images, frame_size, views = read_clips(source, decode_device, parallel, decoder_options or {})
    outputs = []
    for params in views:
        view = images
        if source.randaugment:
            view = augment.rand_augment(view, params.draws, randaugment_levels, frame_size)
        if source.grayscale:  # before the resize: one channel to resample for gray clips
            view = augment.to_luma(view, params.gray)
        view = augment.crop_resize(view, params.roi_start, params.roi_end, image_size, augment.INTERP["train"])
        if source.grayscale:
            view = augment.luma_to_rgb(view, params.gray)
        outputs.append(_output(view, params.mirror, dtype, source.mode))
    return tuple(outputs)


@pipeline_def
def eval_pipeline(source: ClipSource, *, image_size: int, decode_device: str, dtype, parallel: int = 0,
                  decoder_options: dict | None = None):
    """O = test_crops views per video (1 for val): fixed crops of the scaled frame (fused), mirror, normalize."""
    images, _, views = read_clips(source, decode_device, parallel, decoder_options or {})
    return tuple(_output(augment.crop_resize(images, params.roi_start, params.roi_end, image_size,
                                             augment.INTERP["eval"]), params.mirror, dtype, source.mode)
                 for params in views)
