"""The computation: configs, the SigLIP vision tower, the multimodal projector, the CPU kernels they use, and
what turns an image into the tower's input (preprocessing, Pan & Scan crops)."""
