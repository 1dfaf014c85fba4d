"""Training and evaluation of ResNet-3G models with the fused 3G pooling head.

    python -m train --config train/configs/imagenet_resnet50_3g.yaml --data /data/imagenet
    torchrun --nproc_per_node=8 -m train --config train/configs/imagenet_resnet50_3g.yaml --data /data/imagenet
    python -m train --config train/configs/digits_demo.yaml --output-dir runs/demo --overwrite  # `make demo`

Modules: config (options and YAML), data (ImageFolder trees, transforms, samplers, the digits tree),
engine (train_one_epoch / evaluate), checkpoint (atomic files, resume state), distributed (torchrun/DDP
set-up), main (the flat main()). docs/training.md describes usage, checkpoints and the demo.
"""
