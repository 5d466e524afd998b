"""Names and schema constants of the shard format (docs/shard_format.md), shared by writer and readers."""

import re

MANIFEST_FORMAT = "tdsclip-shards"
INDEX_FORMAT = "tdsclip-shard-index"
FORMAT_VERSION = 1

LAYOUTS = ("frames", "video")
SPLIT_PATTERN = re.compile(r"^[A-Za-z0-9_]+$")
KEY_CHARS = "A-Za-z0-9_-"  # a regex character class
KEY_PATTERN = re.compile(f"^[{KEY_CHARS}]+$")
# ustar keeps a member name in 100 bytes; `<key>.000000.jpg` adds 11 to the key.
MAX_KEY_LENGTH = 80

VIDEO_EXT = "webm"
FRAME_EXT = "jpg"
META_EXT = "json"
TEMP_SUFFIX = ".tmp"
TAR_SUFFIX = ".tar"
INDEX_SUFFIX = ".index.json"


def tar_name(split: str, shard: int) -> str:
    """`<split>-NNNNNN.tar`."""
    return f"{split}-{shard:06d}{TAR_SUFFIX}"


def index_name(split: str, shard: int) -> str:
    """`<split>-NNNNNN.index.json`, the byte-range index written beside the tar."""
    return f"{split}-{shard:06d}{INDEX_SUFFIX}"


def index_beside(tar: str) -> str:
    """The index written beside a tar: `<split>-NNNNNN.tar` -> `<split>-NNNNNN.index.json`."""
    if not tar.endswith(TAR_SUFFIX):
        raise ValueError(f"{tar}: a shard path must end with {TAR_SUFFIX}")
    return tar[: -len(TAR_SUFFIX)] + INDEX_SUFFIX


def manifest_name(split: str) -> str:
    """`<split>.manifest.json`."""
    return f"{split}.manifest.json"


def meta_member(key: str) -> str:
    """The per-sample metadata member, `<key>.json`."""
    return f"{key}.{META_EXT}"


def video_member(key: str) -> str:
    """Layout `video`: the whole re-encoded video, `<key>.webm`."""
    return f"{key}.{VIDEO_EXT}"


def frame_member(key: str, frame: int) -> str:
    """Layout `frames`: frame `frame` (0-based, = source frame `frame`), `<key>.NNNNNN.jpg`."""
    return f"{key}.{frame:06d}.{FRAME_EXT}"
