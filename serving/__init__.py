"""The Ray Serve application that answers detection requests with the champion model."""
