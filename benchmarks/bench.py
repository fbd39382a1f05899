"""Same as ``fastvlm bench``: fastvlm against transformers, side by side in one process.

python benchmarks/bench.py --size 0.5b --dtype bf16 --int8 --batch 4 --compile
"""

from fastvlm.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
