"""CIFAR-10, Table 1 of the paper: NIN with dropout, no augmentation, 10.41% test error.

  python -m nin_jax.main --config experiments/cifar10.py --workdir runs/cifar10

The authors' cuda-convnet net and recipe: global contrast normalization + ZCA whitening fitted
on the training set (maxout's preprocessing), batch 128, SGD momentum 0.9, weight decay on
weights, their per-layer rates (biases x2, last cccp x0.1), 260 epochs with the rate divided by
10 at epochs 200 and 230. Trained on all 50k training images, tested on the 10k test images.
Ours in three places, all measured on real CIFAR images (docs/recipes.md): the data-dependent
init (every channel centred at unit scale on a batch of training images, the class maps started
level and alive) at base rate 0.05, where the authors' Gaussian at 0.1 is slow to leave chance
and He init dies there; and the gradient clipped to norm 10 (Caffe's clip_gradients), which cuts
only its rare spikes. Their literal recipe is experiments/authors_cifar10.py.
"""

from experiments import default


def get_config():
  config = default.get_config()
  config.experiment = 'cifar10'
  config.dataset = 'cifar10'
  config.data_dir = ''                 # TFDS default (~/tensorflow_datasets)
  config.generate_chars = False
  config.model = 'nin_cifar'
  config.num_classes = 10
  config.image_size = 32
  config.image_channels = 3
  config.preprocess = 'gcn_zca'
  config.augment = 'none'
  config.batch_size = 128
  config.eval_batch_size = 500
  config.num_epochs = 260
  config.schedule = 'step'
  config.step_fractions = (200 / 260, 230 / 260)  # cuda-convnet: /10 at epochs 200 and 230
  config.warmup_fraction = 0.0         # none: a warmup of 1% is 60 steps at chance
  config.learning_rate = 0.05
  config.weight_decay = 1e-4           # the Caffe Model Zoo solver's
  config.clip_gradients = 10.0         # cuts rare gradient spikes; its effect: docs/recipes.md
  config.init = 'data'                 # he dies at chance on real images; docs/recipes.md
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  return config
