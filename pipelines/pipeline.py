"""The DALI graphs: one @pipeline_def for training, one for evaluation (val and test).

Both read through a ClipSource (pipelines/source.py) and decode on the GPU ("mixed": nvJPEG /
NVDEC) or the CPU, then make O views per video, each one fused crop+resize (one resampling),
per-clip mirror, and CLIP normalization. Train adds per-clip grayscale and RandAugment.

Decode modes: "frame" decodes each JPEG as its own sample (biggest decoder batches; any op
whose parameters come from the source stays per clip because the source repeats them for
every frame); "stack" decodes a clip's F JPEGs and stacks them into one FHWC sequence (needed
by RandAugment, which draws its operations per sample); "video" decodes the needed frames of
a VP9 WebM.
"""

from nvidia.dali import fn, pipeline_def, types

from pipelines import augment
from pipelines.source import ClipSource


def read_clips(source: ClipSource, decode_device: str, parallel: bool):
    """Encoded inputs -> decoded uint8 frames (HWC per frame, or FHWC per clip) and the view params."""
    outputs = fn.external_source(source=source, num_outputs=source.num_outputs, batch=True, batch_info=True,
                                 parallel=parallel)
    if source.mode == "frame":
        images = fn.decoders.image(outputs[0], device=decode_device, output_type=types.RGB)
        params = outputs[1:]
    elif source.mode == "stack":
        count = source.frames.shape[1]
        frames = [fn.decoders.image(jpeg, device=decode_device, output_type=types.RGB) for jpeg in outputs[:count]]
        images = fn.stack(*frames, axis=0, axis_name="F")  # (F, H, W, C)
        params = outputs[count:]
    else:
        images = fn.decoders.video(outputs[0], frames=outputs[1], device=decode_device)  # (F, H, W, C)
        params = outputs[2:]
    step = source.params_per_view
    return images, [tuple(params[i:i + step]) + (None,) * (4 - step) for i in range(0, len(params), step)]


def _output(images, mirror, dtype, mode: str):
    return augment.normalize(images, mirror, dtype, "CHW" if mode == "frame" else "FCHW")


@pipeline_def(enable_conditionals=True)
def train_pipeline(source: ClipSource, *, image_size: int, decode_device: str, dtype,
                   randaugment: tuple[int, int] | None, parallel: bool = False):
    """O = num_sample training views per video: RRC (fused), [grayscale], [RandAugment], mirror, normalize."""
    images, views = read_clips(source, decode_device, parallel)
    outputs = []
    for roi_start, roi_end, mirror, gray in views:
        view = augment.crop_resize(images, roi_start, roi_end, image_size, augment.INTERP["train"])
        if source.grayscale:
            view = augment.grayscale(view, gray)
        if randaugment is not None:
            view = augment.rand_augment(view, *randaugment, image_size)
        outputs.append(_output(view, mirror, dtype, source.mode))
    return tuple(outputs)


@pipeline_def
def eval_pipeline(source: ClipSource, *, image_size: int, decode_device: str, dtype, parallel: bool = False):
    """O = test_crops views per video (1 for val): fixed crops of the scaled frame (fused), mirror, normalize."""
    images, views = read_clips(source, decode_device, parallel)
    return tuple(_output(augment.crop_resize(images, start, end, image_size, augment.INTERP["eval"]),
                         mirror, dtype, source.mode)
                 for start, end, mirror, _ in views)
