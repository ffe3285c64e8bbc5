"""MNIST, Table 4: no augmentation, 0.47% test error.

  python -m nin_jax.main --config experiments/mnist.py --workdir runs/mnist

Pixels scaled to [0, 1] as maxout's MNIST; nin_mnist is the best public guess of the authors'
("coming soon") definition. Ours, measured on real digits (docs/recipes.md): the data-dependent
init at base rate 0.03, and the gradient clipped to norm 10 (Caffe's clip_gradients), which
only cuts the spikes that once collapsed a seed back to one class.
"""

from experiments import default


def get_config():
  config = default.get_config()
  config.experiment = 'mnist'
  config.dataset = 'mnist'
  config.data_dir = ''
  config.generate_chars = False
  config.model = 'nin_mnist'
  config.num_classes = 10
  config.image_size = 28
  config.image_channels = 1
  config.preprocess = 'none'
  config.augment = 'none'
  config.batch_size = 128
  config.eval_batch_size = 500
  config.num_epochs = 100
  config.schedule = 'step'
  config.step_fractions = (0.7, 0.85)
  config.warmup_fraction = 0.0         # none: 1% of 100 epochs would be 469 steps of MNIST
  config.learning_rate = 0.03          # 0.05 leaves chance sooner but spikes back to it
  config.init = 'data'                 # he dies at chance on real digits; docs/recipes.md
  config.weight_decay = 1e-4
  config.clip_gradients = 10.0         # cuts the spikes (norm ~20) that collapsed seed 1 at lr 0.03
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  return config
