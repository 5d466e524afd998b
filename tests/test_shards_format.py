"""Shard format on its own: list and label parsing, keys, manifest and index validation, byte reads."""

import json
from pathlib import Path

import pytest

from shards import format as fmt
from shards.build import shuffled
from shards.manifest import ShardFormatError, read_index, read_manifest, read_member_bytes
from shards.sources import ListFormatError, Source, class_names, make_key, read_labels, read_list
from tools import make_shards



def test_read_list_raw_videos(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("# comment\nabseiling/a b.mp4 0\n\nx/y.webm 12\n")
    sources = read_list(path)
    assert [(s.path, s.label, s.num_frames) for s in sources] == [("abseiling/a b.mp4", 0, None),
                                                                  ("x/y.webm", 12, None)]
    assert [s.key for s in sources] == ["abseiling_a_b", "x_y"]


def test_read_list_frame_folders(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("20bn/1 47 3\n20bn/2.v 30 0\n")
    sources = read_list(path)
    assert [(s.path, s.num_frames, s.label) for s in sources] == [("20bn/1", 47, 3), ("20bn/2.v", 30, 0)]
    assert all(s.is_frame_folder for s in sources)
    assert sources[1].key == "20bn_2_v"  # a folder keeps its dotted name


@pytest.mark.parametrize("text, message", [("a.mp4\n", "train.txt:1"), ("a.mp4 x\n", "train.txt:1"),
                                           ("a.mp4 1\nb.mp4 -2\n", "train.txt:2: label -2"), ("\n", "empty")])
def test_read_list_errors_name_the_line(tmp_path, text, message):
    path = tmp_path / "train.txt"
    path.write_text(text)
    with pytest.raises(ListFormatError, match=message):
        read_list(path)


def test_keys_are_unique_and_valid():
    paths = ["a/b.mp4", "a_b.mp4", "a/b.webm", "x" * 200 + ".mp4", "ü/é.mp4"]
    used = set()
    keys = [make_key(p, used) for p in paths]
    assert keys[0] == "a_b" and len(set(keys)) == len(keys)
    assert all(fmt.KEY_PATTERN.match(k) and len(k) <= fmt.MAX_KEY_LENGTH for k in keys)
    again = set()
    assert [make_key(p, again) for p in paths] == keys  # deterministic


def test_read_labels_and_class_names(tmp_path):
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("id,name\n1,pulling, twisting\n0,abseiling\n")
    assert read_labels(csv_path) == ["abseiling", "pulling, twisting"]
    path = tmp_path / "l.txt"
    path.write_text("a.mp4 1\nb.mp4 2\n")
    sources = read_list(path)
    assert class_names(sources, None, str(path)) == ["0", "1", "2"]
    with pytest.raises(ListFormatError, match="label 2 of 'b.mp4'"):
        class_names(sources, read_labels(csv_path), str(path))
    csv_path.write_text("0,a\n2,c\n")
    with pytest.raises(ListFormatError, match=r"ids must run from 0 without gaps \(the highest is 2\); missing: 1$"):
        read_labels(csv_path)
    csv_path.write_text("\ufeff0,a\r\n1,b\r\n")  # Excel: byte-order mark, CRLF, no header
    assert read_labels(csv_path) == ["a", "b"]
    csv_path.write_text("0,a\n2000000000,c\n")  # no 2e9-long range built to say so
    with pytest.raises(ListFormatError, match=r"missing: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10 \.\.\.$"):
        read_labels(csv_path)
    csv_path.write_text("0,a\n-1,b\n")
    with pytest.raises(ListFormatError, match="labels.csv:2: id -1 is negative"):
        read_labels(csv_path)
    path.write_text("a.mp4 1\nb.mp4 999999\n")  # a mistyped label
    with pytest.raises(ListFormatError, match="2 distinct labels reach 999999"):
        class_names(read_list(path), None, str(path))


def test_a_byte_order_mark_is_not_part_of_the_first_path(tmp_path):
    path = tmp_path / "l.txt"
    path.write_text("\ufeffa.mp4 1\r\nb.mp4 0\r\n")  # as Windows Notepad saves it
    assert [s.path for s in read_list(path)] == ["a.mp4", "b.mp4"]


def test_a_malformed_line_in_a_frame_folder_list_is_named(tmp_path):
    path = tmp_path / "l.txt"
    path.write_text("f/001 40 0\nf/002 35 1\nf/003 2\nf/004 38 2\n")  # line 3 lacks its frame count
    with pytest.raises(ListFormatError, match=r"l.txt:3: expected .*got 'f/003 2'"):
        read_list(path)
    path.write_text("f/001 40 0\nf/002 x 1\nf/004 38 2\n")
    with pytest.raises(ListFormatError, match=r"l.txt:2: expected"):
        read_list(path)


def test_a_path_listed_twice_is_refused(tmp_path):
    path = tmp_path / "l.txt"
    path.write_text("a.mp4 1\nb.mp4 2\n\na.mp4 1\n")
    with pytest.raises(ListFormatError, match=r"l.txt:4: 'a.mp4' is listed twice \(first on line 1\)"):
        read_list(path)


def test_shuffle_mixes_classes_deterministically():
    sources = [Source(key=f"k{i}", path=f"{i}.mp4", label=i // 25) for i in range(100)]  # sorted by class
    order = shuffled(sources, seed=0)
    assert order == shuffled(sources, seed=0) and order != shuffled(sources, seed=1)
    assert len({s.label for s in order[:12]}) >= 3 and sorted(order, key=lambda s: s.key) == sorted(
        sources, key=lambda s: s.key)


def test_parse_size():
    parse_size = make_shards.parse_size
    assert parse_size("1GB") == 10**9 and parse_size("64MiB") == 64 << 20 and parse_size("1000") == 1000
    with pytest.raises(Exception, match="not a size"):
        parse_size("1 parsec")


def _write_shard(tmp_path: Path) -> None:
    (tmp_path / "val-000000.tar").write_bytes(b"\0" * 1024 + b"hello world")
    index = {"format": fmt.INDEX_FORMAT, "version": 1, "tar": "val-000000.tar", "samples": [
        {"key": "k", "label": 2, "num_frames": 2, "fps": 25.0, "width": 4, "height": 2, "layout": "frames",
         "frames": [[1024, 5], [1030, 5]]}]}
    (tmp_path / "val-000000.index.json").write_text(json.dumps(index))
    manifest = {"format": fmt.MANIFEST_FORMAT, "version": 1, "tool_version": "t", "split": "val",
                "layout": "frames", "encoding": {}, "classes": ["a", "b", "c"], "num_samples": 1,
                "shards": [{"tar": "val-000000.tar", "index": "val-000000.index.json", "num_samples": 1,
                            "bytes": 1035, "sha256": "0"}], "rejected": [{"source": "x.mp4", "reason": "missing"}]}
    (tmp_path / "val.manifest.json").write_text(json.dumps(manifest))


def test_read_manifest_index_and_bytes(tmp_path):
    _write_shard(tmp_path)
    manifest = read_manifest(tmp_path, "val")
    assert manifest.num_samples == 1 and manifest.classes == ["a", "b", "c"]
    assert manifest.tar_paths() == [tmp_path / "val-000000.tar"] and manifest.rejected[0].source == "x.mp4"
    (entry,) = read_index(manifest.index_paths()[0])
    assert entry.tar == (tmp_path / "val-000000.tar").resolve() and entry.label == 2
    assert [read_member_bytes(entry.tar, *r) for r in entry.frames] == [b"hello", b"world"]
    with pytest.raises(ShardFormatError, match="truncated"):
        read_member_bytes(entry.tar, 1030, 50)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(num_samples=3), "num_samples=3 but the shards hold 1"),
    (lambda m: m.update(layout="mp4"), "'layout' is 'mp4'"),
    (lambda m: m.update(version=2), "version 2"),
    (lambda m: m["shards"][0].pop("sha256"), r"shards\[0\]: missing key 'sha256'"),
    (lambda m: m["shards"][0].update(bytes=7), "1035 bytes, but"),
    (lambda m: m.update(format="other"), "not a tdsclip-shards file"),
])
def test_read_manifest_errors_name_file_and_key(tmp_path, edit, message):
    _write_shard(tmp_path)
    path = tmp_path / "val.manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ShardFormatError, match=message) as error:
        read_manifest(tmp_path, "val")
    assert "val.manifest.json" in str(error.value)


def test_read_manifest_missing_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="make_shards.py"):
        read_manifest(tmp_path, "train")


@pytest.mark.parametrize("edit, message", [
    (lambda e: e.update(frames=[[1024, 5]]), "1 frame ranges for num_frames=2"),
    (lambda e: e.update(frames=[[1024, 5], [-1, 5]]), r"frames\[1\]"),
    (lambda e: e.update(num_frames=0), "num_frames must be >= 1"),
    (lambda e: e.pop("label"), "missing key 'label'"),
    (lambda e: e.update(source_width=640), "missing key 'source_height'"),
    (lambda e: e.update(source_width=0, source_height=360), "source_width and source_height must be >= 1"),
])
def test_read_index_errors(tmp_path, edit, message):
    _write_shard(tmp_path)
    path = tmp_path / "val-000000.index.json"
    data = json.loads(path.read_text())
    edit(data["samples"][0])
    path.write_text(json.dumps(data))
    with pytest.raises(ShardFormatError, match=message):
        read_index(path)
