"""The seed project's training options on MovieLens-1M (issue 11): `ml1m_variants.py --group seed`.

    python benchmarks/seed_options.py --device cpu --epochs 25 --out benchmarks/results/seed_options.json
"""

from ml1m_variants import main

if __name__ == "__main__":
    main(group="seed")
