"""Ours vs transformers on this machine; see ``python benchmarks/bench.py --help``.

Examples:
    python benchmarks/bench.py --dtype float32 --dtype bfloat16 --batch 1 --batch 4 --json tower.json
    python benchmarks/bench.py --layers 2 --repeats 3          # truncated depth: minutes instead of tens of minutes
    python benchmarks/bench.py --preset tiny --no-compile      # smoke test
"""

from gemma3_vision.tools.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
