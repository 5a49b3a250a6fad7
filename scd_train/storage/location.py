"""One way to address data wherever it lives: a local path or an ``s3://bucket/prefix`` URL.

A :class:`Location` names a file or a directory. Local ones are read and written with the
standard library; ``s3://`` ones through s3fs, against any S3-compatible store (AWS, MinIO, R2,
Ceph, GCS's interoperability endpoint...). The endpoint and the credentials come only from the
standard AWS settings: ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``), ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` with ``~/.aws/config`` and
``~/.aws/credentials``, or an instance role; never from a config file of ours.

Writes are atomic on both: a local file is written under a temporary name and renamed; an object
is one PUT (or a multipart upload, which S3 shows only once complete), so a reader never sees half
of one. Network operations are retried by :class:`RetryPolicy`; every failure is turned into a
:class:`StorageError` whose message names the URL, the endpoint and what to change.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TypeVar

from scd_train.storage.errors import (
    AccessDenied,
    MissingBucket,
    MissingObject,
    NoCredentials,
    StorageError,
    StorageFailure,
    Unreachable,
)
from scd_train.storage.retry import RetryPolicy, brief, error_code, is_transient

T = TypeVar("T")
SCHEME = "s3://"
TMP_MARK = ".tmp-"
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60


def is_remote(path: str | os.PathLike | None) -> bool:
    return path is not None and str(path).startswith(SCHEME)


def check_url(text: str) -> None:
    """Refuse URLs we cannot address, naming what is accepted."""
    if "://" in text and not text.startswith(SCHEME):
        raise ValueError(f"{text!r}: only local paths and s3:// URLs are supported (any S3-compatible store; "
                         "point AWS_ENDPOINT_URL at it)")
    if text.startswith(SCHEME) and not text[len(SCHEME):].split("/", 1)[0]:
        raise ValueError(f"{text!r}: an s3:// URL needs a bucket, e.g. s3://my-bucket/latents/train")


def endpoint_description() -> str:
    """Which endpoint s3:// URLs go to, and where that came from, for error messages."""
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "S3_ENDPOINT_URL"):
        if os.environ.get(var):
            return f"{os.environ[var]} ({var})"
    try:
        import botocore.session

        configured = botocore.session.Session().get_scoped_config().get("endpoint_url")
    except Exception:  # a broken profile is reported by the request itself
        configured = None
    if configured:
        return f"{configured} (endpoint_url of AWS profile {os.environ.get('AWS_PROFILE', 'default')!r})"
    return "AWS's default S3 endpoint (AWS_ENDPOINT_URL is not set)"


_FILESYSTEMS: dict[tuple, object] = {}
_CREDENTIALS_CHECKED: set[tuple] = set()
_SETTINGS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "S3_ENDPOINT_URL", "AWS_PROFILE", "AWS_ACCESS_KEY_ID",
             "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_DEFAULT_REGION", "AWS_REGION")


def _client_key() -> tuple:
    """Clients are per process (sessions do not survive a fork) and per AWS setting in force."""
    return (os.getpid(), *(os.environ.get(k) for k in _SETTINGS))


def _s3fs():
    """This process's S3 file system for the AWS settings in force."""
    key = _client_key()
    fs = _FILESYSTEMS.get(key)
    if fs is None:
        import s3fs

        client_kwargs = {}
        if os.environ.get("S3_ENDPOINT_URL") and not (os.environ.get("AWS_ENDPOINT_URL")
                                                       or os.environ.get("AWS_ENDPOINT_URL_S3")):
            client_kwargs["endpoint_url"] = os.environ["S3_ENDPOINT_URL"]  # streaming's own variable
        # one attempt per call in botocore and s3fs: RetryPolicy retries, and logs it
        config = {"retries": {"max_attempts": 1, "mode": "standard"}, "connect_timeout": CONNECT_TIMEOUT_S,
                  "read_timeout": READ_TIMEOUT_S}
        # no listings cache: objects appear and disappear under a running job (other writers, deletes)
        fs = s3fs.S3FileSystem(config_kwargs=config, client_kwargs=client_kwargs, skip_instance_cache=True,
                               use_listings_cache=False)
        fs.retries = 1  # s3fs's own retry loop (a class attribute), unlogged
        _FILESYSTEMS[key] = fs
    return fs


def check_credentials(url: str) -> None:
    """Fail early, and clearly, when no credentials can be found for an s3:// URL."""
    key = _client_key()
    if key in _CREDENTIALS_CHECKED:
        return
    import botocore.session

    try:
        credentials = botocore.session.Session().get_credentials()
    except Exception as exc:  # e.g. AWS_PROFILE names a profile that does not exist
        raise NoCredentials(f"cannot load AWS credentials for {url}: {brief(exc)}; fix AWS_PROFILE or "
                            "~/.aws/config") from None
    if credentials is None:
        raise NoCredentials(f"no AWS credentials found for {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                            "(and AWS_SESSION_TOKEN for temporary ones), or AWS_PROFILE naming a profile in "
                            "~/.aws/credentials, or run where an instance role provides them")
    _CREDENTIALS_CHECKED.add(key)


def translate(exc: BaseException, url: str, action: str) -> StorageError:
    """A StorageError for ``exc``, raised while doing ``action`` on ``url``."""
    if isinstance(exc, StorageError):
        return exc
    remote = is_remote(url)
    code = error_code(exc)
    attempts = getattr(exc, "storage_attempts", 1)
    names = set()
    cause: BaseException | None = exc
    while cause is not None and len(names) < 10:
        names.add(type(cause).__name__)
        cause = cause.__cause__ or cause.__context__
    if remote and (code == "NoSuchBucket" or "bucket does not exist" in str(exc).lower()):
        bucket = url[len(SCHEME):].split("/", 1)[0]
        return MissingBucket(f"{url}: bucket {bucket!r} does not exist at {endpoint_description()}; create it, or "
                             "fix the URL or AWS_ENDPOINT_URL")
    if code in ("NoSuchKey", "404", "NotFound") or isinstance(exc, FileNotFoundError):
        return MissingObject(f"{url} does not exist")
    if "NoCredentialsError" in names:
        return NoCredentials(f"no AWS credentials found for {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                             "or AWS_PROFILE")
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "ExpiredToken",
                "InvalidToken", "AllAccessDisabled") or isinstance(exc, PermissionError):
        if remote:
            return AccessDenied(f"{action} {url}: the object store at {endpoint_description()} refused access "
                                f"({code or brief(exc)}); check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or "
                                "AWS_PROFILE, and the bucket's policy")
        return AccessDenied(f"{action} {url}: permission denied ({brief(exc)})")
    if is_transient(exc):
        where = f"the object store at {endpoint_description()}" if remote else "the file system"
        return Unreachable(f"{action} {url} failed after {attempts} attempt(s): {brief(exc)}; {where} could not "
                           "be reached or kept failing; check AWS_ENDPOINT_URL and the network" if remote else
                           f"{action} {url} failed after {attempts} attempt(s): {brief(exc)}")
    return StorageFailure(f"{action} {url} failed: {brief(exc)}")


class Location:
    """A file or directory: a local path, or an object key / key prefix under ``s3://bucket/``."""

    def __init__(self, url: str | os.PathLike, retry: RetryPolicy | None = None) -> None:
        text = os.fspath(url)
        check_url(text)
        self.is_remote = text.startswith(SCHEME)
        self.url = text.rstrip("/") if self.is_remote else str(Path(text))
        self.retry = retry or RetryPolicy()

    # -- naming ----------------------------------------------------------------------------------
    def __truediv__(self, rel: str) -> Location:
        rel = str(rel).strip("/")
        return Location(f"{self.url}/{rel}" if self.is_remote else Path(self.url) / rel, self.retry)

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"Location({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def parent(self) -> Location:
        if self.is_remote:
            return Location(self.url.rsplit("/", 1)[0], self.retry)
        return Location(Path(self.url).parent, self.retry)

    @property
    def bucket(self) -> str | None:
        return self.url[len(SCHEME):].split("/", 1)[0] if self.is_remote else None

    def local_path(self) -> Path:
        """The path of a local location (for code that needs a real file, such as MDS readers)."""
        if self.is_remote:
            raise TypeError(f"{self.url} is not a local path")
        return Path(self.url)

    def relative_to(self, root: Location) -> str:
        prefix = root.url.rstrip("/") + "/"
        if not self.url.startswith(prefix):
            raise ValueError(f"{self.url} is not under {root.url}")
        return self.url[len(prefix):]

    # -- the one door every operation goes through ---------------------------------------------------
    def _key(self) -> str:
        return self.url[len(SCHEME):]

    def _run(self, action: str, fn: Callable[[], T]) -> T:
        if not self.is_remote:
            try:
                return fn()
            except OSError as exc:
                raise translate(exc, self.url, action) from None
        check_credentials(self.url)
        try:
            return self.retry.call(fn, what=f"{action} {self.url}")
        except Exception as exc:
            raise translate(exc, self.url, action) from None

    # -- reading -------------------------------------------------------------------------------------
    def _kind(self) -> str | None:
        """"file", "directory" or None (absent). Unlike fsspec's exists(), a refused request or an
        unreachable endpoint is an error here, not a silent False."""
        def probe() -> str | None:
            try:
                return _s3fs().info(self._key())["type"]
            except FileNotFoundError as exc:
                if "bucket does not exist" in str(exc).lower():
                    raise
                return None

        return self._run("check", probe)

    def exists(self) -> bool:
        if not self.is_remote:
            return Path(self.url).exists()
        return self._kind() is not None

    def is_file(self) -> bool:
        if not self.is_remote:
            return Path(self.url).is_file()
        return self._kind() == "file"

    def size(self) -> int:
        if not self.is_remote:
            return self._run("stat", lambda: Path(self.url).stat().st_size)
        return int(self._run("stat", lambda: _s3fs().info(self._key())["size"]))

    def file_sizes(self, names: list[str] | None = None) -> dict[str, int]:
        """Sizes of files under this directory (relative name -> bytes): of ``names`` (absent ones are
        left out) or of everything; a bucket answers with one listing either way."""
        if not self.is_remote:
            root = Path(self.url)
            if names is not None:
                return {n: (root / n).stat().st_size for n in names if (root / n).is_file()}
            return {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()}

        def listing() -> dict[str, int]:
            found = _s3fs().find(self._key(), detail=True)
            start = len(self._key()) + 1
            return {k[start:]: int(v["size"]) for k, v in found.items() if v.get("type") != "directory"}

        sizes = self._run("list", listing)
        return sizes if names is None else {n: sizes[n] for n in names if n in sizes}

    def read_bytes(self) -> bytes:
        if not self.is_remote:
            return self._run("read", Path(self.url).read_bytes)
        return self._run("read", lambda: _s3fs().cat_file(self._key()))

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def read_range(self, start: int, end: int) -> bytes:
        """Bytes [start, end) of a file; one ranged GET on a bucket."""
        if not self.is_remote:
            def read() -> bytes:
                with open(self.url, "rb") as f:
                    f.seek(start)
                    return f.read(end - start)
            return self._run("read", read)
        return self._run("read", lambda: _s3fs().cat_file(self._key(), start=start, end=end))

    @contextlib.contextmanager
    def open_read(self, block_size: int = 8 << 20) -> Iterator[IO[bytes]]:
        """A seekable binary file; on a bucket, read ahead in blocks of ``block_size`` bytes."""
        if not self.is_remote:
            f = self._run("open", lambda: open(self.url, "rb"))
        else:
            f = self._run("open", lambda: _s3fs().open(self._key(), "rb", block_size=block_size,
                                                       cache_type="readahead"))
        try:
            yield f
        finally:
            f.close()

    def sha256(self, chunk: int = 8 << 20) -> str:
        def digest() -> str:
            h = hashlib.sha256()
            with self.open_read(chunk) as f:
                while block := f.read(chunk):
                    h.update(block)
            return h.hexdigest()

        if not self.is_remote:
            return digest()
        return self._run("read", digest)

    def download_to(self, target: Path) -> Path:
        """Copy this file to a local path, atomically (temporary name, then rename)."""
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}{TMP_MARK}{os.getpid()}")
        try:
            if self.is_remote:
                self._run("download", lambda: _s3fs().get_file(self._key(), str(tmp)))
            else:
                self._run("copy", lambda: shutil.copyfile(self.url, tmp))
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return target

    # -- writing -------------------------------------------------------------------------------------
    def write_bytes(self, data: bytes) -> None:
        if self.is_remote:
            self._run("write", lambda: _s3fs().pipe_file(self._key(), data))
            return

        def write() -> None:
            path = Path(self.url)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)

        self._run("write", write)

    def write_json(self, obj: object) -> None:
        self.write_bytes(json.dumps(obj, indent=1).encode())

    def upload_from(self, source: Path) -> None:
        """Publish a finished local file here; a bucket shows the object only once it is complete."""
        if self.is_remote:
            self._run("upload", lambda: _s3fs().put_file(str(source), self._key()))
            return
        if Path(self.url) != Path(source):
            self.write_bytes(Path(source).read_bytes())

    def remove(self) -> None:
        """Delete this file, or this directory / prefix with everything under it; absent is fine."""
        if not self.is_remote:
            path = Path(self.url)
            if path.is_dir():
                self._run("delete", lambda: shutil.rmtree(path))
            elif path.exists():
                self._run("delete", path.unlink)
            return

        def delete() -> None:
            fs = _s3fs()
            keys = list(fs.find(self._key()))
            if keys:
                fs.rm(keys)

        self._run("delete", delete)

    def abort_incomplete_uploads(self) -> int:
        """Abort multipart uploads under this prefix that a killed writer left (invisible, but billed)."""
        if not self.is_remote:
            return 0

        def abort() -> int:
            fs = _s3fs()
            bucket, _, prefix = self._key().partition("/")
            uploads = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix).get("Uploads", [])
            for up in uploads:
                fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
            return len(uploads)

        return self._run("clean up uploads under", abort)


def open_location(path: str | os.PathLike | Location, retry: RetryPolicy | None = None) -> Location:
    if isinstance(path, Location):
        return path if retry is None else Location(path.url, retry)
    return Location(path, retry)
