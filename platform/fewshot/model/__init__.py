"""The detector: config and presets, backbones, the Faster R-CNN with its cosine head, head
expansion, the checkpoint format, inference on decoded images, and catalog rows -> tensors.
Imports only torch, torchvision and ``catalog``."""
