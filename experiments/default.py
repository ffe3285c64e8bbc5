"""Every field a run has, with its default: `nin_jax.default_config`, where each field is written
down with its meaning, exactly once. The other experiments import this and override a few.

Not a paper experiment by itself: it trains the small NIN on the 62 generated characters of
the student's notes, like `chars.py`.

  python -m nin_jax.main --config experiments/default.py --workdir runs/default
"""

from nin_jax.default_config import get_config  # pylint: disable=unused-import
