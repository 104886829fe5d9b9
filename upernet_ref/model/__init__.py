"""The network of the paper: UPerNet (Xiao et al., ECCV 2018, section 3 and figure 3).

Read in this order: `layers` (the shared conv-BN-ReLU and resize), `backbone` (the dilated
ResNet that gives C2..C5), `ppm` (pyramid pooling on C5), `head` (the FPN fusion head and the FCN
auxiliary head) and `upernet` (the whole network and `build_model`).
"""
from upernet_ref.model.backbone import ResNet
from upernet_ref.model.head import FCNHead, UPerHead
from upernet_ref.model.layers import ConvBNReLU, resize
from upernet_ref.model.ppm import PyramidPooling
from upernet_ref.model.upernet import UPerNet, build_model, count_parameters

__all__ = ["ConvBNReLU", "FCNHead", "PyramidPooling", "ResNet", "UPerHead", "UPerNet",
           "build_model", "count_parameters", "resize"]
