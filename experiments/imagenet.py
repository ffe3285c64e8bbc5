"""ImageNet: the Caffe Model Zoo NIN, 59.36% top-1 accuracy (40.64% error). For GPUs/TPUs.

  python -m nin_jax.main --config experiments/imagenet.py --workdir runs/imagenet \
    --config.data_dir=ROOT
  python -m nin_jax.main --config experiments/imagenet.py --workdir runs/imagenet \
    --config.dataset=imagenet2012 --config.data_dir=TFDS_DIR

ROOT holds ImageNet in its usual folder layout, ROOT/train/<class>/*.JPEG and
ROOT/val/<class>/*.JPEG (as torchvision's ImageFolder reads it), or that folder packed into
shards by `python -m nin_jax.pack ROOT PACKED`; or TFDS's imagenet2012, prepared as ArrayRecord
in TFDS_DIR. Either way the images are streamed (docs/streaming.md): read, decoded, resized and
cropped by worker processes while the net trains. Any other folder in that layout trains the
same way with --config.num_classes=ITS_CLASSES.

Caffe's solver: batch 64, lr 0.01 x0.1 every 200k of 450k iterations, momentum 0.9, weight decay
5e-4, 224x224 crops with mirroring; the images resized to 256 on their shorter side.
"""

from experiments import default


def get_config():
  config = default.get_config()
  config.experiment = 'imagenet'
  config.dataset = 'folder'
  config.data_dir = 'data/imagenet'    # ROOT/train/<class>/, ROOT/val/<class>/
  config.generate_chars = False
  config.model = 'nin_imagenet'
  config.num_classes = 1000
  config.image_size = 224              # the crops
  config.resize_size = 256             # the shorter side before cropping
  config.image_channels = 3
  config.preprocess = 'standardize'
  config.augment = 'crop_flip'         # random 224 crops, mirrored; the centre crop to evaluate
  config.translate_pixels = 0
  config.batch_size = 64
  config.eval_batch_size = 64          # changes no result; 256 took 1 GB more on a CPU
  config.num_train_steps = 450_000
  config.schedule = 'step'
  config.step_fractions = (200_000 / 450_000, 400_000 / 450_000)
  config.warmup_fraction = 0.005
  config.learning_rate = 0.01
  config.weight_decay = 5e-4
  # He init left real photos at chance by step 10 (loss pinned at ln C, gradients fading), as
  # the paper configs' old recipe did on CIFAR; the data-dependent init and the clip, as there,
  # leave it within 40 steps (docs/recipes.md).
  config.init = 'data'
  config.clip_gradients = 10.0
  config.dtype = 'bfloat16'
  config.log_every_steps = 500
  config.eval_every_steps = 10_000
  config.checkpoint_every_steps = 5_000
  return config
