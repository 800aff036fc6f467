"""The networks of the reproduction: a VGG-style CNN and a deep linear network (DLN).

Both come with and without BN from one builder, initialised from a seeded generator in
layer order (Glorot/Xavier-uniform weights, zero biases; BN starts at γ=1, β=0), so the
same seed gives bit-identical weights for every layer the two variants share.
"""

import math

import torch
from torch import nn

import fastbn
from fastbn.experiments import seeding

# VGG-A (Simonyan & Zisserman 2015): conv widths per stage, each stage ends in a 2×2 max-pool.
VGG_A_STAGES = ((64,), (128,), (256, 256), (512, 512), (512, 512))


def glorot_init_(model, seed):
    """Xavier-uniform weights and zero biases for every conv/linear layer, in order."""
    generator = seeding.generator(seed, "initial weights")
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            weight = torch.empty(module.weight.shape)
            nn.init.xavier_uniform_(weight, generator=generator)
            with torch.no_grad():
                module.weight.copy_(weight)
                if module.bias is not None:
                    module.bias.zero_()
    return model


def vgg_stages(image_size):
    """The VGG-A stages that fit the input: pool down to about 1×1, as VGG-A does on 32×32.

    32×32 (CIFAR-10) keeps all 5 stages as in the paper; 28×28 keeps 4 (28→14→7→3→1)
    and 8×8 keeps 3 (8→4→2→1).
    """
    return VGG_A_STAGES[:max(1, min(len(VGG_A_STAGES), int(math.log2(image_size))))]


def vgg(image_shape, num_classes, *, batch_norm, width=1.0, hidden=512, seed=0):
    """VGG-A adapted to `image_shape` (C, H, W); BN after each conv, before its ReLU.

    `width` scales every conv's channels (VGG-A at 1.0); the classifier is one hidden
    fully connected layer of `hidden` units. Returns a model with fastbn BN layers.
    """
    channels, size = image_shape[0], image_shape[1]
    layers = []
    for stage in vgg_stages(size):
        for out_channels in stage:
            out_channels = max(1, round(out_channels * width))
            layers.append(nn.Conv2d(channels, out_channels, kernel_size=3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out_channels))
            layers.append(nn.ReLU())
            channels = out_channels
        layers.append(nn.MaxPool2d(2))
        size //= 2
    layers += [nn.Flatten(), nn.Linear(channels * size * size, hidden), nn.ReLU(),
               nn.Linear(hidden, num_classes)]
    return fastbn.convert(glorot_init_(nn.Sequential(*layers), seed))


def deep_linear_net(dim, depth, *, batch_norm, seed=0):
    """x ↦ W_depth … W_1 x (no biases); the BN variant puts a BN between consecutive layers."""
    layers = []
    for i in range(depth):
        layers.append(nn.Linear(dim, dim, bias=False))
        if batch_norm and i < depth - 1:
            layers.append(nn.BatchNorm1d(dim))
    return fastbn.convert(glorot_init_(nn.Sequential(*layers), seed))
