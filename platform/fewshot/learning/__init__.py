"""How a model learns: freezing policies, the one training loop, the method options of a run
(balancer, distillation), one few-shot episode in a process, and the ablation protocol.
No ray, no mlflow: it runs in a plain process, a unit test, or inside a Ray Train worker."""
