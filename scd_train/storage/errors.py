"""What can go wrong between us and a storage location, each with a message that names the URL and
what to change. Every type takes one message argument, so it survives a DataLoader worker."""

from __future__ import annotations

from scd_train.errors import InputError, RunFailure


class StorageError(Exception):
    """Mixin of every storage failure; the concrete types are also an InputError or a RunFailure."""


class MissingBucket(StorageError, InputError):
    """The bucket in the URL does not exist at the endpoint in use."""


class MissingObject(StorageError, InputError):
    """An object (or local file) the manifest or the caller expects is not there."""


class AccessDenied(StorageError, InputError):
    """The object store refused the credentials, or the local file system refused access."""


class NoCredentials(StorageError, InputError):
    """No credentials were found for an object-store URL."""


class BadCacheDir(StorageError, InputError):
    """The local cache directory cannot be used (read-only, full, in use by another run)."""


class Unreachable(StorageError, RunFailure):
    """Transient failures (connection refused, timeouts, throttling, 5xx) outlasted the retries."""


class StorageFailure(StorageError, RunFailure):
    """Any other failure while talking to storage."""
