"""The batch job behind ``gemma3-vision encode``: finding inputs, the decode → model → writer pipeline, the
output folder that makes a job resumable and kill-safe, and the same job on a Ray cluster."""
