"""Text in, embeddings out: documents (``docs``), tokenized on the build threads (``tokens``, ``source``),
a Hugging Face model on each worker (``models``). The ``[text]`` extra: tokenizers, transformers,
sentence-transformers."""
