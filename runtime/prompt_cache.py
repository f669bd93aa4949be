"""Prompt-embedding cache: a prompt encoded once is not encoded again while its embeddings fit the byte cap.

The text encoder (Qwen3 for Klein) costs as much as several transformer steps at small sizes, and applications
repeat prompts (the same edit over many images, the empty negative prompt of guided models). Keys come from
:func:`~sparse_context.runtime.fingerprints.prompt_key`: the encoder, the prompt and the encoding settings.

numpy embeddings are stored read-only: a cached prompt is the same unchanging array every time it comes back, so
the engine backends keep its cast and its device copy from one generation to the next (``engines.feeds``).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from sparse_context.runtime.kv_cache import ByteCappedLRU


def embedding_nbytes(embeddings: Any) -> int:
    """Bytes of a numpy array or a torch tensor (without importing torch)."""
    if hasattr(embeddings, "element_size"):
        return int(embeddings.numel() * embeddings.element_size())
    return int(np.asarray(embeddings).nbytes)


class PromptEmbeddingCache(ByteCappedLRU):
    """Prompt embeddings (numpy arrays or torch tensors, as the encoder returns them) keyed by prompt key."""

    what = "prompt-embedding cache size"

    def get_or_encode(self, key: str, encode: Callable[[], Any]) -> Any:
        """The cached embeddings for ``key``, or ``encode()``'s result, stored for next time."""
        embeddings = self.get(key)
        if embeddings is None:
            embeddings = encode()
            if isinstance(embeddings, np.ndarray):
                embeddings = embeddings.view()  # the caller's own array stays writeable
                embeddings.flags.writeable = False
            self.put(key, embeddings, embedding_nbytes(embeddings))
        return embeddings
