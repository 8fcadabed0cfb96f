"""224x224 backbones (Sec. 4.2): ResNet-10 and ResNeXt-50 (ImageNet-LT), ResNet-50 (iNaturalist 2018).

Built from torchvision's ResNet (its BasicBlock/Bottleneck blocks and init), trained from scratch; its
avgpool and fc are dropped because TappedNet adds its own GAP and heads. Default taps v1, v2, v3 = GAP of
layer2, layer3, layer4 (the last three stages); see mbib.models.backbone for other tap counts.
"""
from __future__ import annotations

from torch import nn

from mbib.models.backbone import StagedBackbone

STAGE_PLANES = (64, 128, 256, 512)

# name -> (torchvision block class name, blocks per stage, ResNet kwargs)
SPECS: dict[str, tuple[str, list[int], dict]] = {
    "resnet10": ("BasicBlock", [1, 1, 1, 1], {}),
    "resnet50": ("Bottleneck", [3, 4, 6, 3], {}),
    "resnext50_32x4d": ("Bottleneck", [3, 4, 6, 3], {"groups": 32, "width_per_group": 4}),
}


def imagenet_backbone(name: str, num_taps: int = 3, input_tap: bool = False) -> StagedBackbone:
    """The torchvision ResNet `name` as a StagedBackbone (name must be a key of SPECS)."""
    from torchvision.models import resnet  # here: torchvision pulls in torch._dynamo (~2 s a process), CIFAR needs none

    block_name, layers, kwargs = SPECS[name]
    block = getattr(resnet, block_name)
    net = resnet.ResNet(block, layers, **kwargs)
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    stages = [net.layer1, net.layer2, net.layer3, net.layer4]
    channels = [p * block.expansion for p in STAGE_PLANES]
    return StagedBackbone(stem, stages, channels, num_taps, input_tap, in_channels=3)
