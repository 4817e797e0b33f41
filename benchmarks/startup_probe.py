"""Run ``gemma3-vision`` in this interpreter and record when each start-up stage begins and ends.

Used by ``startup_bench.py``, not by hand::

    G3_STARTUP_T0=<time.monotonic() at launch> python benchmarks/startup_probe.py MARKS.json [--full] -- encode ...

An import hook wraps a few functions as their modules finish loading, so the CLI runs unchanged (its own imports,
in its own order); each wrapper notes the first call's entry and exit on ``time.monotonic()``, a clock shared
with the parent that launched this process. "Starts encoding" is the first entry into ``VisionTower.forward``:
there the marks are written and, without ``--full``, the process ends (the encode itself is not start-up).
"""

import json
import os
import sys
import time

T0 = float(os.environ["G3_STARTUP_T0"])
MARKS_PATH, FULL = sys.argv[1], "--full" in sys.argv[2:sys.argv.index("--")]
MARKS: dict[str, list[float]] = {"ready": [time.monotonic() - T0] * 2}

# module -> functions (a "Class.method" wraps the method); the first call of each is timed
WATCHED = {
    "torch": (),  # only the import itself
    "gemma3_vision.api": ("load",),
    "gemma3_vision.checkpoints.resolve": ("resolve",),
    "gemma3_vision.checkpoints.weights": ("load_model",),
    "gemma3_vision.jobs.pipeline": ("run_job",),
    "gemma3_vision.model.preprocessing": ("decode_image", "pil_to_input"),
    "gemma3_vision.model.tower": ("VisionTower.forward",),
}


def now() -> float:
    return time.monotonic() - T0


# Imports that a random model's start-up should not pay for; those loaded by the first forward are reported. (tqdm
# is not among them: torch.hub imports it whenever torch is imported.)
OPTIONAL = ("gguf", "yaml", "huggingface_hub", "safetensors", "transformers", "requests", "ray")


def dump() -> None:
    with open(MARKS_PATH, "w", encoding="utf-8") as f:
        json.dump({**MARKS, "loaded": [m for m in OPTIONAL if m in sys.modules]}, f)


def timed(name: str, fn, first_forward: bool = False):  # noqa: ANN001, ANN201
    def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if name in MARKS:
            return fn(*args, **kwargs)
        MARKS[name] = [now(), float("nan")]
        if first_forward:
            dump()
            if not FULL:
                os._exit(0)  # start-up ends here; the encode is not part of it
        try:
            return fn(*args, **kwargs)
        finally:
            MARKS[name][1] = now()

    return wrapper


def patch(module) -> None:  # noqa: ANN001
    for qualname in WATCHED[module.__name__]:
        owner, _, attr = qualname.rpartition(".")
        target = getattr(module, owner) if owner else module
        fn = getattr(target, attr, None)
        if fn is not None:  # a renamed function is simply not timed
            setattr(target, attr, timed(f"{module.__name__.rpartition('.')[2]}.{qualname}", fn,
                                        first_forward=qualname == "VisionTower.forward"))


class Watch:
    """A meta-path finder that only decorates other finders' specs: time the import, then patch."""

    def find_spec(self, fullname, path, target=None):  # noqa: ANN001, ANN201
        if fullname not in WATCHED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                run = spec.loader.exec_module

                def exec_module(module, run=run):  # noqa: ANN001, ANN202
                    start = now()
                    run(module)
                    MARKS[f"import {fullname}"] = [start, now()]
                    patch(module)

                spec.loader.exec_module = exec_module
                return spec
        return None


sys.meta_path.insert(0, Watch())
args = sys.argv[sys.argv.index("--") + 1:]
sys.argv = ["gemma3-vision", *args]
from gemma3_vision.cli import main  # noqa: E402  (after the hook, as the console script would import it)

try:
    main()
finally:
    MARKS["exit"] = [now()] * 2
    dump()
