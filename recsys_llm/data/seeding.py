"""Seeds as numpy's random generators take them."""


def seed_entropy(seed: int) -> int:
    """``seed`` as numpy's seed entropy (``default_rng([...])``, ``SeedSequence``), which must be
    non-negative: a negative seed (``train.seed=-1``) is taken modulo 2**64; others are unchanged,
    and so are the orders they give."""
    seed = int(seed)
    return seed % 2**64 if seed < 0 else seed
