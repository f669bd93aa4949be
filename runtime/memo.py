"""Values derived from input objects, reused while the very same objects come back.

The denoising loop passes the same prompt embeddings, packed references and position ids at every step; engine
backends keep their device copies (and RoPE tables) here instead of uploading them again. Entries hold their
source objects, so an id cannot be reused by a new object while its entry lives. Callers must not mutate a
source in place between calls (the loop never does).
"""

from __future__ import annotations

from typing import Any, Callable


class IdentityMemo:
    """Per name, up to ``size`` entries of ``(sources, value)``, most recently used first."""

    def __init__(self, size: int = 4):
        self.size = int(size)
        self._entries: dict[str, list[tuple[tuple[Any, ...], Any]]] = {}
        self.hits = self.misses = 0

    def get(self, name: str, sources: tuple[Any, ...], make: Callable[[], Any]) -> Any:
        entries = self._entries.setdefault(name, [])
        for index, (held, value) in enumerate(entries):
            if len(held) == len(sources) and all(a is b for a, b in zip(held, sources)):
                entries.insert(0, entries.pop(index))
                self.hits += 1
                return value
        self.misses += 1
        value = make()
        entries.insert(0, (tuple(sources), value))
        del entries[self.size:]
        return value

    def clear(self) -> None:
        self._entries.clear()
