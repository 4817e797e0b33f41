"""Commands that look at the model rather than encode with it: ``bench`` (speed against transformers) and
``show`` (a picture of what the tower sees)."""
