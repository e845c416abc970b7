"""Measuring: pycocotools COCO evaluation (bAP, nAP, AP50, HM), means with 95% confidence
intervals over seeds, and the figures a person would rather look at than read."""
