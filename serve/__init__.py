"""Ray Serve entry point for mbib (see serve/app.py and docs/serving.md)."""
