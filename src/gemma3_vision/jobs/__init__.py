"""The batch job behind ``gemma3-vision encode``: finding inputs, the decode → model → writer pipeline, the
writers (``.npy`` files or safetensors shards), the output folder that makes a job resumable and kill-safe, the
same job on a Ray cluster, its progress on the console, and ``open_embeddings``, which reads a folder back."""
