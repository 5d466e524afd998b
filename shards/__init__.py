"""The shard format: naming and schema (format), crash-safe writes (atomic), manifest and index
reading (manifest), input lists (sources), per-sample encoding (encode), crash-tolerant worker
processes (workers), shard writing (writer), whole-split packing (build), and synthetic datasets
(synthetic). See docs/shard_format.md."""

from shards.manifest import (IndexEntry, Manifest, Rejection, ShardFormatError, ShardRecord, read_frames,
                             read_index, read_manifest, read_member_bytes, read_video)

__all__ = ["IndexEntry", "Manifest", "Rejection", "ShardFormatError", "ShardRecord", "read_frames", "read_index",
           "read_manifest", "read_member_bytes", "read_video"]
