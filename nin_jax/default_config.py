"""Every field a run has, with its default. The experiments import this and override a few.

experiments/default.py runs it as it is: the small NIN on the student notes' 62 characters,
generated on first use, like `experiments/chars.py`. It lives in the package, not only in
experiments/, so that the tools that build on the defaults (`nin_jax.benchmark`) run from any
folder once the package is installed.

  python -m nin_jax.main --config experiments/default.py --workdir runs/default
"""

try:
  from ml_collections import ConfigDict as _new_config
except ImportError:  # an accelerator host with JAX alone, timing `nin_jax.benchmark train|eval`

  class _new_config(dict):  # pylint: disable=invalid-name
    """Attribute access to a dict: all that the benchmark's steps ask of a config."""

    def __getattr__(self, key):
      try:
        return self[key]
      except KeyError:
        raise AttributeError(key) from None

    def __setattr__(self, key, value):
      self[key] = value


def get_config():
  """Every field of a run, with its default: an ml_collections.ConfigDict."""
  config = _new_config()
  config.experiment = 'default'        # the name reports match against the paper's tables

  # --- Data -------------------------------------------------------------------------------------
  # 'folder' (class-per-folder images in data_dir) or a TFDS name: 'cifar10', 'cifar100',
  # 'svhn_cropped', 'mnist', 'emnist/byclass', 'imagenet2012'.
  config.dataset = 'folder'
  # TFDS data_dir, or the root of the folder dataset; '' is TFDS's default, ~/tensorflow_datasets.
  config.data_dir = 'data/chars'
  # Folder dataset only: write the student's 62 characters here when the folder does not exist.
  config.generate_chars = True
  config.chars_per_class = 300         # images per class when generating
  config.test_fraction = 0.1           # folder ROOT/<class>/ layout: stratified held-out share
  config.skip_bad_files = False        # True: skip unreadable images with a warning; False: stop
  config.svhn_extra = True             # svhn_cropped: train on train + extra, as the paper
  config.image_size = 28               # images are resized to image_size x image_size
  # 0: each whole image squashed to image_size^2. >0 (folder only): the shorter side resized to
  # this, aspect kept, then an image_size^2 crop: random with augment='crop_flip', else centred.
  config.resize_size = 0
  config.image_channels = 1            # 1 (grayscale) or 3 (RGB)
  config.num_classes = 62
  # 'standardize' (per-channel mean/std of the training split), 'gcn_zca' (global contrast
  # normalization then ZCA, CIFAR), 'lcn' (local contrast normalization, SVHN), 'none' (x/255).
  config.preprocess = 'standardize'
  # 'none', 'translate_flip' (the paper's CIFAR-10 augmentation), 'translate' (digits, characters),
  # 'crop_flip' (random image_size crops of the resize_size images, mirrored: ImageNet; streams).
  config.augment = 'translate'
  config.translate_pixels = 2          # maximum random shift for the translate augmentations
  # Where batches are assembled: 'host' (numpy, on a thread beside the step), 'device' (the whole
  # uint8 dataset on every accelerator; gather, preprocessing and augmentation inside the jitted
  # step: the same batches), 'stream' (the files, a packed folder's shards or a TFDS dataset's
  # ArrayRecord files are read and decoded while it trains, by stream_workers processes; for data
  # beyond memory), 'auto' (stream a dataset whose decoded training images exceed
  # stream_memory_fraction of the host's memory, a packed folder, augment='crop_flip' and a TFDS
  # dataset with resize_size; else device on GPU/TPU when the data takes <= 1/4 of its memory,
  # else host).
  config.input_pipeline = 'auto'
  config.stream_workers = -1           # stream: worker processes; 0: threads in the trainer; -1: auto
  config.stream_threads = 2            # stream_workers=0: the trainer's decoding threads
  config.stream_memory_fraction = 0.25  # see input_pipeline='auto'

  # --- Model ------------------------------------------------------------------------------------
  config.model = 'nin_small'           # a name from nin_jax.models.MODELS
  config.head = 'gap'                  # 'gap' (the paper), 'fc' or 'fc_dropout' (Table 5)
  config.dropout_rate = 0.5            # after every mlpconv block but the last
  config.init = 'he'                   # 'he', 'paper' (the authors' stds) or 'data' (on images)
  config.dtype = 'float32'             # activations and matmuls; 'bfloat16' on accelerators
  config.conv_impl = 'auto'            # 'auto', 'xla', 'im2col', 'hybrid' or 'fft' (nin_jax.convs)

  # --- Optimization -----------------------------------------------------------------------------
  config.batch_size = 128              # global batch, over all devices of all processes
  config.eval_batch_size = 256         # global; the last batch is padded and masked
  config.num_epochs = 15
  config.num_train_steps = -1          # -1: num_epochs * (train examples // batch_size)
  config.learning_rate = 0.05          # base rate for weights; see lr_multipliers
  config.momentum = 0.9
  config.weight_decay = 5e-4           # L2 on weights only (never biases)
  config.clip_gradients = 0.0          # Caffe's: scale the gradient to this global L2 norm; 0: off
  config.lr_multipliers = 'paper'      # 'paper': biases x2, last cccp x0.1; 'none': all x1
  # 'step' (x0.1 at each of step_fractions of the run), 'plateau' (x0.1 when training accuracy
  # stops improving, plateau_drops times, as the paper), 'cosine' (with warmup), 'constant'.
  config.schedule = 'cosine'
  config.step_fractions = (0.5, 0.75)
  config.warmup_fraction = 0.02        # linear warmup over this share of the run
  config.plateau_drops = 2
  config.plateau_patience_fraction = 0.02  # epochs without improvement (as a share of the run)
  config.plateau_min_delta = 0.001     # accuracy gain that counts as improving

  # --- Bookkeeping ------------------------------------------------------------------------------
  config.seed = 0
  config.log_every_steps = 50
  config.eval_every_steps = -1         # -1: once per epoch
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 3
  config.progress_bar = True

  return config
