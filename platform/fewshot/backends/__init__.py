"""The only room that imports ray or mlflow: where jobs run (cluster options), Ray Train, Ray
Tune, the MLflow registry and tracking, the pyfunc flavour, serialised promotion of
``champion`` and the stored tuned configurations."""
