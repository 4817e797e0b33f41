"""A content-addressed LRU cache of encoder results, bounded in bytes. Used from the event loop only."""

from __future__ import annotations

import collections

from ..api import ImageEncoding


def result_bytes(encoding: ImageEncoding) -> int:
    """Bytes held by one image's tensors."""
    return sum(t.numel() * t.element_size() for v in encoding.views for t in (v.embeddings, *v.layers.values()))


class ResultCache:
    """``key → one image's encoding``, the least recently used dropped first once over ``max_bytes``.

    The key is a digest of the image's bytes, the model and the compute options (``EncodeService.key``). An entry
    larger than the whole cache is not kept. ``max_bytes=0`` turns the cache off.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: collections.OrderedDict[str, tuple[ImageEncoding, int]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> ImageEncoding | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: str, encoding: ImageEncoding) -> None:
        size = result_bytes(encoding)
        if size > self.max_bytes or key in self._entries:
            return
        self._entries[key] = (encoding, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, dropped) = self._entries.popitem(last=False)
            self.bytes -= dropped
