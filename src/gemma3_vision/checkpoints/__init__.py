"""Where weights come from: resolving a model argument (folder, hub id, GGUF file, Ollama name, random), each
format's reader and its validation, the loaded torch modules, and the ``convert`` and ``info`` commands."""
