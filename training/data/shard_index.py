"""Random access to the samples of a WebDataset tar: each sample's members located from the tar
headers (:func:`index_tar`), and one sample's bytes read by range (:func:`read_sample`), not the
whole shard. The training reader addresses its stream by (shard, sample index) through this,
so a resumed run starts reading at its position instead of replaying what it consumed.

Samples are grouped as webdataset groups them (``base_plus_ext``: the key is the name up to its
first dot, suffixes lowercased, a new sample where the key changes or a suffix repeats;
``__*__`` meta members and non-files skipped), so a sample read here is the dict webdataset's
``tarfile_to_samples`` yields for it (``__key__``, ``__url__``, suffix -> bytes).

A local shard's headers are read with seeks (a few KiB per shard); a URL's tar is streamed once
(headers and data, nothing decoded). A sample whose members run past the end of the file (a
truncated tar) is left out of the index and reported to the handler; a tar with no readable
header indexes as empty (reported too).
"""
from __future__ import annotations

import os
import re
import tarfile
from dataclasses import dataclass
from typing import Callable

from preprocessing import storage

#: members webdataset skips (``__meta__`` files)
_META = re.compile(r"__[^/]*__($|/)")


@dataclass(frozen=True)
class SampleSpan:
    """One sample of a tar: its key and members as (suffix, data offset, size), in tar order."""

    key: str
    members: tuple[tuple[str, int, int], ...]

    @property
    def start(self) -> int:
        return min(offset for _, offset, _ in self.members)

    @property
    def end(self) -> int:
        return max(offset + size for _, offset, size in self.members)


class TruncatedSample(tarfile.ReadError):
    """A sample whose members run past the end of its tar."""


def _key_suffix(name: str) -> tuple[str | None, str | None]:
    from webdataset.tariterators import base_plus_ext
    return base_plus_ext(name)


def index_tar(url: str, handler: Callable[[BaseException], bool]) -> list[SampleSpan]:
    """The samples of a tar (path or URL) in order; read errors go to ``handler`` (what was
    indexed before the error is kept, less a sample cut short)."""
    spans: list[SampleSpan] = []
    key, members, suffixes = None, [], set()

    def close() -> None:
        if key is not None and members:
            spans.append(SampleSpan(key, tuple(members)))

    local, size = storage.local_path(url), None
    try:
        size = os.path.getsize(local) if local is not None else storage.size(url)
        stream = None if local is not None else storage.open_url(url)
        try:
            tar = tarfile.open(local, mode="r:") if local is not None else tarfile.open(fileobj=stream, mode="r|")
            with tar:
                for info in tar:
                    name = info.name
                    if not info.isreg() or _META.match(name) or ("/" not in name and name.startswith("__")
                                                                  and name.endswith("__")):
                        continue
                    prefix, suffix = _key_suffix(name)
                    if prefix is None:
                        continue
                    suffix = suffix.lower()
                    if prefix != key or suffix in suffixes:
                        close()
                        key, members, suffixes = prefix, [], set()
                    members.append((suffix, info.offset_data, info.size))
                    suffixes.add(suffix)
        finally:
            if stream is not None:
                stream.close()
    except Exception as exc:  # noqa: BLE001 - the handler decides (the reader counts and goes on)
        exc.args = exc.args + (url,)
        handler(exc)
    close()
    if size is not None and spans and spans[-1].end > size:
        handler(TruncatedSample(f"sample {spans[-1].key} runs past the end of {url} ({size} bytes)"))
        spans.pop()
    return spans


def read_sample(url: str, span: SampleSpan) -> dict:
    """The sample's members (one ranged read of the tar): ``__key__``, ``__url__`` and suffix -> bytes."""
    start, end = span.start, span.end
    data = storage.read_range(url, start, end)
    if len(data) < end - start:
        raise TruncatedSample(f"sample {span.key} of {url}: read {len(data)} of {end - start} bytes")
    raw = {"__key__": span.key, "__url__": url}
    for suffix, offset, size in span.members:
        raw[suffix] = data[offset - start:offset - start + size]
    return raw


__all__ = ["SampleSpan", "TruncatedSample", "index_tar", "read_sample"]
