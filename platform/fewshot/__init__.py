"""The learning core of the platform, in rooms whose imports flow one way (ARCHITECTURE.md):

    workflows/  one module per job: validate -> plan -> run
    backends/   the only room that imports ray or mlflow
    learning/   freezing, the training loop, method options, one episode, the ablation protocol
    clip/       CLIP teacher, its pretraining, distillation, refinement
    balancers/  task-gradient balancers behind one interface   | metrics/  COCO evaluation, statistics, plots
    model/      detector config and presets, backbones, detector, cosine head, expansion,
                checkpoint, inference, rows -> tensors

Below them all, ``catalog``. ``lint-imports`` (tests/test_layers.py) enforces the order.
"""
