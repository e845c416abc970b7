"""CLIP: the teacher (OpenCLIP, embedded or user-supplied), its pretraining on the captioned
corpus, distillation into the detector's RoI features, and score refinement at inference."""
