"""One way to read and write the project's files: plain paths, ``file://`` and object-store URLs
(``s3://bucket/key``; any other fsspec protocol whose package is installed, e.g. ``gs://`` with
gcsfs). Every job input and output goes through here, so no code calls ``Path.is_file`` on a URL.

``s3://`` is served by pyarrow's own S3 client (``pyarrow.fs.S3FileSystem``, wrapped for fsspec
as :class:`ArrowS3FileSystem` and registered as fsspec's ``s3`` protocol, so Lightning's
checkpoint IO and pandas use it too). s3fs is not used: no aiobotocore release supports the
botocore that the pinned boto3 needs (requirements/lock.txt).

Credentials and endpoint come from the environment only (or a mounted secret that sets it):
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (or the SDK's own chain: profile, instance
role), ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (else ``MLFLOW_S3_ENDPOINT_URL``) for an
S3-compatible server, ``AWS_DEFAULT_REGION``. Nothing here logs or returns them.

Object stores have no atomic rename: :func:`put_bytes` and :func:`open_url` (``"wb"``) write
the object under its final name (S3 makes it visible whole when the upload completes); callers
commit it afterwards by writing a marker or manifest that names it. On a local disk the same
calls write a temporary name and rename, as before.
"""
from __future__ import annotations

import os
import posixpath
import uuid
from typing import IO
from urllib.parse import urlparse

TMP_TAG = ".tmp-"
ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")


def is_url(location: str | os.PathLike) -> bool:
    """True for ``scheme://...`` other than ``file://`` (a remote store)."""
    text = os.fspath(location)
    return "://" in text and not text.startswith("file://")


def local_path(location: str | os.PathLike) -> str | None:
    """The local path of a plain path or ``file://`` URL; None for a remote URL."""
    text = os.fspath(location)
    if text.startswith("file://"):
        return urlparse(text).path
    return None if is_url(text) else text


def url_join(base: str | os.PathLike, *parts: str) -> str:
    """``base``/``parts`` with ``/`` separators (URLs) or the OS's (paths)."""
    text = os.fspath(base)
    if is_url(text) or text.startswith("file://"):
        return posixpath.join(text.rstrip("/"), *parts)
    return os.path.join(text, *parts)


def url_name(location: str | os.PathLike) -> str:
    """The last component of a path or URL."""
    return posixpath.basename(os.fspath(location).rstrip("/"))


# -- S3 through pyarrow, as an fsspec filesystem -------------------------------------------

def s3_endpoint() -> str | None:
    """The S3 endpoint named by the environment (None: AWS itself)."""
    return next((os.environ[v] for v in ENDPOINT_VARIABLES if os.environ.get(v)), None)


def _arrow_s3():
    import pyarrow.fs as pafs

    kwargs = {"region": os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1",
              "connect_timeout": 10, "request_timeout": 60}
    endpoint = s3_endpoint()
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme or "https")
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        kwargs.update(access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
                      session_token=os.environ.get("AWS_SESSION_TOKEN"))
    return pafs.S3FileSystem(**kwargs)


def _make_wrapper():
    from fsspec.implementations.arrow import ArrowFSWrapper

    class ArrowS3FileSystem(ArrowFSWrapper):
        """fsspec's ``s3`` protocol on pyarrow's S3 client, configured from the environment."""
        protocol = ("s3", "s3a")
        root_marker = ""
        cachable = False                      # the environment may change between calls (tests)

        def __init__(self, **kwargs):
            kwargs = {k: v for k, v in kwargs.items() if k not in ("anon", "client_kwargs", "key", "secret")}
            super().__init__(_arrow_s3(), **kwargs)

        @classmethod
        def _strip_protocol(cls, path):
            path = path if isinstance(path, str) else os.fspath(path)
            for prefix in ("s3://", "s3a://"):
                if path.startswith(prefix):
                    path = path[len(prefix):]
            return path.rstrip("/")

        def _parent(self, path):
            path = self._strip_protocol(path)
            return path.rsplit("/", 1)[0] if "/" in path else ""

        def open(self, path, mode="rb", **kwargs):
            # No deferred commit inside fsspec transactions (Lightning's _atomic_save): an
            # object appears whole when its upload completes, which is the commit S3 has.
            kwargs["autocommit"] = True
            return super().open(path, mode, **kwargs)

    return ArrowS3FileSystem


_S3_CLASS = None


def register_s3() -> None:
    """Make fsspec's ``s3://`` (Lightning, pandas, this module) use pyarrow's S3 client."""
    global _S3_CLASS
    if _S3_CLASS is None:
        import fsspec

        _S3_CLASS = _make_wrapper()
        fsspec.register_implementation("s3", _S3_CLASS, clobber=True)
        fsspec.register_implementation("s3a", _S3_CLASS, clobber=True)


def filesystem(location: str | os.PathLike):
    """``(fsspec filesystem, path inside it)`` for a path or URL."""
    import fsspec

    register_s3()
    text = os.fspath(location)
    local = local_path(text)
    if local is not None:
        return fsspec.filesystem("file"), os.path.abspath(local)
    fs, path = fsspec.core.url_to_fs(text)
    return fs, path


def arrow_filesystem(location: str | os.PathLike):
    """``(pyarrow filesystem, path)`` for parquet reads and writes."""
    import pyarrow.fs as pafs

    text = os.fspath(location)
    local = local_path(text)
    if local is not None:
        return pafs.LocalFileSystem(), os.path.abspath(local)
    if text.startswith(("s3://", "s3a://")):
        return _arrow_s3(), text.split("://", 1)[1]
    fs, path = filesystem(text)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


# -- the operations the jobs use ------------------------------------------------------------

def open_url(location: str | os.PathLike, mode: str = "rb") -> IO[bytes]:
    """A file object for reading (streamed) or writing (``"wb"``: the object appears whole at
    close on an object store; a local file is written in place — use :func:`put_bytes` or
    :func:`writer` for a commit-safe write)."""
    fs, path = filesystem(location)
    if "w" in mode and local_path(location) is not None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if mode == "rb" and is_url(location):
        return fs.open(path, mode, seekable=False)
    return fs.open(path, mode)


class writer:
    """``with writer(url) as fh:`` writes a file under its final name: a local file goes to
    ``.<name>.tmp-<id>`` and is renamed at the end (an error leaves nothing); an object-store
    upload becomes visible whole when it completes at close (a kill before that leaves no
    object). pyarrow's streams cannot abort an upload, so an *exception* inside the block still
    completes it: callers commit objects by a marker written afterwards, never by existence."""

    def __init__(self, location: str | os.PathLike):
        self.location = os.fspath(location)
        self.local = local_path(self.location)
        self.tmp = None

    def __enter__(self) -> IO[bytes]:
        if self.local is None:
            self.fh = open_url(self.location, "wb")
        else:
            target = os.path.abspath(self.local)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            self.tmp = os.path.join(os.path.dirname(target),
                                    f".{os.path.basename(target)}{TMP_TAG}{uuid.uuid4().hex[:8]}")
            self.fh = open(self.tmp, "wb")
        return self.fh

    def __exit__(self, kind, exc, tb) -> None:
        if self.tmp is None:
            self.fh.close()
            return
        try:
            if kind is None:
                self.fh.flush()
                os.fsync(self.fh.fileno())
        finally:
            self.fh.close()
        if kind is None:
            os.replace(self.tmp, os.path.abspath(self.local))
        else:
            os.unlink(self.tmp)


def put_bytes(location: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` whole under its final name (see :class:`writer`)."""
    with writer(location) as fh:
        fh.write(data)


def get_bytes(location: str | os.PathLike) -> bytes:
    with open_url(location) as fh:
        return fh.read()


def read_range(location: str | os.PathLike, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of a file: a seek on a disk, one ranged GET on an object store
    (fewer than ``end - start`` at the end of a short file)."""
    local = local_path(location)
    if local is not None:
        with open(local, "rb") as fh:
            fh.seek(start)
            return fh.read(end - start)
    fs, path = filesystem(location)
    return fs.cat_file(path, start=start, end=end)


def exists(location: str | os.PathLike) -> bool:
    fs, path = filesystem(location)
    return fs.exists(path)


def is_file(location: str | os.PathLike) -> bool:
    fs, path = filesystem(location)
    try:
        return fs.info(path)["type"] == "file"
    except FileNotFoundError:
        return False


def is_dir(location: str | os.PathLike) -> bool:
    """A folder (a prefix with objects under it, on an object store)."""
    fs, path = filesystem(location)
    try:
        return fs.info(path)["type"] == "directory"
    except FileNotFoundError:
        return False


def size(location: str | os.PathLike) -> int | None:
    fs, path = filesystem(location)
    try:
        return int(fs.info(path)["size"])
    except FileNotFoundError:
        return None


def listdir(location: str | os.PathLike) -> list[str]:
    """Names (not paths) of the entries right under a folder; [] when it does not exist."""
    fs, path = filesystem(location)
    try:
        return sorted(url_name(p) for p in fs.ls(path, detail=False) if url_name(p))
    except FileNotFoundError:
        return []


def walk_files(location: str | os.PathLike) -> list[str]:
    """Every file under a folder, recursively, as paths relative to it (``/`` separated)."""
    fs, path = filesystem(location)
    root = path.rstrip("/")
    found = fs.find(root)
    return sorted(p[len(root):].lstrip("/") for p in found)


def remove(location: str | os.PathLike) -> None:
    """Delete a file or object; nothing if it is gone already."""
    fs, path = filesystem(location)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


def makedirs(location: str | os.PathLike) -> None:
    """Create a local folder (object stores have none to create)."""
    local = local_path(location)
    if local is not None:
        os.makedirs(local, exist_ok=True)


def put_tree(local_dir: str | os.PathLike, location: str | os.PathLike) -> list[str]:
    """Upload every file under a local folder to ``location`` (each written whole); the
    relative names uploaded."""
    names = []
    for dirpath, _, files in os.walk(local_dir):
        for name in sorted(files):
            rel = os.path.relpath(os.path.join(dirpath, name), local_dir).replace(os.sep, "/")
            with open(os.path.join(dirpath, name), "rb") as fh:
                put_bytes(url_join(location, *rel.split("/")), fh.read())
            names.append(rel)
    return sorted(names)


class staged_folder:
    """``with staged_folder(location) as local:`` a local folder to write into: ``location``
    itself when it is local, else a temporary folder uploaded to it (:func:`put_tree`) when the
    block ends without an error."""

    def __init__(self, location: str | os.PathLike):
        self.location = os.fspath(location)
        self.tmp = None

    def __enter__(self) -> str:
        local = local_path(self.location)
        if local is not None:
            os.makedirs(local, exist_ok=True)
            return local
        import tempfile

        self.tmp = tempfile.TemporaryDirectory(prefix="expportrait-stage-")
        return self.tmp.name

    def __exit__(self, kind, exc, tb) -> None:
        if self.tmp is None:
            return
        try:
            if kind is None:
                put_tree(self.tmp.name, self.location)
        finally:
            self.tmp.cleanup()
