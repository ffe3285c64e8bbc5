"""SVHN, Table 3: no augmentation, local contrast normalization, 2.35% test error.

  python -m nin_jax.main --config experiments/svhn.py --workdir runs/svhn

Trained on all of train + extra (604k images; the paper held 6,000 of them out to validate).
The authors' SVHN definition is marked "coming soon" in their folder, so nin_svhn is the best
public guess (docs/references.md). The recipe is experiments/cifar10.py's (data-dependent
init, base rate 0.05, no warmup, the gradient clipped to norm 10): the old one (He init, lr
0.01, 1% warmup) trained a dead net on real images (docs/recipes.md).
"""

from experiments import default


def get_config():
  config = default.get_config()
  config.experiment = 'svhn'
  config.dataset = 'svhn_cropped'
  config.data_dir = ''
  config.generate_chars = False
  config.svhn_extra = True
  config.model = 'nin_svhn'
  config.num_classes = 10
  config.image_size = 32
  config.image_channels = 3
  config.preprocess = 'lcn'
  config.augment = 'none'
  config.batch_size = 128
  config.eval_batch_size = 500
  config.num_epochs = 40               # 604k images: ~190k steps
  config.schedule = 'step'
  config.step_fractions = (0.75, 0.9)
  config.warmup_fraction = 0.0         # none, as the CIFAR recipe (docs/recipes.md)
  config.learning_rate = 0.05
  config.weight_decay = 1e-4
  config.clip_gradients = 10.0
  config.init = 'data'                 # he at lr 0.01 was dead by step 15 on real images
  config.log_every_steps = 200
  config.checkpoint_every_steps = 5000
  return config
