"""Class activation maps: ImageNet backbones, the CAM / Superpixel Pooling Network classifier and its inference."""
