"""Where data lives: local paths and ``s3://`` buckets behind one interface.

Readers and writers take a :class:`Location` from :func:`open_location` and never ask which kind it
is; this package is the one place that knows. MDS shard sets get their own access object
(:func:`open_mds`), because a bucket is read through mosaicml-streaming's remote + local cache.
"""

from scd_train.storage.cache import CacheSettings, parse_size
from scd_train.storage.errors import (
    AccessDenied,
    BadCacheDir,
    MissingBucket,
    MissingObject,
    NoCredentials,
    StorageError,
    StorageFailure,
    Unreachable,
)
from scd_train.storage.location import Location, endpoint_description, is_remote, open_location
from scd_train.storage.mds import MdsShards, open_mds
from scd_train.storage.retry import RetryPolicy

__all__ = [
    "AccessDenied", "BadCacheDir", "CacheSettings", "Location", "MdsShards", "MissingBucket", "MissingObject",
    "NoCredentials", "RetryPolicy", "StorageError", "StorageFailure", "Unreachable", "endpoint_description",
    "is_remote", "open_location", "open_mds", "parse_size",
]
